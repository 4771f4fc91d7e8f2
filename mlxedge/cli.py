"""The `mlxedge` command: a thin click group over the pipeline functions."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .atomic import check_output
from .errors import MlxedgeError
from .quant.defaults import DEFAULT_METHOD, DEFAULT_RECIPE, METHODS, RECIPES
from .runtime import BACKENDS

console = Console(stderr=True)
log = logging.getLogger(__name__)
# Wider than the 80 columns rich assumes when output is piped (CI logs, files): tables stay legible.
out = Console(width=None if sys.stdout.isatty() else 132)


def _fail(err: MlxedgeError) -> None:
    # click.echo, not rich: an error message must never be re-wrapped (paths stay greppable).
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def _plan_progress(progress: Progress, label: str):
    """(on_plan, on_tensor) callbacks that drive one bar by parameters written."""
    state = {}

    def on_plan(plans) -> None:
        state["task"] = progress.add_task(label, total=sum(p.params for p in plans))

    def on_tensor(plan) -> None:
        progress.advance(state["task"], plan.params)

    return on_plan, on_tensor


def _positive_finite(ctx, param, value: float | None) -> float | None:
    """A click callback: the value must be a positive finite number (NaN passes FloatRange)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a positive finite number")
    return value


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT would raise KeyboardInterrupt, so it cleans up the same way."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def _interrupted(exc: KeyboardInterrupt) -> None:
    from .atomic import COMMITTED

    how = "terminated" if isinstance(exc, _Terminated) else "interrupted"
    if COMMITTED:
        done = ", ".join(str(p) for p in COMMITTED)
        click.echo(f"{how}; complete before the interruption: {done}; nothing else was kept",
                   err=True)  # fmt: skip
    else:
        click.echo(f"{how}; nothing was written", err=True)
    sys.exit(143 if isinstance(exc, _Terminated) else 130)


class _Group(click.Group):
    """Turns MlxedgeError into one clear message and exit code 2, for every command; SIGTERM
    and SIGINT into removed temporaries, a message saying what was kept, and exit 143 / 130."""

    def invoke(self, ctx):
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().invoke(ctx)
        except MlxedgeError as e:
            _fail(e)
        except KeyboardInterrupt as e:
            _interrupted(e)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxedge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Quantize language models for Apple Silicon and export MLX folders, GGUF files and Core ML
    packages.

    MODEL, wherever a command takes one, is a Hugging Face folder, a Hub id (org/name), a .gguf
    file, an MLX folder, a Core ML export, or `smollm2` (the built-in SmolLM2-135M-Instruct).
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )
    if verbose < 2:  # libraries' import-time notes: no Core ML runtime off macOS, no PyTorch
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# Options that quantize and export coreml share: one definition each.
_GROUP_SIZE = click.option(
    "--group-size",
    type=int,
    default=64,
    show_default=True,
    help="Weights per scale/bias: 32, 64 or 128.",
)
_METHOD = click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default=DEFAULT_METHOD,
    show_default=True,
    help="rtn: MLX's rounding (bit-exact with mx.quantize). "
    "mse: per-group search for least squared error. "
    "mse-zero: the same search among grids that keep zero exact.",
)
_RECIPE = click.option(
    "--recipe",
    type=click.Choice(list(RECIPES)),
    default=DEFAULT_RECIPE,
    show_default=True,
    help="mixed: v_proj/down_proj of llama.cpp's Q4_K_M layers and the output head get more bits.",
)


def _set_kernels(ctx, param, value: str | None) -> None:
    from .quant import backend

    try:
        backend.set_kernels(value)
    except MlxedgeError as e:
        raise click.BadParameter(f"{e.message}; {e.fix}" if e.fix else e.message) from None


_KERNELS = click.option(
    "--kernels",
    type=click.Choice(["metal", "native", "numpy"]),
    expose_value=False,
    callback=_set_kernels,
    help="Which quantizer implementation runs (the same bytes from each): metal (Apple GPU), "
    "native (C, every core) or numpy (the specification). Default: the fastest here; -v says "
    "which ran.",
)


def _gguf_type_option(help_text: str):
    return click.option("--type", "type_name", metavar="TYPE", help=help_text)


@main.command()
@click.argument("model")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output folder (with --format gguf: file). Default: <model>-<bits>bit-g<group>[...], "
    "or <model>-<TYPE>.gguf, in the current directory.",
)
@click.option(
    "--bits", type=int, default=4, show_default=True, help="Bits per weight: 2, 3, 4, 5, 6 or 8."
)
@_GROUP_SIZE
@_METHOD
@_RECIPE
@_KERNELS
@click.option(
    "--override",
    multiple=True,
    metavar="REGEX=BITS[:GROUP]",
    help="Per-tensor scheme; REGEX fully matches the module path; last match wins; "
    "BITS 16 keeps float. Repeatable.",
)
@click.option(
    "--embed-bits",
    type=int,
    help="Bits of the token embedding (16: keep in float). Default: as the recipe decides.",
)
@click.option(
    "--embed-group-size", type=int, help="Group size of the token embedding. Default: --group-size."
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Dtype of scales, biases and float tensors. "
    "Default: the source's 16-bit dtype; bfloat16 for a float32 source.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mlx", "gguf", "coreml"]),
    default="mlx",
    show_default=True,
    help="mlx: an MLX folder. gguf: a GGUF file (same as `mlxedge export gguf`). coreml: a "
    "Core ML package folder (same as `mlxedge export coreml`).",
)
@_gguf_type_option(
    "With --format gguf: the llama.cpp file type (see `mlxedge export gguf -h`). "
    "Default from --bits: 2 Q2_K, 3 Q3_K_M, 4 Q4_K_M, 5 Q5_K_M, 6 Q6_K, 8 Q8_0."
)
@click.option("--pre-tokenizer", metavar="NAME", help="With --format gguf: see export gguf.")
@click.option("--ollama", is_flag=True, help="With --format gguf: also write a Modelfile.")
@click.option("--revision", help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option("-f", "--force", is_flag=True, help="Replace the output if it exists.")
@click.pass_context
def quantize(
    ctx,
    model,
    output,
    bits,
    group_size,
    method,
    recipe,
    override,
    embed_bits,
    embed_group_size,
    dtype,
    fmt,
    type_name,
    pre_tokenizer,
    ollama,
    revision,
    force,
):
    """Quantize MODEL into an MLX folder that mlx-lm and mlx-swift-lm load (or a GGUF file)."""
    if fmt == "gguf":
        mlx_only = ("group_size", "method", "recipe", "override", "embed_bits",
                    "embed_group_size", "dtype")  # fmt: skip
        given = [k for k in mlx_only if ctx.get_parameter_source(k).name == "COMMANDLINE"]
        if given:
            raise MlxedgeError(
                f"--{given[0].replace('_', '-')} applies to MLX folders, not GGUF files",
                fix="choose the GGUF type with --type (e.g. --type Q4_K_M)",
            )
        if type_name is not None and ctx.get_parameter_source("bits").name == "COMMANDLINE":
            raise MlxedgeError("pass --bits or --type, not both", fix="--type alone names the mix")
        from .formats.gguf.mixes import MIX_FOR_BITS

        if type_name is None and bits not in MIX_FOR_BITS:
            raise MlxedgeError(f"no GGUF type for --bits {bits}", fix="pass --type")
        type_name = type_name or MIX_FOR_BITS[bits]
        _export_gguf(model, output, type_name, False, pre_tokenizer, ollama, revision, force)
        return
    if type_name or pre_tokenizer or ollama:
        raise MlxedgeError("--type, --pre-tokenizer and --ollama need --format gguf")
    if fmt == "coreml":
        if override or embed_bits or embed_group_size or dtype:
            raise MlxedgeError(
                "--override, --embed-bits, --embed-group-size and --dtype apply to MLX folders",
                fix="use `mlxedge quantize` first, then `mlxedge export coreml` on its folder",
            )
        ctx.invoke(export_coreml, model=model, output=output, bits=bits, group_size=group_size,
                   method=method, recipe=recipe, context=2048, revision=revision,
                   force=force)  # fmt: skip
        return
    from .formats.mlx import card_command, default_output_name, quantize_to_mlx
    from .quant.recipes import Override, QuantOptions
    from .source import local_path, resolve

    opts = QuantOptions(
        bits=bits,
        group_size=group_size,
        recipe=recipe,
        embed_bits=embed_bits,
        embed_group_size=embed_group_size,
        overrides=tuple(Override.parse(o) for o in override),
    )
    if output is not None:  # before any download or work
        check_output(output, force, protect=[local_path(model)])
    source = resolve(model, revision=revision)
    output = output or Path(default_output_name(source, opts, method))
    command = card_command(
        model,
        dict(
            bits=bits,
            group_size=group_size,
            method=method,
            recipe=recipe,
            dtype=dtype,
            embed_bits=embed_bits,
            embed_group_size=embed_group_size,
            override=override,
        ),
    )
    with _progress() as progress:
        on_plan, on_tensor = _plan_progress(progress, f"quantizing {source.name}")
        report = quantize_to_mlx(
            source,
            output,
            opts,
            method=method,
            dtype=dtype,
            force=force,
            command=command,
            on_plan=on_plan,
            on_tensor=on_tensor,
        )
    _print_report(report)


def _print_report(report) -> None:
    table = Table(title=f"{report.output}", title_justify="left")
    for col in (
        "scheme",
        "tensors",
        "MiB before",
        "MiB after",
        "mean rel. error",
        "worst rel. error",
    ):
        table.add_column(col, justify="right" if col != "scheme" else "left")
    groups: dict[str, list] = {}
    for r in report.rows:
        key = f"{r.scheme.bits}-bit g{r.scheme.group_size}" if r.scheme else "float"
        groups.setdefault(key, []).append(r)
    for key in sorted(groups):
        rows = groups[key]
        errs = [r.rel_rmse for r in rows if r.rel_rmse is not None]
        table.add_row(
            key,
            str(len(rows)),
            f"{sum(r.bytes_in for r in rows) / 2**20:.1f}",
            f"{sum(r.bytes_out for r in rows) / 2**20:.1f}",
            f"{sum(errs) / len(errs):.4f}" if errs else "-",
            f"{max(errs):.4f}" if errs else "-",
        )
    table.add_row(
        "total",
        str(len(report.rows)),
        f"{report.bytes_in / 2**20:.1f}",
        f"{report.bytes_out / 2**20:.1f}",
        "",
        "",
        style="bold",
    )
    out.print(table)
    out.print(
        f"{report.params:,} parameters, {report.bits_per_weight:.3f} bits per weight "
        f"({report.method}, {report.dtype} scales)"
    )
    if report.quantized:
        worst = max(report.quantized, key=lambda r: r.rel_rmse)
        out.print(
            f"worst tensor: {worst.name} (relative RMS error {worst.rel_rmse:.4f}, "
            f"max |error| {worst.max_abs:.3g})",
            soft_wrap=True,
        )
    for r in report.kept:
        out.print(f"[yellow]kept in float:[/] {r.name}: {r.note}", soft_wrap=True)


def _export_gguf(model, output, type_name, pure, pre_tokenizer, ollama, revision, force) -> None:
    """Shared by `export gguf` and `quantize --format gguf`: write, show progress, report."""
    from .formats.gguf.mixes import mix_named
    from .formats.gguf.writer import write_gguf
    from .source import resolve

    if type_name is not None:
        type_name = mix_named(type_name).name  # unknown names fail before any work
    if pre_tokenizer is not None:
        from .formats.gguf.tokenizer_export import check_pre_tokenizer

        pre_tokenizer = check_pre_tokenizer(pre_tokenizer)
    from .formats.gguf.ollama import modelfile_path
    from .source import local_path

    def check_outputs(path: Path, protect=()) -> None:
        check_output(path, force, protect)
        if ollama:
            check_output(modelfile_path(path), force, protect)

    if output is not None:  # before any download or conversion
        check_outputs(Path(output), [local_path(model)])
    source = resolve(model, revision)
    sources = (source.path,)
    if source.kind != "mlx" and type_name is None:
        type_name = "Q4_K_M"
    if source.kind == "mlx" and type_name is None and pure:
        raise MlxedgeError("--pure needs --type", fix="e.g. --type Q4_K_S --pure")
    if output is None:  # <model>-<TYPE>.gguf, or <folder>.gguf for an MLX folder's own precision
        output = f"{source.name}-{type_name}.gguf" if type_name else f"{source.name}.gguf"
    output = Path(output)
    check_outputs(output, sources)
    with _progress() as progress:
        on_plan, on_tensor = _plan_progress(progress, f"writing {output.name}")
        report = write_gguf(
            source,
            output,
            type_name,
            pre_tokenizer=pre_tokenizer,
            pure=pure,
            force=force,
            on_plan=on_plan,
            on_tensor=on_tensor,
            ollama=ollama,
        )
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    _print_gguf_report(report)
    if report.modelfile is not None:
        m = report.modelfile
        out.print(f"wrote {m} (ollama create NAME -f {m})")


def _print_gguf_report(report) -> None:
    table = Table(title=f"{report.output} ({report.mix})", title_justify="left")
    for col in ("type", "tensors", "parameters", "MiB", "bits per weight"):
        table.add_column(col, justify="right" if col != "type" else "left")
    params = 0
    for type_name, count, n, nbytes in report.by_target():
        params += n
        table.add_row(type_name, str(count), f"{n:,}", f"{nbytes / 2**20:.1f}",
                      f"{nbytes * 8 / n:.3f}")  # fmt: skip
    table.add_row("total", str(len(report.rows)), f"{params:,}",
                  f"{report.bytes_out / 2**20:.1f}", f"{report.bytes_out * 8 / params:.3f}",
                  style="bold")  # fmt: skip
    out.print(table)


@main.group()
def export() -> None:
    """Export a model for another runtime (GGUF for llama.cpp, Ollama, LM Studio; Core ML for
    Swift apps)."""


@export.command("gguf")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="GGUF file to write. Default: <model>-<TYPE>.gguf in the current directory.",
)
@_gguf_type_option(
    "llama.cpp file type: Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, "
    "Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16, F32 (the same per-tensor types as llama-quantize). "
    "Default: Q4_K_M; for an MLX folder, its own precision (4/5-bit groups repacked losslessly)."
)
@click.option(
    "--pure",
    is_flag=True,
    help="Every quantized tensor gets the type's base type (llama-quantize --pure).",
)
@click.option(
    "--pre-tokenizer",
    metavar="NAME",
    help="llama.cpp pre-tokenizer name (e.g. llama-bpe, qwen2, smollm, gpt-2). "
    "Default: read from tokenizer.json.",
)
@click.option("--ollama", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF.")
@_KERNELS
@click.option("--revision", help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option("-f", "--force", is_flag=True, help="Replace the output if it exists.")
def export_gguf(model, output, type_name, pure, pre_tokenizer, ollama, revision, force):
    """Write MODEL (or an MLX folder) as a GGUF file for llama.cpp, Ollama and LM Studio."""
    _export_gguf(model, output, type_name, pure, pre_tokenizer, ollama, revision, force)


@export.command("coreml")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output folder. Default: <model>-coreml-<bits>bit in the current directory.",
)
@click.option(
    "--bits",
    type=int,
    default=4,
    show_default=True,
    help="Bits per weight: 2, 3, 4, 5, 6, 8, or 16 (float16). An MLX folder keeps its own.",
)
@_GROUP_SIZE
@_METHOD
@_RECIPE
@_KERNELS
@click.option(
    "--context",
    type=click.IntRange(2, 1 << 20),
    default=2048,
    show_default=True,
    help="KV-cache slots (the longest sequence the package runs).",
)
@click.option("--revision", help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option("-f", "--force", is_flag=True, help="Replace the output if it exists.")
@click.pass_context
def export_coreml(ctx, model, output, bits, group_size, method, recipe, context, revision, force):
    """Write MODEL as a stateful Core ML package folder for Swift apps (swift-transformers)."""
    from .formats.coreml.writer import export_coreml as run
    from .quant.recipes import QuantOptions
    from .source import local_path, resolve

    opts = QuantOptions(bits=bits, group_size=group_size, recipe=recipe) if bits != 16 else None
    if output is not None:
        check_output(output, force, protect=[local_path(model)])
    source = resolve(model, revision=revision)
    if source.quantization is not None:
        given = [k for k in ("bits", "group_size", "method", "recipe")
                 if ctx.get_parameter_source(k).name == "COMMANDLINE"]  # fmt: skip
        if given:
            raise MlxedgeError(
                f"--{given[0].replace('_', '-')} does not apply: an MLX folder keeps its own "
                "quantization",
                path=source.path,
                fix="export the original model to choose another quantization",
            )
    label = "float16" if bits == 16 else f"{bits}bit"
    output = output or Path(f"{source.name}-coreml-{label}")
    with console.status(f"exporting {source.name} to Core ML"):
        report = run(source, output, opts, method=method, context=context, force=force)
    out.print(f"wrote {report.package} (context {report.context}; {report.carried} tensors carried "
              f"as block-wise constants, {len(report.as_float)} as float16)")  # fmt: skip
    out.print(
        f"  {report.widened_summary()}; float16 offsets off by at most "
        f"{report.max_offset_error:.3g} per weight (bound {report.offset_bound:.3g})"
    )
    for name, bits, container in report.widened:
        log.info("widened: %s (%d-bit codes in uint%d)", name, bits, container)
    for name, why in report.as_float:
        log.info("float16: %s (%s)", name, why)


@main.command("import")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Hugging Face folder to write.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Dtype of the written tensors (float32 keeps dequantized values exact).",
)
@click.option("-f", "--force", is_flag=True, help="Replace the output if it exists.")
def import_(gguf_file, output, dtype, force):
    """Convert a GGUF file into a Hugging Face folder (config, safetensors, tokenizer)."""
    from .formats.hf import write_hf_folder
    from .source import resolve

    check_output(output, force, protect=[gguf_file])
    source = resolve(str(gguf_file))
    infos = source.weights.infos()
    with _progress() as progress:
        task = progress.add_task(f"importing {source.name}", total=len(infos))
        write_hf_folder(
            source, output, dtype=dtype, force=force, on_tensor=lambda _: progress.advance(task)
        )
    out.print(f"wrote {output} ({source.config.get('model_type')}, {len(infos)} tensors, {dtype})")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
def inspect(path):
    """Describe a Hugging Face folder, an MLX folder or a GGUF file."""
    from .inspect import describe

    d = describe(path)
    out.print(f"[bold]{d.path}[/]: {d.kind}, architecture {d.architecture}")
    for k, v in d.facts.items():
        out.print(f"  {k}: {v}")
    out.print(f"  tensors: {d.tensors}")
    for t, n in sorted(d.types.items()):
        out.print(f"    {t}: {n}")
    out.print(f"  parameters: {d.params:,}")
    out.print(f"  size: {d.size / 2**20:,.1f} MiB ({d.bits_per_weight:.3f} bits per weight)")


def _eval_progress():
    """A rich progress bar driven by the harness's (label, done, total) callback."""
    bar = _progress()
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done)

    return bar, update


def _fmt(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


@main.command("eval")
@click.argument("candidate")
@click.option("--reference", "reference", help="MODEL to compare with (KL divergence, top-1).")
@click.option("--text", "text_spec", help="UTF-8 text file, or `anchors` / `choice` (see README).")
@click.option(
    "--ctx",
    type=click.IntRange(4, 1 << 20),
    default=512,
    show_default=True,
    help="Window length in tokens (at least 4).",
)
@click.option(
    "--windows",
    "max_windows",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Evaluate at most this many windows (0: the whole text).",
)
@click.option(
    "--backend",
    type=click.Choice(["reference", "mlx"]),
    default="reference",
    show_default=True,
    help="Where the candidate runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(candidate, reference, text_spec, ctx, max_windows, backend, as_json):
    """Perplexity of CANDIDATE on a text, and its KL divergence from a reference model.

    CANDIDATE is an MLX folder or any MODEL. The protocol is llama.cpp's perplexity tool's:
    non-overlapping windows of --ctx tokens, predictions from the middle of each window scored.
    """
    import json as json_

    from .harness import evaluate
    from .source import resolve
    from .texts import load_text

    if ctx < 16:
        raise MlxedgeError(f"--ctx {ctx} is too small", fix="use at least 16 (default 512)")
    text = load_text(text_spec)
    cand = resolve(candidate)
    ref = resolve(reference) if reference else None
    bar, update = _eval_progress()
    with bar:
        result = evaluate(cand, ref, text, ctx, max_windows or None, backend, update)
    if as_json:
        click.echo(json_.dumps(result, indent=2))
        return
    table = Table(
        title=f"{result['model']} on {result['backend']} ({result['device']})", title_justify="left"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("text", result["text"]),
        ("protocol", result["protocol"]),
        ("tokens scored", str(result["tokens"])),
        ("perplexity", _fmt(result["ppl"], 5)),
    ]
    if ref is not None:
        rows += [
            ("reference", result["reference"]),
            ("reference perplexity", _fmt(result["ref_ppl"], 5)),
            ("KL mean", _fmt(result["kl_mean"])),
            ("KL median", _fmt(result["kl_median"])),
            ("KL 99th percentile", _fmt(result["kl_p99"])),
            ("KL max", _fmt(result["kl_max"])),
            ("top-1 agreement", f"{100 * result['top1']:.2f}%"),
            ("max |logit difference|", _fmt(result["max_abs_logit"])),
        ]
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


@main.command()
@click.argument("artifacts", nargs=-1, required=True)
@click.option("--reference", required=True, help="The original MODEL the artifacts came from.")
@click.option(
    "--backends",
    default=",".join(BACKENDS),
    show_default=True,
    help="Comma-separated backends to run each artifact on.",
)
@click.option(
    "--max-kl",
    type=float,
    default=None,
    callback=_positive_finite,
    help="Quality gate: largest mean KL divergence from the reference (default: 1.5 times the "
    "KL of the artifact's plain twin on the same tokens, see README).",
)
@click.option("--text", "text_spec", help="UTF-8 text file, or `anchors` / `choice`.")
@click.option(
    "--ctx",
    type=click.IntRange(4, 1 << 20),
    default=512,
    show_default=True,
    help="Window length in tokens (at least 4).",
)
@click.option(
    "--windows",
    "max_windows",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Windows per run of the full protocol (0: the whole text).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="A backend that cannot run an artifact fails the run instead of being skipped "
    "(for CI: green means every backend ran).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def crosscheck(
    artifacts, reference, backends, max_kl, text_spec, ctx, max_windows, strict, as_json
):
    """Run every ARTIFACT on every backend and gate fidelity and quality.

    Fidelity: each backend against the numpy reference run on the artifact's own weights.
    Quality: against the original model (--reference), mean KL at most 1.5 times that of the
    artifact's plain twin (the same storage by round-to-nearest / llama.cpp's quantizer), or
    --max-kl.
    Exit code 1 when any gate fails (skipped backends do not fail, unless --strict).
    """
    import dataclasses
    import json as json_

    from .harness import crosscheck as run_crosscheck
    from .source import resolve
    from .texts import load_text

    names = tuple(b.strip() for b in backends.split(",") if b.strip())
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise MlxedgeError(
            f"unknown backend {unknown[0] if unknown else '(none)'}",
            fix=f"choose from {', '.join(BACKENDS)}",
        )
    text = load_text(text_spec)
    ref = resolve(reference)
    arts = [resolve(a) for a in artifacts]
    bar, update = _eval_progress()
    with bar:
        rows = run_crosscheck(arts, ref, text, names, ctx, max_windows or None, max_kl, update)
    if as_json:
        click.echo(
            json_.dumps([dataclasses.asdict(r) | {"passed": r.passed} for r in rows], indent=2)
        )
    else:
        table = Table(title=f"cross-check against {ref.name} on {text.name}", title_justify="left")
        for col in (
            "artifact",
            "backend",
            "tokens",
            "fidelity",
            "mean KL",
            "ppl",
            "top-1",
            "result",
        ):
            table.add_column(
                col,
                justify="right" if col in ("tokens", "ppl", "top-1") else "left",
                no_wrap=col == "artifact",  # artifacts often differ only at the end of the name
            )
        for r in rows:
            if r.skipped:
                table.add_row(r.artifact, r.backend, "—", "—", "—", "—", "—", "skipped")
                continue
            q = r.quality
            result = "pass" if r.passed else ("FAIL quality" if r.fidelity_ok else "FAIL fidelity")
            table.add_row(
                r.artifact,
                f"{r.backend} ({r.device})",
                str(q["tokens"]),
                r.fidelity_limit,
                f"{q['kl_mean']:.4f} <= {r.max_kl:.4g}",
                f"{q['ppl']:.3f}",
                f"{100 * q['top1']:.1f}%",
                result,
            )
        out.print(table)
        for proto in sorted({r.protocol for r in rows if r.protocol}):
            out.print(f"protocol: {proto}")
        for ceiling in sorted({r.ceiling for r in rows if not r.skipped}):
            out.print(f"KL ceiling: {ceiling}", soft_wrap=True)
        for r in rows:
            if r.skipped:
                out.print(f"skipped {r.artifact} on {r.backend}: {r.skipped}", soft_wrap=True)
            elif r.suspects:
                named = ", ".join(f"{s.name} ({s.ratio:.3g}x)" for s in r.suspects)
                out.print(f"{r.artifact}: furthest from the original relative to the plain twin's "
                          f"error: {named}", soft_wrap=True)  # fmt: skip
    if strict and any(r.skipped for r in rows):
        click.echo("error: --strict: a backend was skipped (see above)", err=True)
        sys.exit(1)
    if not all(r.passed for r in rows):
        sys.exit(1)


@main.command()
@click.argument("model")
@click.option("--memory", required=True, help="Budget for weights + KV cache, e.g. 8GB (GB = GiB).")
@click.option(
    "--context",
    type=click.IntRange(1, 1 << 32),
    default=4096,
    show_default=True,
    help="Context length the KV cache is sized for (float16).",
)
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default=None,
    help="Method the settings use (default: the default method).",
)
@click.option(
    "--top", type=click.IntRange(min=1), default=10, show_default=True,
    help="Show this many settings.",
)  # fmt: skip
@click.option("--revision", help="Hub revision (Hub ids only; only config.json is fetched).")
@click.option("--json", "as_json", is_flag=True, help="Print the settings as JSON.")
def recommend(model, memory, context, method, top, revision, as_json):
    """Settings of MODEL whose weights and KV cache fit --memory, best quality first.

    Quality is the mean KL divergence measured on SmolLM2 (bench/quality.py, choice text), or
    interpolated where not measured; a larger model loses less at the same setting.
    """
    from .recommend import model_config, parse_memory
    from .recommend import recommend as rank

    budget = parse_memory(memory)
    name, config = model_config(model, revision)
    choices = rank(config, budget, context, method)
    if not choices:
        raise MlxedgeError(
            f"no setting of {name} fits {memory} with a {context}-token KV cache",
            fix="raise --memory, lower --context, or pick a smaller model",
        )
    if as_json:
        import dataclasses
        import json as json_

        rows = [dataclasses.asdict(c) | {"command": c.command(model)} for c in choices[:top]]
        click.echo(json_.dumps(rows, indent=2))
        return
    gib = 2**30
    table = Table(
        title=f"{name} in {budget / gib:.1f} GiB with {context} tokens of context "
        f"(KV cache {choices[0].kv_bytes / gib:.2f} GiB)",
        title_justify="left",
    )
    for col in (
        "bits",
        "group",
        "recipe",
        "method",
        "weights GiB",
        "total GiB",
        "mean KL",
        "command",
    ):
        table.add_column(
            col,
            justify="right"
            if col in ("bits", "group", "weights GiB", "total GiB", "mean KL")
            else "left",
        )
    for c in choices[:top]:
        kl = "—" if c.kl is None else f"{c.kl:.3g}" + ("" if c.measured else " (est.)")
        table.add_row(
            str(c.bits),
            str(c.group_size),
            c.recipe,
            c.method,
            f"{c.weights_bytes / gib:.2f}",
            f"{c.total_bytes / gib:.2f}",
            kl,
            c.command(model),
        )
    out.print(table)
    out.print("mean KL: measured on SmolLM2-135M (bench/RESULTS.md); larger models lose less.")


if __name__ == "__main__":  # pragma: no cover
    main()
