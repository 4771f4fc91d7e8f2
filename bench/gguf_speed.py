"""Part 1 of the GGUF benchmark: speed and memory of ours against convert + quantize.

Each pipeline takes one model from a Hugging Face folder to a ``SPEED_MIX`` GGUF: llama.cpp's is
two processes (``convert_hf_to_gguf.py``, then ``llama-quantize``), ours one
(``mlxedge export gguf``). Every process is timed and its peak RSS read by
``bench_convert.run_measured``; runs are interleaved and outputs deleted between them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import bench_convert as bc
from llamacpp_tools import GGUF_WORK, Tools, check_gguf, convert_argv, ours_argv, quantize_argv

SPEED_MIX = "Q4_K_M"
OURS, CONVERT, QUANTIZE = "mlxedge export gguf", "convert_hf_to_gguf.py", "llama-quantize"


# The 1B-shape model's own tokenizer is a 320-token test vocabulary whose pre-tokenizer
# convert_hf_to_gguf.py does not recognise (it refuses to convert); SmolLM2's is a known one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def prepare_llama1b_with_tokenizer(llama1b: Path, smollm2: Path) -> Path:
    """The 1B-shape folder with SmolLM2's tokenizer: weights hard-linked, token ids from SmolLM2.

    Both tools read this folder. The vocabulary (49152 tokens) is smaller than the embedding
    (128256 rows); converters pad it, and it adds kilobytes to a GGUF of gigabytes.
    """
    folder = GGUF_WORK / "llama1b-bf16-smollm2-tokenizer"
    if bc.is_hf_folder(folder):
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src in llama1b.iterdir():
        if src.suffix == ".safetensors" or src.name == "model.safetensors.index.json":
            # Hard links: mlxedge refuses an index naming a file outside the folder, which a
            # symlink resolves to. Same data, no copy (a copy where links are not possible).
            try:
                os.link(src, tmp / src.name)
            except OSError:
                shutil.copy2(src, tmp / src.name)
    for name in TOKENIZER_FILES:
        shutil.copy2(smollm2 / name, tmp / name)
    config = json.loads((llama1b / "config.json").read_text())
    smollm2_config = json.loads((smollm2 / "config.json").read_text())
    config.update({k: smollm2_config[k] for k in ("bos_token_id", "eos_token_id")})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(folder)
    return folder


@dataclass
class Step:
    """One measured process of a pipeline."""

    tool: str
    argv: list[str]
    out: Path
    cwd: Path = bc.REPO_DIR  # a baseline checkout runs `python -m mlxedge.cli` from its folder
    walls: list[float] = field(default_factory=list)
    peaks_kib: list[int] = field(default_factory=list)


@dataclass
class Pipeline:
    """The processes that take one model to a quantized GGUF; steps run in order."""

    name: str
    model: str
    steps: list[Step]
    error: str | None = None

    def totals(self) -> list[float]:
        return [sum(walls) for walls in zip(*(s.walls for s in self.steps), strict=True)]


def speed_pipelines(
    tools: Tools, inputs: dict[str, Path], baseline: Path | None = None
) -> list[Pipeline]:
    """Per model: llama.cpp's convert + quantize, then ours (when the command exists); with a
    baseline checkout, ours from both checkouts, each as `python -m mlxedge.cli` run from its
    own folder."""
    pipelines = []
    out_dir = GGUF_WORK / "out"
    out_dir.mkdir(parents=True, exist_ok=True)  # convert_hf_to_gguf.py does not make it
    for model, path in inputs.items():
        base = out_dir / f"{model}-{tools.outtype}.gguf"
        theirs = out_dir / f"{model}-{SPEED_MIX}-llama.cpp.gguf"
        pipelines.append(Pipeline("llama.cpp", model, [
            Step(CONVERT, convert_argv(tools, path, base), base),
            Step(QUANTIZE, quantize_argv(tools, base, theirs, SPEED_MIX), theirs),
        ]))  # fmt: skip
        if tools.mlxedge:
            ours = out_dir / f"{model}-{SPEED_MIX}-mlxedge.gguf"
            argv = ours_argv(tools, path, ours, SPEED_MIX)
            cli = [sys.executable, "-m", "mlxedge.cli"]
            if baseline is not None:
                argv = [*cli, *argv[1:]]
            pipelines.append(Pipeline("mlxedge", model, [Step(OURS, argv, ours)]))
            if baseline is not None:
                base_out = ours.with_name(ours.stem + "-baseline.gguf")
                base_argv = [*cli, "export", "gguf", str(path), "-o", str(base_out),
                             "--type", SPEED_MIX]  # fmt: skip
                base = Step(OURS, base_argv, base_out, cwd=baseline)
                pipelines.append(Pipeline(bc.baseline_tool(baseline), model, [base]))
    return pipelines


def measure_speed(pipelines: list[Pipeline], runs: int) -> None:
    """Run every pipeline ``runs`` times, interleaved; every output is deleted after its run."""
    logs = GGUF_WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for p in pipelines:  # one uncounted warm-up round: file and bytecode caches filled
        for step in p.steps:
            bc.run_measured(step.argv, logs / f"speed-{step.out.stem}.warmup.log", step.cwd)
        for step in p.steps:
            step.out.unlink(missing_ok=True)
    for r in range(1, runs + 1):
        for p in pipelines:
            if p.error:
                continue
            for step in p.steps:
                step.out.unlink(missing_ok=True)
            for step in p.steps:
                log = logs / f"speed-{step.out.stem}.log"
                wall, peak_kib, code = bc.run_measured(step.argv, log, step.cwd)
                p.error = f"exit code {code}, see {log}" if code else check_gguf(step.out)
                if p.error:
                    print(f"FAIL {step.tool} {p.model}: {p.error}", flush=True)
                    break
                step.walls.append(wall)
                step.peaks_kib.append(peak_kib)
                print(
                    f"run {r}/{runs}  {step.tool:22s} {p.model:8s} {wall:8.2f} s "
                    f"{peak_kib / 1024:7.0f} MiB",
                    flush=True,
                )
            for step in p.steps:
                step.out.unlink(missing_ok=True)


def speed_table(pipelines: list[Pipeline]) -> str:
    """Per model: each step, llama.cpp's total, ours, and the ratio ours / llama.cpp."""
    rows = [
        "| model | tool | step | median wall s | peak RSS MiB | wall vs llama.cpp | "
        "RSS vs llama.cpp |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for model in dict.fromkeys(p.model for p in pipelines):
        label = bc.MODEL_LABELS[model]
        theirs = next((p for p in pipelines if p.model == model and p.name == "llama.cpp"), None)
        their_wall = their_peak = None
        if theirs and not theirs.error:
            for s in theirs.steps:
                rows.append(
                    f"| {label} | llama.cpp | `{s.tool}` | "
                    f"{statistics.median(s.walls):.2f} | {max(s.peaks_kib) / 1024:.0f} | | |"
                )
            their_wall = statistics.median(theirs.totals())
            their_peak = max(max(s.peaks_kib) for s in theirs.steps) / 1024
            rows.append(
                f"| {label} | llama.cpp | **total** (peak: larger step) | "
                f"{their_wall:.2f} | {their_peak:.0f} | 1.00x | 1.00x |"
            )
        elif theirs:
            rows.append(f"| {label} | llama.cpp | | failed: {theirs.error} | | | |")
        base = next((p for p in pipelines if p.model == model and p.name.startswith("mlxedge @")
                     and not p.error), None)  # fmt: skip
        for p in pipelines:
            if p.model != model or not p.name.startswith("mlxedge"):
                continue
            if p.error:
                rows.append(f"| {label} | {p.name} | `{OURS}` | failed: {p.error} | | | |")
                continue
            wall = statistics.median(p.totals())
            peak = max(p.steps[0].peaks_kib) / 1024
            ratios = ("", "")
            if their_wall:
                ratios = (f"**{wall / their_wall:.2f}x**", f"{peak / their_peak:.2f}x")
            versus = ""
            if base is not None and p is not base:
                b_wall, b_peak = statistics.median(base.totals()), max(base.steps[0].peaks_kib)
                versus = f" vs baseline {wall / b_wall:.3f}x wall, {peak * 1024 / b_peak:.3f}x RSS"
            rows.append(
                f"| {label} | {p.name} | `{OURS}`{versus} | {wall:.2f} | {peak:.0f} | "
                f"{ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(rows)
