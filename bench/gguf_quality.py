"""Part 2 of the GGUF benchmark: KL divergence of each mix, ours and llama.cpp's, on SmolLM2.

llama.cpp's F32 GGUF of the model is the reference: ``llama-perplexity --kl-divergence-base``
scores it once on the text, then every quantized GGUF is scored against it on the same tokens
(``--kl-divergence``) and the mean KL, PPL and same-top-token rate are parsed from its output.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from llamacpp_tools import (
    GGUF_WORK,
    REPO_DIR,
    Tools,
    check_gguf,
    convert_argv,
    ours_argv,
    perplexity_base_argv,
    perplexity_kl_argv,
    quantize_argv,
)

MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
         "Q8_0", "Q4_0", "F16", "F32")  # fmt: skip
QUALITY_MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# llama.cpp's numbers on SmolLM2 in DESIGN.md (anchors text, 19 windows of 512).
PUBLISHED_KL = {"Q4_K_M": 0.066, "Q3_K_M": 0.158, "Q8_0": 0.0046}


def gguf_summary(path: Path) -> tuple[float, float, dict[str, str]]:
    """(file MiB, bits per weight over all tensors, {tensor: type and digest}) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    tensors = {
        t.name: f"{t.tensor_type.name}:{hashlib.sha1(t.data.tobytes()).hexdigest()}"
        for t in reader.tensors
    }
    return path.stat().st_size / 2**20, 8 * n_bytes / n_weights, tensors


@dataclass
class KLResult:
    """What llama-perplexity --kl-divergence reports, parsed."""

    tool: str
    mix: str
    mib: float
    bpw: float
    ppl: float
    ppl_err: float
    kld: float
    kld_err: float
    same_top: float
    same_top_err: float
    tensors: dict[str, str] = field(default_factory=dict)  # name -> type and digest of bytes


_NUM = r"([-+0-9.eE]+|nan|inf)"
_PATTERNS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}",
    "kld": rf"Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}",
    "same_top": rf"Same top p:\s*{_NUM}\s*±\s*{_NUM}\s*%",
}


def parse_kl_output(text: str) -> dict[str, tuple[float, float]]:
    """The mean PPL, mean KLD and same-top-token rate, each with its ± error."""
    found = {}
    for key, pattern in _PATTERNS.items():
        match = re.search(pattern, text)
        if match is None:
            raise ValueError(f"llama-perplexity printed no {key!r} line")
        found[key] = (float(match.group(1)), float(match.group(2)))
    return found


def write_text(spec: str) -> tuple[Path, str]:
    """The evaluation text (mlxedge.texts' default or a named one) as a file, and its name."""
    from mlxedge.texts import load_text

    text = load_text(None if spec == "python-docs" else spec)
    path = GGUF_WORK / "quality" / f"text-{re.sub(r'[^A-Za-z0-9_.-]', '_', spec)}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text.content:
        path.write_text(text.content, encoding="utf-8")
    return path, text.name


def run_logged(argv: list[str], log: Path) -> str | None:
    """Run ``argv``; its output into ``log``; None on success, else the problem."""
    with log.open("wb") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR).returncode
    return f"exit code {code}, see {log}" if code else None


def measure_quality(
    tools: Tools, model: Path, mixes: list[str], text_spec: str, chunks: int
) -> tuple[list[KLResult], list[str], list[list[str]]]:
    """KL of every mix, llama.cpp's and ours, against llama.cpp's F32 GGUF of ``model``.

    Returns:
        The results, report lines (the F32 base's PPL, then any problems), and the command
        lines run.
    """
    qdir = GGUF_WORK / "quality"
    logs = GGUF_WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    text, text_name = write_text(text_spec)
    f32 = qdir / "smollm2-f32.gguf"
    kld = qdir / f"base-{text.stem}-{chunks}.kld"
    commands, problems, results = [], [], []
    argv = convert_argv(tools, model, f32)
    commands.append(argv)
    if check_gguf(f32) is not None:
        print(f"converting {model.name} to {f32.name}", flush=True)
        tmp = f32.with_suffix(".tmp.gguf")
        argv = convert_argv(tools, model, tmp)
        if problem := run_logged(argv, logs / "quality-convert.log"):
            return [], [f"llama.cpp convert failed: {problem}"], commands
        tmp.rename(f32)
    argv = perplexity_base_argv(tools, f32, text, kld, chunks)
    commands.append(argv)
    if kld.is_file() and base_perplexity(kld) is not None:
        print(f"llama-perplexity base: cached {kld.name}", flush=True)
    else:
        print(f"llama-perplexity base: {text_name}, {chunks} chunks of 512", flush=True)
        kld.unlink(missing_ok=True)
        if problem := run_logged(argv, logs / f"quality-{kld.stem}.log"):
            kld.unlink(missing_ok=True)
            return [], [f"llama-perplexity base failed: {problem}"], commands

    jobs = [("llama.cpp", mix) for mix in mixes]
    if tools.mlxedge:
        jobs += [("mlxedge", mix) for mix in (*mixes, "F32")]
    for tool, mix in jobs:
        out = qdir / f"smollm2-{mix}-{tool}.gguf"
        if tool == "llama.cpp":
            argv = quantize_argv(tools, f32, out, mix)
        else:
            argv = ours_argv(tools, model, out, mix)
        commands.append(argv)
        out.unlink(missing_ok=True)
        log = logs / f"quality-{out.stem}.log"
        problem = run_logged(argv, log) or check_gguf(out)
        if problem is None:
            argv = perplexity_kl_argv(tools, out, kld, chunks)
            problem = run_logged(argv, log.with_suffix(".kl.log"))
        if problem:
            problems.append(f"{tool} {mix}: {problem}")
            print(f"FAIL {tool} {mix}: {problem}", flush=True)
            continue
        stats = parse_kl_output(log.with_suffix(".kl.log").read_text(errors="replace"))
        mib, bpw, tensors = gguf_summary(out)
        out.unlink()
        result = KLResult(
            tool, mix, mib, bpw, *stats["ppl"], *stats["kld"], *stats["same_top"], tensors
        )
        results.append(result)
        print(
            f"{tool:9s} {mix:7s} {bpw:5.2f} bpw  PPL {result.ppl:8.3f}  "
            f"KL {result.kld:.5f} ± {result.kld_err:.5f}  same top {result.same_top:.2f} %",
            flush=True,
        )
    commands.append(perplexity_kl_argv(tools, Path("QUANT.gguf"), kld, chunks))
    problems.insert(0, f"F32 base (llama.cpp's convert): PPL {base_perplexity(kld)}")
    return results, problems, commands


def base_perplexity(kld: Path) -> str | None:
    """The F32 model's PPL from the log of the run that wrote ``kld`` (None unless it finished)."""
    log = GGUF_WORK / "logs" / f"quality-{kld.stem}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    return f"{float(match[1]):.3f} ± {float(match[2]):.3f}" if match else None


def same_tensors(ours: KLResult, theirs: KLResult | None) -> str:
    """How many of our tensors have llama.cpp's name, type and bytes, e.g. `272/272`."""
    if theirs is None or not ours.tensors:
        return ""
    same = sum(theirs.tensors.get(name) == v for name, v in ours.tensors.items())
    return f"{same}/{max(len(ours.tensors), len(theirs.tensors))}"


def quality_table(results: list[KLResult]) -> str:
    """One row per mix and tool: size, PPL, KL, same-top rate, KL ratio, identical tensors."""
    rows = [
        "| mix | tool | MiB | bits/weight | PPL | mean KL ± err | same top % | "
        "KL ours / llama.cpp | tensors identical to llama.cpp's | published llama.cpp KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    theirs = {r.mix: r for r in results if r.tool == "llama.cpp"}
    for r in sorted(results, key=lambda r: (MIXES.index(r.mix), r.tool)):
        ratio = same = ""
        if r.tool == "mlxedge" and r.mix in theirs:
            ratio = f"**{r.kld / theirs[r.mix].kld:.2f}**" if theirs[r.mix].kld > 0 else ""
            same = same_tensors(r, theirs[r.mix])
        published = PUBLISHED_KL.get(r.mix, "") if r.tool == "llama.cpp" else ""
        rows.append(
            f"| {r.mix} | {r.tool} | {r.mib:.1f} | {r.bpw:.2f} | {r.ppl:.3f} | "
            f"{r.kld:.5f} ± {r.kld_err:.5f} | {r.same_top:.2f} | {ratio} | {same} | {published} |"
        )
    return "\n".join(rows)
