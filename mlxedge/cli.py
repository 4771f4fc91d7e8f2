"""The `mlxedge` command: a thin click group over the pipeline functions."""

from __future__ import annotations

import logging
import math
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import MlxedgeError

console = Console(stderr=True)
out = Console()


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


class _Group(click.Group):
    """Turns MlxedgeError into one clear message and exit code 2, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlxedgeError as e:
            _fail(e)
        except KeyboardInterrupt:
            console.print("interrupted; nothing was written")
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxedge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Quantize language models for Apple Silicon and export MLX folders.

    MODEL, wherever a command takes one, is a Hugging Face folder, a Hub id (org/name), a .gguf
    file, or `smollm2` (the built-in SmolLM2-135M-Instruct).
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s"
    )


def _card_command(model: str, opts: dict) -> str:
    """The command stated in the model card: options in a fixed order, no output path."""
    parts = ["mlxedge", "quantize", Path(model).name if Path(model).exists() else model]
    for key in (
        "bits",
        "group_size",
        "method",
        "recipe",
        "dtype",
        "embed_bits",
        "embed_group_size",
    ):
        if opts.get(key) is not None:
            parts += [f"--{key.replace('_', '-')}", str(opts[key])]
    for ov in opts.get("override", ()):
        parts += ["--override", ov]
    return shlex.join(parts)


@main.command()
@click.argument("model")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output folder. Default: <model>-<bits>bit-g<group>[...] in the current directory.",
)
@click.option(
    "--bits", type=int, default=4, show_default=True, help="Bits per weight: 2, 3, 4, 5, 6 or 8."
)
@click.option(
    "--group-size",
    type=int,
    default=64,
    show_default=True,
    help="Weights per scale/bias: 32, 64 or 128.",
)
@click.option(
    "--method",
    type=click.Choice(["rtn", "mse"]),
    default="rtn",
    show_default=True,
    help="rtn: MLX's rounding (bit-exact with mx.quantize). "
    "mse: per-group search for least squared error.",
)
@click.option(
    "--recipe",
    type=click.Choice(["uniform", "mixed"]),
    default="uniform",
    show_default=True,
    help="mixed: v_proj/down_proj of llama.cpp's Q4_K_M layers and the output head get more bits.",
)
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
@click.option("--revision", help="Hub revision (branch, tag or commit) for a Hub id.")
@click.option("-f", "--force", is_flag=True, help="Replace the output if it exists.")
def quantize(
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
    revision,
    force,
):
    """Quantize MODEL into an MLX folder that mlx-lm and mlx-swift-lm load."""
    from .pipeline import default_output_name, quantize_to_mlx
    from .quant.recipes import Override, QuantOptions
    from .source import resolve

    opts = QuantOptions(
        bits=bits,
        group_size=group_size,
        recipe=recipe,
        embed_bits=embed_bits,
        embed_group_size=embed_group_size,
        overrides=tuple(Override.parse(o) for o in override),
    )
    source = resolve(model, revision=revision)
    output = output or Path(default_output_name(source, opts, method))
    command = _card_command(
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
        state = {}

        def on_plan(plans):
            total = sum(math.prod(p.info.shape) for p in plans)
            state["task"] = progress.add_task(f"quantizing {source.name}", total=total)

        def on_tensor(plan):
            n = math.prod(plan.info.shape)
            progress.advance(state["task"], n)

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


if __name__ == "__main__":  # pragma: no cover
    main()
