"""`mlxedge export gguf` against llama.cpp's own path: speed, memory, quality, K-quant error.

llama.cpp's path is its converter to a float GGUF, then its quantizer:
    python convert_hf_to_gguf.py MODEL --outtype f32 --outfile F32.gguf
    llama-quantize F32.gguf OUT.gguf Q4_K_M
both taken from the llama-cpp-python source distribution (which vendors llama.cpp), built and
installed once under ``bench/work/``. Three measurements, all in the same run on this machine:

1. speed: wall time and peak RSS of whole processes, ours against convert + quantize, median
   over ``--runs`` interleaved runs (SmolLM2-135M and the Llama-3.2-1B-shape model);
2. quality (SmolLM2 only): KL divergence of every mix, ours and llama.cpp's, against llama.cpp's
   F32 GGUF, measured by ``llama-perplexity --kl-divergence`` on the same tokens;
3. K-quant reconstruction error on ``ffn_down`` tensors: ``ggml_blocks.quantize_rows`` against
   llama.cpp's ``ggml_quantize_chunk`` (the quantizer llama-quantize runs without an imatrix).

Usage:
    python bench/bench_gguf.py [--parts speed,quality,kquant] [--models smollm2,llama1b]
                               [--runs 3] [--text python-docs] [--chunks 16]

The tables are printed and written into ``bench/RESULTS.md`` between the markers
``<!-- gguf-bench:start -->`` and ``<!-- gguf-bench:end -->``, one block per part, so that a run
of some parts (``--parts quality``) replaces only theirs.

This file is the driver (options, the parts' report text, the results section). The work is in:
    llamacpp_tools.py   llama.cpp's source, build, converter venv, versions and command lines
    gguf_speed.py       part 1: the pipelines, their measurement and table
    gguf_quality.py     part 2: llama-perplexity's KL runs, their parsing and table
    gguf_kquant.py      part 3: the per-tensor K-quant error comparison and its cache
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert as bc  # noqa: E402  (the shared inputs and the process measurement)
from gguf_kquant import K_TYPES, kquant_table, kquant_tensors, measure_kquants  # noqa: E402
from gguf_quality import (  # noqa: E402
    MIXES,
    QUALITY_MIXES,
    measure_quality,
    quality_table,
    write_text,
)
from gguf_speed import (  # noqa: E402
    SPEED_MIX,
    measure_speed,
    prepare_llama1b_with_tokenizer,
    speed_pipelines,
    speed_table,
)
from llamacpp_tools import (  # noqa: E402
    CMAKE_ARGS,
    GGUF_WORK,
    LLAMA_CPP_PYTHON,
    REPO_DIR,
    TOOLS,
    Tools,
    build_llama_tools,
    convert_versions,
    llama_cpp_commit,
    prepare_convert_venv,
    prepare_llama_source,
)

RESULTS_MD = bc.RESULTS_MD
START_MARKER = "<!-- gguf-bench:start -->"
END_MARKER = "<!-- gguf-bench:end -->"
PARTS = ("speed", "quality", "kquant")
MODELS = bc.MODELS
CONVERT_OUTTYPES = ("f32", "f16", "bf16")


# ---------------------------------------------------------------------------------------------
# Report


def short_argv(argv: list[str]) -> str:
    """A command line with paths shortened to the repository, for the results file."""
    return shlex.join(bc.short_arg(a) for a in argv)


def mlxedge_rev() -> str:
    """The repository's commit, marked when the package's code has uncommitted changes."""
    git = ["git", "-C", str(REPO_DIR)]
    rev = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    status = [*git, "status", "--porcelain", "--", "mlxedge", "pyproject.toml"]
    dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    return (rev.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


def block_name(part: str, text_spec: str) -> str:
    """The RESULTS.md block of a part: quality on another text than the default gets its own."""
    if part != "quality" or text_spec == "python-docs":
        return part
    return f"quality-{re.sub(r'[^A-Za-z0-9_.-]', '_', Path(text_spec).name)}"


def part_markers(part: str) -> tuple[str, str]:
    return f"<!-- gguf-bench:{part}:start -->", f"<!-- gguf-bench:{part}:end -->"


def _replace_between(text: str, start: str, end: str, body: str) -> str | None:
    i, j = text.find(start), text.find(end)
    if i == -1 or j < i:
        return None
    return text[: i + len(start)] + "\n" + body + "\n" + text[j:]


def write_results(blocks: dict[str, str], path: Path = RESULTS_MD) -> None:
    """Replace the measured parts' blocks inside this benchmark's section of ``path``.

    The section holds one block per part, so a run of some parts keeps the others' last results.
    Everything outside the section is kept.
    """
    text = path.read_text() if path.exists() else "# mlxedge benchmark results\n"
    if _replace_between(text, START_MARKER, END_MARKER, "") is None:
        empty = [f"{a}\n(not measured yet)\n{b}" for a, b in map(part_markers, PARTS)]
        section = "\n".join([START_MARKER, SECTION_TITLE, "", "\n\n".join(empty), END_MARKER])
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    for part, body in blocks.items():
        replaced = _replace_between(text, *part_markers(part), body)
        if replaced is None:  # a section written before this part existed: add the block
            start, end = part_markers(part)
            replaced = text.replace(END_MARKER, f"\n{start}\n{body}\n{end}\n{END_MARKER}")
        text = replaced
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """What one part contributes to the results section."""

    lines: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: bool = False


def run_speed(args, tools: Tools, inputs: dict[str, Path], report: Report) -> None:
    """Part 1: time both paths to Q4_K_M on each model."""
    speed_inputs = {m: p for m, p in inputs.items() if m in args.models}
    if "llama1b" in speed_inputs:
        if "smollm2" not in inputs:
            print("SKIP llama1b speed: it borrows SmolLM2's tokenizer, which is missing")
            del speed_inputs["llama1b"]
        else:
            speed_inputs["llama1b"] = prepare_llama1b_with_tokenizer(
                inputs["llama1b"], inputs["smollm2"]
            )
            report.notes.append(
                "1B-shape speed input: the cached folder with SmolLM2's tokenizer files "
                "(its own test tokenizer's pre-tokenizer is unknown to convert_hf_to_gguf.py)"
            )
    baseline = args.baseline.resolve() if args.baseline else None
    pipelines = speed_pipelines(tools, speed_inputs, baseline)
    measure_speed(pipelines, args.runs)
    report.failed |= any(p.error for p in pipelines)
    report.commands += [s.argv for p in pipelines for s in p.steps]
    report.lines += [
        f"#### Speed and memory: {SPEED_MIX} from a Hugging Face folder",
        "",
        f"Median wall time and largest peak RSS of whole processes over {args.runs} run(s), "
        "after one uncounted warm-up round, interleaved, outputs deleted between runs, Python's "
        "bytecode cache on. llama.cpp's path is two processes "
        f"(convert to {args.convert_outtype.upper()}, then quantize); its total is the median of "
        "the per-run sums, its peak the larger step's. Below 1 is better.",
        "",
        speed_table(pipelines),
        "",
    ]


def run_quality(args, tools: Tools, smollm2: Path, report: Report) -> None:
    """Part 2: KL divergence of each mix, ours and llama.cpp's, on SmolLM2."""
    results, problems, commands = measure_quality(
        tools, smollm2, args.mixes, args.text, args.chunks
    )
    report.commands += commands
    report.failed |= len(problems) > 1 or not results
    _, text_name = write_text(args.text)
    report.lines += [
        "#### Quality: KL divergence against llama.cpp's F32 GGUF, SmolLM2-135M-Instruct",
        "",
        f"Text: {text_name} (`--text {args.text}`), the first {args.chunks} windows of 512 "
        "tokens; llama-perplexity scores the second half of each window. KL is "
        "KL(F32 || quantized) per token in nats, ± its standard error; PPL is the quantized "
        "model's. Bits per weight count every tensor. The published column is llama.cpp on the "
        "`anchors` text, 19 windows (DESIGN.md). Our F32 row checks that our F32 GGUF is "
        "llama.cpp's model (KL near 0).",
        "",
        quality_table(results),
        "",
        *(f"- {p}" for p in problems),
        "",
    ]


def run_kquant(args, inputs: dict[str, Path], report: Report) -> None:
    """Part 3: K-quant reconstruction error of ffn_down tensors, ours / llama.cpp's."""
    jobs = []
    for model in args.kquant_models:
        if model not in inputs:
            continue
        layers = args.kquant_layers_llama1b if model == "llama1b" else None
        rows = (args.kquant_rows_llama1b or None) if model == "llama1b" else None
        for i in kquant_tensors(model, layers):
            for t in K_TYPES:
                tensor = f"model.layers.{i}.mlp.down_proj.weight"
                jobs.append((model, str(inputs[model]), tensor, rows, t))
    results = measure_kquants(jobs)
    ratios = [r["err_ours"] / r["err_theirs"] for r in results]
    report.failed |= bool(ratios) and (max(ratios) > 1.02 or statistics.fmean(ratios) > 1.0)
    report.lines += [
        "#### K-quant reconstruction error on `ffn_down`: ours / llama.cpp",
        "",
        "Squared reconstruction error sum((w - dequant(quant(w)))^2) per tensor: ours is "
        "`ggml_blocks.quantize_rows` then `dequantize_rows`; llama.cpp's is `ggml_quantize_chunk` "
        "(llama-cpp-python's libggml-base, no importance matrix: what llama-quantize runs) read "
        "back by gguf-py's dequantizer. Targets: mean <= 1.0, none above 1.02. Times are of "
        "quantizing one tensor: ours on the path `quantize_rows` takes (the native kernel on two "
        "threads where it is built, else the numpy specification), llama.cpp's on one thread.",
        "",
        kquant_table(results),
        "",
    ]
    if "llama1b" in args.kquant_models and (args.kquant_layers_llama1b or args.kquant_rows_llama1b):
        report.notes.append(
            f"1B-shape K-quant subset: layers {args.kquant_layers_llama1b or 'all'}, first "
            f"{args.kquant_rows_llama1b or 'all'} rows of each"
        )


SECTION_TITLE = "### GGUF export against llama.cpp (convert_hf_to_gguf.py + llama-quantize)"


def render(report: Report, tools: Tools | None, part: str) -> str:
    """One part's block: its tables, then the machine, versions and command lines."""
    versions = [f"mlxedge {importlib.metadata.version('mlxedge')} (git {mlxedge_rev()})"]
    if part == "kquant":
        versions += [
            f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')} (llama.cpp "
            f"{llama_cpp_commit()})",
            f"gguf-py {importlib.metadata.version('gguf')}",
        ]
    else:
        versions.append(
            f"llama.cpp {llama_cpp_commit()} (from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist)"
        )
    if tools and part in ("speed", "quality"):
        versions.append(f"converter venv: {convert_versions(tools.convert_python)}")
    command = shlex.join(["python", "bench/bench_gguf.py", *sys.argv[1:]])
    lines = [
        *report.lines,
        bc.machine_and_versions()[0],
        f"- versions: {', '.join(versions)}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        *(f"- note: {n}" for n in report.notes),
    ]
    if part != "kquant":
        lines.append(
            f"- llama.cpp build: `cmake {' '.join(CMAKE_ARGS)}`, targets {', '.join(TOOLS)}"
        )
    if report.commands:
        unique = dict.fromkeys(tuple(c) for c in report.commands)
        lines += ["", "Command lines run:", "", *(f"- `{short_argv(list(c))}`" for c in unique)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--parts", type=bc._csv(PARTS), default=list(PARTS), help="default: speed,quality,kquant"
    )
    parser.add_argument("--models", type=bc._csv(MODELS), default=list(MODELS), help="for speed")
    parser.add_argument("--runs", type=int, default=3, help="runs per command (default 3)")
    parser.add_argument(
        "--mixes", type=bc._csv(MIXES), default=list(QUALITY_MIXES), help="for quality"
    )
    parser.add_argument(
        "--text",
        default="python-docs",
        help="quality text: python-docs (mlxedge's default), anchors, choice, or a UTF-8 file",
    )
    parser.add_argument(
        "--chunks", type=int, default=16, help="windows of 512 tokens to score (default 16)"
    )
    parser.add_argument(
        "--convert-outtype",
        choices=CONVERT_OUTTYPES,
        default="f32",
        help="convert_hf_to_gguf.py --outtype (default f32)",
    )
    parser.add_argument(
        "--kquant-models", type=bc._csv(MODELS), default=list(MODELS), help="for kquant"
    )
    parser.add_argument(
        "--kquant-layers-llama1b",
        default="",
        help="ffn_down layers of the 1B shape, e.g. 0,5,10,15 (default: all 16)",
    )
    parser.add_argument(
        "--kquant-rows-llama1b",
        type=int,
        default=0,
        help="first rows of each 1B ffn_down tensor (default 0 = all 2048)",
    )
    parser.add_argument("--smollm2-dir", type=Path, help="an existing fp32 SmolLM2 HF folder")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="for speed: another checkout of mlxedge (native kernels built in place) measured "
        "beside this one, interleaved, for a before/after comparison",
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"print only; leave {RESULTS_MD.name} alone"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.chunks < 2:
        parser.error("--runs must be at least 1 and --chunks at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse options, prepare tools and inputs, measure the chosen parts, record the tables."""
    args = parse_args(argv)
    GGUF_WORK.mkdir(parents=True, exist_ok=True)
    reports = {part: Report() for part in args.parts}
    mlxedge = bc.mlxedge_executable()
    export_problem = bc.cli_unavailable([mlxedge, "export", "gguf"]) if mlxedge else "not found"
    if export_problem:
        message = f"`mlxedge export gguf` is not available yet ({export_problem})"
        print(f"NOTE: {message}; measuring llama.cpp only.", flush=True)
        for part in {"speed", "quality"} & set(args.parts):
            reports[part].notes.append(message + "; only llama.cpp was measured")
    import_problem = bc.cli_unavailable([mlxedge, "import"]) if mlxedge else "not found"

    tools = None
    if {"speed", "quality"} & set(args.parts):
        src = prepare_llama_source()
        built = build_llama_tools(src)
        tools = Tools(
            mlxedge=None if export_problem else mlxedge,
            convert_python=prepare_convert_venv(),
            convert_script=src / "convert_hf_to_gguf.py",
            quantize=built["llama-quantize"],
            perplexity=built["llama-perplexity"],
            outtype=args.convert_outtype,
        )
    inputs: dict[str, Path] = {}
    smollm2 = args.smollm2_dir or bc.prepare_smollm2(mlxedge, import_problem)
    if smollm2 is not None:
        inputs["smollm2"] = smollm2.resolve()
    if "llama1b" in args.models or "llama1b" in args.kquant_models:
        inputs["llama1b"] = bc.prepare_llama1b()

    if "speed" in args.parts:
        run_speed(args, tools, inputs, reports["speed"])
    if "quality" in args.parts and "smollm2" in inputs:
        run_quality(args, tools, inputs["smollm2"], reports["quality"])
    if "kquant" in args.parts:
        run_kquant(args, inputs, reports["kquant"])

    blocks = {block_name(p, args.text): render(r, tools, p) for p, r in reports.items()}
    print()
    print("\n\n".join(blocks.values()))
    if not args.no_write:
        write_results(blocks)
        print(f"\nwritten to {RESULTS_MD}")
    return int(any(r.failed for r in reports.values()))


if __name__ == "__main__":
    sys.exit(main())
