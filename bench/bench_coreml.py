"""Core ML export: `mlxedge export coreml` vs coremltools' own quantizer, same run, same machine.

Both start from the same float Hugging Face folder and end with a saved 4.5-bit `.mlpackage`:

    mlxedge      `mlxedge export coreml SRC --bits 4 --recipe uniform --group-size 64 --method M`
                 (``--methods``: mse-zero, the default, and mse): MLX's
                 affine codes (4 bits, float16 scale and bias per 64 weights) carried into
                 `constexpr_blockwise_shift_scale` constants;
    coremltools  the same program built with float16 weights, then
                 `ct.optimize.coreml.linear_quantize_weights` (`linear_symmetric`, int4,
                 per-block 32: 4 bits and a float16 scale per 32 weights) — the quantization of
                 Apple's Llama 3.1 recipe — and saved (this script, `--coremltools-export`).

Each is a whole process timed from start to exit (import, load, quantize, build, save), with its
peak RSS from GNU time, median over ``--runs``. Quality (SmolLM2 only; the 1B shape has random
weights) is the mean KL divergence against the original float model over ``--windows`` 512-token
windows, both packages run by the numpy interpreter of the saved program (`coreml-interp`).

Usage:
    python bench/bench_coreml.py [--models smollm2,llama1b] [--runs 1] [--context 1024]

Inputs are cached under ``bench/work/`` (see bench_convert.py). The table is written into
``bench/RESULTS.md`` between ``<!-- coreml-bench:start -->`` and ``<!-- coreml-bench:end -->``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import (  # noqa: E402 - the bench folder is not a package
    WORK_DIR,
    _csv,
    cli_unavailable,
    machine_and_versions,
    mlxedge_executable,
    prepare_llama1b,
    prepare_smollm2,
    run_measured,
    short_arg,
    write_results,
)

START_MARKER, END_MARKER = "<!-- coreml-bench:start -->", "<!-- coreml-bench:end -->"
MODELS = ("smollm2", "llama1b")
LABELS = {"smollm2": "SmolLM2-135M (fp32)", "llama1b": "Llama-3.2-1B shape (bf16)"}
METHODS = ("rtn", "mse", "mse-zero")
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")


@dataclass
class Case:
    tool: str
    model: str
    argv: list[str]
    out: Path
    walls: list[float] = field(default_factory=list)
    peaks_kib: list[int] = field(default_factory=list)
    error: str | None = None
    weight_bytes: int | None = None
    kl: float | None = None
    tokens: int | None = None


def package_of(out: Path) -> Path:
    return out if out.suffix == ".mlpackage" else next(out.glob("*.mlpackage"))


# ---------------------------------------------------------------------------------------------
# The coremltools path, run as its own process


def coremltools_export(source: Path, out: Path, context: int) -> None:
    """The float16 program of `source`, quantized by coremltools (int4 per-block 32), saved."""
    import coremltools as ct
    import coremltools.optimize as cto

    from mlxedge.formats.coreml.program import WeightSource, build_program, convert_program
    from mlxedge.source import resolve

    model = resolve(str(source))
    weights = WeightSource(model.weights.read, lambda name: None)  # every weight float16
    mlmodel = convert_program(build_program(model.arch, weights, context), context)
    config = cto.coreml.OptimizationConfig(
        global_config=cto.coreml.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
    )
    quantized = cto.coreml.linear_quantize_weights(mlmodel, config=config)
    del mlmodel
    out.mkdir(parents=True, exist_ok=True)
    quantized.save(str(out / f"{model.name}.mlpackage"))
    assert isinstance(quantized, ct.models.MLModel)


# ---------------------------------------------------------------------------------------------
# Measuring


def build_cases(models: dict[str, Path], mlxedge: str, context: int,
                methods: list[str]) -> list[Case]:  # fmt: skip
    cases = []
    for model, src in models.items():
        for method in methods:
            ours = WORK_DIR / f"coreml-{model}-mlxedge-{method}"
            cases.append(Case(f"mlxedge {method}", model, [
                mlxedge, "export", "coreml", str(src), "--bits", "4", "--recipe", "uniform",
                "--group-size", "64", "--method", method, "--context", str(context),
                "-o", str(ours), "--force",
            ], ours))  # fmt: skip
        theirs = WORK_DIR / f"coreml-{model}-coremltools"
        cases.append(Case("coremltools", model, [
            sys.executable, str(Path(__file__).resolve()), "--coremltools-export", str(src),
            str(theirs), "--context", str(context),
        ], theirs))  # fmt: skip
    return cases


def measure(cases: list[Case], runs: int) -> None:
    for run in range(runs):
        for case in cases:
            if case.error:
                continue
            shutil.rmtree(case.out, ignore_errors=True)
            log = WORK_DIR / f"{case.out.name}.log"
            print(f"[{run + 1}/{runs}] {case.tool} {case.model} ...", flush=True)
            wall, peak, code = run_measured(case.argv, log)
            if code != 0:
                case.error = f"exit code {code} (see {log})"
                continue
            case.walls.append(wall)
            case.peaks_kib.append(peak)
            case.weight_bytes = (package_of(case.out) / WEIGHTS).stat().st_size
            print(f"    {wall:.1f} s, {peak / 1024:.0f} MiB", flush=True)


def measure_quality(cases: list[Case], original: Path, windows: int) -> None:
    """Mean KL against the original over `windows` 512-token windows, through the interpreter."""
    from mlxedge.harness import bos_id, full_protocol, score
    from mlxedge.runtime.coreml_backend import CoreMLInterpBackend
    from mlxedge.runtime.coreml_interp import Program
    from mlxedge.runtime.reference import ReferenceBackend
    from mlxedge.source import resolve
    from mlxedge.texts import check_ids, load_text, tokenize

    model = resolve(str(original))
    text = load_text(None)
    ids = tokenize(text, model.tokenizer)
    check_ids(ids, model.arch.spec.vocab_size, model.tokenizer.where)
    protocol = full_protocol(ids, 512, bos_id(model), windows, text)
    against = ReferenceBackend(model)
    for case in cases:
        if case.error or not case.walls:
            continue
        # Not `resolve`: coremltools renames the constants it quantizes, so only the program is
        # opened, which is all the backend runs.
        package = SimpleNamespace(
            kind="coreml",
            name=case.tool,
            weights=SimpleNamespace(program=Program(package_of(case.out))),
        )
        stats = score(CoreMLInterpBackend(package), protocol, against).summary()
        case.kl, case.tokens = stats["kl_mean"], stats["tokens"]
        print(f"    {case.tool}: KL {case.kl:.4f} over {case.tokens} tokens", flush=True)


# ---------------------------------------------------------------------------------------------
# Reporting


def table(cases: list[Case]) -> str:
    rows = [
        "| model | tool | wall s | ratio | peak MiB | ratio | weight.bin MiB | mean KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(c.model for c in cases):
        pair = {c.tool: c for c in cases if c.model == model}
        anchor = pair.get("coremltools")
        for tool, c in pair.items():
            if c.error or not c.walls:
                rows.append(f"| {LABELS[model]} | {tool} | failed: {c.error} | | | | | |")
                continue
            wall, peak = statistics.median(c.walls), max(c.peaks_kib) / 1024
            ratio_t = ratio_m = ""
            if anchor is not None and anchor.walls and tool != "coremltools":
                ratio_t = f"{wall / statistics.median(anchor.walls):.2f}x"
                ratio_m = f"{peak / (max(anchor.peaks_kib) / 1024):.2f}x"
            kl = f"{c.kl:.4f} ({c.tokens} tokens)" if c.kl is not None else "—"
            rows.append(f"| {LABELS[model]} | {tool} | {wall:.1f} | {ratio_t} | {peak:.0f} | "
                        f"{ratio_m} | {c.weight_bytes / 2**20:.1f} | {kl} |")  # fmt: skip
    return "\n".join(rows)


def report(cases: list[Case], args) -> str:
    command = shlex.join(["python", "bench/bench_coreml.py", *sys.argv[1:]])
    try:
        ct_version = importlib.metadata.version("coremltools")
    except importlib.metadata.PackageNotFoundError:
        ct_version = "(not installed)"
    return "\n".join([
        "### Core ML export: mlxedge vs coremltools' quantizer (4.5 bits per weight)",
        "",
        f"Whole processes from the float folder to the saved package (context {args.context}), "
        f"median wall time and largest peak RSS over {args.runs} run(s); ratios are mlxedge "
        "over coremltools (below 1 is better). mlxedge: `--recipe uniform --group-size 64 "
        "--method M` (affine, float16 scale and bias per 64; mse-zero is the default method). "
        "coremltools: the float16 program, then `linear_quantize_weights` (linear_symmetric, "
        "int4, per-block 32). KL: against the original float model, on the default text, "
        f"{args.windows} window(s) of 512 tokens, every package run by the interpreter of the "
        "saved program. SmolLM2's float weights come from the Q4_1 GGUF its package ships: its "
        "linear weights already lie on a 4-bit grid of blocks of 32, which coremltools' blocks "
        "of 32 align with and groups of 64 do not.",
        "",
        table(cases),
        "",
        *machine_and_versions(),
        f"- coremltools {ct_version}",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        "",
        "Command lines measured:",
        "",
        *(f"- `{shlex.join(short_arg(a) for a in c.argv)}`" for c in cases),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_csv(MODELS), default=list(MODELS))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--methods",
        type=_csv(METHODS),
        default=["mse-zero", "mse"],
        help="mlxedge's quantization methods to measure (first: the default)",
    )
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=2, help="KL windows (SmolLM2); 0: none")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    parser.add_argument("--coremltools-export", nargs=2, metavar=("SRC", "OUT"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.coremltools_export:
        src, out = args.coremltools_export
        coremltools_export(Path(src), Path(out), args.context)
        return 0
    mlxedge = mlxedge_executable()
    problem = cli_unavailable([mlxedge]) if mlxedge else "no mlxedge executable"
    if problem:
        print(f"cannot run: {problem}")
        return 1
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    sources = {}
    for model in args.models:
        src = prepare_smollm2(mlxedge, None) if model == "smollm2" else prepare_llama1b()
        if src is not None:
            sources[model] = src
    cases = build_cases(sources, mlxedge, args.context, args.methods)
    measure(cases, args.runs)
    if args.windows and "smollm2" in sources:
        measure_quality([c for c in cases if c.model == "smollm2"], sources["smollm2"],
                        args.windows)  # fmt: skip
    section = report(cases, args)
    print(section)
    if not args.no_write:
        write_results(section, markers=(START_MARKER, END_MARKER))
    print(json.dumps([{k: v for k, v in vars(c).items() if k not in ("argv", "out")}
                      for c in cases]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
