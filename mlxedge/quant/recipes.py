"""Which tensor gets which scheme: uniform and mixed recipes, embedding settings, overrides."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..archs import Architecture, Kind, Role
from ..errors import MlxedgeError
from ..model import TensorInfo
from .defaults import DEFAULT_RECIPE, RECIPES
from .schemes import SUPPORTED_BITS, AffineScheme, storage_dtype

if TYPE_CHECKING:
    from ..plan import TensorPlan


@dataclass(frozen=True)
class Override:
    """`REGEX=BITS[:GROUP]`: tensors whose module path fully matches REGEX get this scheme.

    BITS may be `16` (or `keep`) to leave the tensor unquantized.
    """

    pattern: re.Pattern
    bits: int | None  # None: keep in float
    group_size: int | None  # None: the tensor's planned group size

    @classmethod
    def parse(cls, text: str) -> Override:
        """Parse `REGEX=BITS[:GROUP]`.

        Raises:
            MlxedgeError: malformed text, a bad regex, or unsupported bits/group size.
        """
        regex, sep, spec = text.rpartition("=")
        if not sep or not regex:
            raise MlxedgeError(
                f"override {text!r} is not of the form REGEX=BITS[:GROUP]",
                fix="e.g. --override 'model\\.layers\\.0\\..*=8' or 'lm_head=6:32'",
            )
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise MlxedgeError(f"override {text!r}: bad regular expression ({e})") from None
        bits_text, _, group_text = spec.partition(":")
        try:
            bits = None if bits_text in ("16", "keep") else int(bits_text)
            group = int(group_text) if group_text else None
        except ValueError:
            raise MlxedgeError(
                f"override {text!r}: BITS and GROUP must be whole numbers",
                fix=f"BITS from {SUPPORTED_BITS} or 16/keep; GROUP from 32, 64, 128",
            ) from None
        if bits is not None:
            try:
                AffineScheme(bits, group or 64)  # validates both, naming the valid choices
            except MlxedgeError as e:
                raise MlxedgeError(f"override {text!r}: {e.message}", fix=e.fix) from None
        return cls(pattern, bits, group)


def more_bits(bits: int) -> int:
    """The next supported width at least two above `bits`, capped at 8 (2→4, 3→5, 4→6, 5→8...)."""
    return next((b for b in SUPPORTED_BITS if b >= bits + 2), 8)


def uses_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's Q4_K_M rule for the blocks whose v/down projections get more bits."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class QuantOptions:
    """What the user asked for; validated on construction.

    Raises:
        MlxedgeError: any value outside its valid choices (the message lists them).
    """

    bits: int = 4
    group_size: int = 64
    recipe: str = DEFAULT_RECIPE
    embed_bits: int | None = None  # None: as the recipe decides; 16: keep in float
    embed_group_size: int | None = None
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        AffineScheme(self.bits, self.group_size)
        if self.recipe not in RECIPES:
            raise MlxedgeError(
                f"recipe {self.recipe!r} is not supported",
                fix=f"choose one of {', '.join(RECIPES)}",
            )
        if self.embed_bits not in (None, 16):
            AffineScheme(self.embed_bits, self.embed_group_size or self.group_size)
        elif self.embed_group_size is not None:
            AffineScheme(self.bits, self.embed_group_size)


# The tensor kinds llama.cpp's Q4_K_M gives more bits in its "more bits" layers.
BOOSTED_KINDS = (Kind.ATTN_V, Kind.FFN_DOWN)


def _wanted(plan_role: Role, name: str, arch: Architecture, opts: QuantOptions) -> int | None:
    """Bits the recipe wants for a tensor (None: keep in float)."""
    if plan_role in (Role.NORM, Role.BIAS, Role.DROP):
        return None
    high = more_bits(opts.bits)
    is_head = plan_role == Role.HEAD or (plan_role == Role.EMBEDDING and arch.tied)
    if opts.recipe == "mixed":
        if is_head:
            bits = high
        else:
            entry = arch.entry(name)
            boosted = entry.kind in BOOSTED_KINDS and entry.role == Role.LINEAR
            more = boosted and uses_more_bits(entry.layer, arch.spec.n_layers)
            bits = high if more else opts.bits
    else:
        bits = opts.bits
    if plan_role == Role.EMBEDDING and opts.embed_bits is not None:
        bits = None if opts.embed_bits == 16 else opts.embed_bits
    return bits


def plan_tensors(
    arch: Architecture, infos: list[TensorInfo], opts: QuantOptions, dtype: str = "bfloat16"
) -> list[TensorPlan]:
    """Decide each tensor's scheme for an MLX folder.

    Order of precedence: the recipe, then --embed-bits/--embed-group-size, then overrides (the last
    matching override wins). A tensor whose input size does not divide into its groups stays in
    float, with a note.

    Args:
        arch: the model's architecture.
        infos: the source tensors.
        opts: the user's options.
        dtype: the storage dtype of scales, biases and float tensors.

    Returns:
        One plan per parameter of the source, in source order (a tied head's copy and rotary
        tables, which are not parameters, are left out).
    """
    from ..plan import TensorPlan

    size = storage_dtype(dtype).itemsize
    plans = []
    matched: set[str] = set()
    example = ""
    for info in infos:
        role = arch.role(info.name)
        if role == Role.DROP:
            continue
        bits = _wanted(role, info.name, arch, opts)
        group = opts.group_size
        if role == Role.EMBEDDING and opts.embed_group_size is not None:
            group = opts.embed_group_size
        module = info.name.rsplit(".", 1)[0]
        if role in (Role.LINEAR, Role.EMBEDDING, Role.HEAD):
            for ov in opts.overrides:
                if ov.pattern.fullmatch(module):
                    bits = ov.bits
                    group = ov.group_size or group
                    matched.add(ov.pattern.pattern)
            example = example or module
        scheme, note = None, ""
        if bits is not None:
            if len(info.shape) != 2:
                note = f"not a matrix {info.shape}"
            elif info.shape[1] % group:
                note = f"input size {info.shape[1]} is not a multiple of group size {group}"
            else:
                scheme = AffineScheme(bits, group)
        n = math.prod(info.shape)
        if scheme is None:
            nbytes = n * size
        else:
            rows, cols = info.shape
            nbytes = rows * scheme.packed_cols(cols) * 4 + 2 * (n // group) * size
        plans.append(TensorPlan(info.name, info.name, tuple(info.shape), arch.entry(info.name),
                                info.dtype, scheme=scheme, dtype=dtype, note=note,
                                nbytes=nbytes))  # fmt: skip
    for ov in opts.overrides:  # a typo in a pattern must not pass silently
        if ov.pattern.pattern not in matched:
            raise MlxedgeError(
                f"override {ov.pattern.pattern!r} matches no quantized module",
                fix=f"patterns match whole module names such as {example!r}",
            )
    return plans
