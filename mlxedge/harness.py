"""The cross-check harness: run models on backends, compare their next-token predictions, report.

Two questions, two gates:
- fidelity: does a backend compute what the artifact's weights say? Each backend against the numpy
  reference run on the artifact's own (dequantized) weights, with the backend's tolerance. This
  catches runtime and format bugs.
- quality: is the artifact still the model? The backend against the original model, mean KL
  divergence at most `max_kl` (default per bit width, `DEFAULT_MAX_KL`). This catches a damaged
  artifact.

The protocol is llama.cpp's perplexity tool's, so figures are comparable with its own: windows of
`ctx` tokens, non-overlapping, and in each the predictions from position ctx/2 on are scored (255
per window of 512). A backend with a token budget (MLX's CPU backend) runs only the first window's
first `budget` tokens and scores every prediction in it; reports say which protocol a row used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import MlxedgeError
from .metrics import TokenStats
from .model import Model
from .runtime import BACKENDS, BackendUnavailable, Tolerance, make_backend
from .runtime.reference import ReferenceBackend
from .texts import Text, check_ids, tokenize, windows
from .twin import GATE_MULTIPLE, Suspect, TwinUnavailable, backend_floor, diagnose, twin_model

# Mean KL ceilings of the quality gate by bit width: twice the worst choice-text mean KL of our
# methods at uniform groups of 64 on SmolLM2 (bench/RESULTS.md; `bench/quality.py` prints them),
# with 5 and 6 bits interpolated geometrically between 4 and 8. A sound artifact passes; doubling
# one layer's down_proj scales (tests/test_eval.py) does not.
DEFAULT_MAX_KL = {2: 26.0, 3: 5.9, 4: 1.1, 5: 0.3, 6: 0.08, 8: 0.0058}
FLOAT_MAX_KL = 0.001  # an unquantized artifact (a format conversion) should change next to nothing

Progress = Callable[[str, int, int], None]


def default_max_kl(bits: int | None) -> float:
    """The quality gate's default ceiling for an artifact of this bit width."""
    if bits is None:
        return FLOAT_MAX_KL
    fitting = [b for b in DEFAULT_MAX_KL if b <= bits]
    return DEFAULT_MAX_KL[max(fitting)] if fitting else max(DEFAULT_MAX_KL.values())


def bos_id(model: Model) -> int | None:
    """The BOS id when the model's tokenizer adds one (placed at each window's start)."""
    cfg = model.tokenizer.config
    if not cfg.get("add_bos_token"):
        return None
    token = cfg.get("bos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if model.tokenizer.raw is None or not token:
        return model.config.get("bos_token_id")
    tok = model.tokenizer.json
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = tok["model"]["vocab"]
    return added.get(token, vocab.get(token) if isinstance(vocab, dict) else None)


def _vocab(model: Model) -> dict[str, int] | None:
    return None if model.tokenizer.raw is None else model.tokenizer.hf.get_vocab()


def _same_tokens(a: dict[str, int], b: dict[str, int]) -> bool:
    """Whether two vocabularies give every id both define the same token.

    An embedding padded beyond its tokenizer (Qwen2.5, Qwen3, Phi-3) has ids without a token;
    a GGUF export names them `[PAD{id}]`, so its import defines them where the original does
    not. Such placeholders are not a difference.
    """
    ia, ib = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
    for i in ia.keys() | ib.keys():
        ta, tb = ia.get(i), ib.get(i)
        if ta == tb:
            continue
        placeholder = f"[PAD{i}]"
        if (ta is None and tb == placeholder) or (tb is None and ta == placeholder):
            continue
        return False
    return True


def check_same_vocabulary(candidate: Model, reference: Model) -> None:
    """Refuse to compare models whose token ids mean different things."""
    cv, rv = _vocab(candidate), _vocab(reference)
    same = (cv is None or rv is None or cv == rv or _same_tokens(cv, rv)) and int(
        candidate.config["vocab_size"]
    ) == int(reference.config["vocab_size"])
    if not same:
        raise MlxedgeError(
            f"{candidate.name} has another vocabulary than the reference {reference.name}",
            path=candidate.name,
            fix="compare a model with a quantized or converted copy of itself",
        )


@dataclass
class Protocol:
    """Which tokens a run sees and which predictions it scores."""

    sequences: np.ndarray  # (n, length) token ids
    first: int  # first scored position in each sequence
    description: str

    def targets(self, i: int) -> np.ndarray:
        return self.sequences[i, self.first + 1 :]


def full_protocol(ids: list[int], ctx: int, bos: int | None, max_windows: int | None, text: Text):
    seqs = windows(ids, ctx, bos, max_windows, text.name)
    first = ctx // 2
    plural = "s" if len(seqs) != 1 else ""
    desc = f"{len(seqs)} window{plural} of {ctx}, predictions {first}-{ctx - 2} scored"
    return Protocol(seqs, first, desc)


def budget_protocol(ids: list[int], budget: int, bos: int | None, text: Text) -> Protocol:
    if len(ids) < budget:
        raise MlxedgeError(
            f"the text has {len(ids)} tokens, fewer than {budget}",
            path=text.name,
            fix="use a longer text",
        )
    seq = np.asarray(ids[:budget], dtype=np.int64)[None, :].copy()
    if bos is not None:
        seq[0, 0] = bos
    return Protocol(seq, 0, f"first {budget} tokens, every prediction after the first scored")


def budget_of(run, ctx: int) -> int | None:
    """The token budget `run` is held to, or None when it runs the full protocol."""
    budget = run.token_budget
    return budget if budget is not None and budget < ctx else None


def protocol_for(
    budget: int | None, ids: list[int], ctx: int, bos: int | None, max_windows, text: Text
) -> Protocol:
    """The budget protocol for a budgeted backend, llama.cpp's windows for the others."""
    if budget is not None:
        return budget_protocol(ids, budget, bos, text)
    return full_protocol(ids, ctx, bos, max_windows, text)


def score(
    run, protocol: Protocol, against=None, label: str = "", progress: Progress | None = None
) -> TokenStats:
    """One backend's figures over a protocol's windows, against another backend when given
    (each window computed once, scored and dropped)."""
    stats = TokenStats()
    n = len(protocol.sequences)
    for i in range(n):
        if progress is not None:
            progress(label, i, n)
        seq = protocol.sequences[i]
        ref = against.logits(seq, protocol.first)[:-1] if against is not None else None
        # the last position has no next token in the sequence
        stats.add(run.logits(seq, protocol.first)[:-1], protocol.targets(i), ref)
    if progress is not None:
        progress(label, n, n)
    return stats


def evaluate(
    candidate: Model,
    reference: Model | None,
    text: Text,
    ctx: int = 512,
    max_windows: int | None = None,
    backend: str = "reference",
    progress: Progress | None = None,
) -> dict:
    """Perplexity of `candidate` on `text` and, with a reference, KL divergence and agreement.

    Returns:
        A dict: model, reference, backend, device, text, protocol, and `TokenStats.summary()`.
    """
    if reference is not None:
        check_same_vocabulary(candidate, reference)
    tok_model = reference or candidate
    if tok_model.tokenizer.raw is None:
        raise MlxedgeError(
            "the model has no tokenizer.json to tokenize the text with",
            path=tok_model.name,
            fix="pass a model folder that includes its tokenizer",
        )
    try:
        run = make_backend(backend, candidate)
    except BackendUnavailable as e:
        raise MlxedgeError(f"the {backend} backend cannot run here: {e}") from None
    ids = tokenize(text, tok_model.tokenizer)
    check_ids(ids, candidate.arch.spec.vocab_size, tok_model.tokenizer.where)
    bos = bos_id(tok_model)
    protocol = protocol_for(budget_of(run, ctx), ids, ctx, bos, max_windows, text)
    against = ReferenceBackend(reference) if reference is not None else None
    stats = score(run, protocol, against, candidate.name, progress)
    return {
        "model": candidate.name,
        "reference": reference.name if reference is not None else None,
        "backend": run.name,
        "device": run.device,
        "text": text.name,
        "protocol": protocol.description,
        **stats.summary(),
    }


@dataclass
class CrossRow:
    """One (artifact, backend) line of a cross-check."""

    artifact: str
    backend: str
    device: str = ""
    protocol: str = ""
    skipped: str | None = None
    fidelity: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    fidelity_limit: str = ""
    max_kl: float = 0.0
    ceiling: str = ""  # how max_kl was set
    twin_kl: float | None = None  # the plain twin's mean KL on the same tokens
    suspects: list[Suspect] = field(default_factory=list)  # when quality fails (a diagnosis)
    fidelity_ok: bool | None = None
    quality_ok: bool | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is not None or bool(self.fidelity_ok and self.quality_ok)


def _fidelity_ok(stats: dict, tol: Tolerance | None) -> tuple[bool, str]:
    """Whether a backend's run passes its tolerance, and the check as text ("0.00045 <= 0.01")."""
    if tol is None:
        return True, "yardstick"
    ok, parts = True, []
    if tol.max_abs_logit is not None:
        ok &= stats["max_abs_logit"] <= tol.max_abs_logit
        parts.append(f"max|dlogit| {stats['max_abs_logit']:.2g} <= {tol.max_abs_logit:g}")
    if tol.kl_mean is not None:
        ok &= stats["kl_mean"] <= tol.kl_mean
        parts.append(f"KL {stats['kl_mean']:.2g} <= {tol.kl_mean:g}")
    return bool(ok), ", ".join(parts)


def crosscheck(
    artifacts: list[Model],
    reference: Model,
    text: Text,
    backends: tuple[str, ...] = BACKENDS,
    ctx: int = 512,
    max_windows: int | None = 8,
    max_kl: float | None = None,
    progress: Progress | None = None,
    original: ReferenceBackend | None = None,
) -> list[CrossRow]:
    """Every artifact on every backend: fidelity and quality gates (see the module doc).

    Windows are the outer loop: each window's logits of the original, of each artifact's own
    weights and of each backend are computed once, scored and dropped, so memory holds one
    window of logits per model however long the text.

    Args:
        artifacts: the models to check.
        reference: the original model they came from.
        text: what to run on.
        backends: backend names (`runtime.BACKENDS`).
        ctx, max_windows: the protocol (see the module doc).
        max_kl: the quality gate's ceiling; None for the default of each artifact's bit width.
        progress: called with (label, done, total) as windows finish.
        original: a reference backend already built for `reference` (its float32 weights are
            read once, however many calls share it); None builds one.

    Returns:
        One row per (artifact, backend), in that order.
    """
    if reference.tokenizer.raw is None:
        raise MlxedgeError(
            "the reference has no tokenizer.json to tokenize the text with",
            path=reference.name,
            fix="pass the original model's folder, a .gguf file or a Hub id",
        )
    for art in artifacts:
        check_same_vocabulary(art, reference)
    ids = tokenize(text, reference.tokenizer)
    check_ids(ids, reference.arch.spec.vocab_size, reference.tokenizer.where)
    bos = bos_id(reference)
    original = original or ReferenceBackend(reference)
    protocols: dict[int | None, Protocol] = {}
    rows: list[CrossRow] = []
    runs: list[_Run] = []  # the rows that run, with what they need
    for art in artifacts:
        own = ReferenceBackend(art)  # the yardstick of fidelity: same weights, numpy
        twin, no_twin = None, ""
        if max_kl is None:
            try:  # the yardstick of quality: the same storage by the plain rule
                twin_of = twin_model(reference, art)
                # float32 throughout: the twin is the original, whose KL is 0 by definition
                twin = original if twin_of.weights.is_original else ReferenceBackend(twin_of)
            except TwinUnavailable as e:
                no_twin = str(e)
        for name in backends:
            row = CrossRow(art.name, name)
            if max_kl is not None:
                row.max_kl, row.ceiling = max_kl, "--max-kl"
            elif twin is None:
                row.max_kl = default_max_kl(art.bits)
                row.ceiling = f"by bit width (no plain twin: {no_twin})"
            rows.append(row)
            try:
                backend = own if name == "reference" else make_backend(name, art)
            except BackendUnavailable as e:
                row.skipped = str(e)
                continue
            budget = budget_of(backend, ctx)
            if budget not in protocols:
                protocols[budget] = protocol_for(budget, ids, ctx, bos, max_windows, text)
            row.device, row.protocol = backend.device, protocols[budget].description
            runs.append(_Run(row, backend, own, protocols[budget], twin))
    for protocol in protocols.values():
        _score_windows([r for r in runs if r.protocol is protocol], protocol, original, progress)
    for run in runs:
        row = run.row
        if run.backend is not run.own:
            row.fidelity = run.fidelity.summary()
        row.fidelity_ok, row.fidelity_limit = _fidelity_ok(row.fidelity, run.backend.tolerance)
        row.quality = run.quality.summary()
        if run.twin is not None:
            floor = backend_floor(run.backend.tolerance)
            row.twin_kl = run.twin_quality.summary()["kl_mean"]
            row.max_kl = GATE_MULTIPLE * row.twin_kl + floor
            row.ceiling = f"{GATE_MULTIPLE:g} x plain twin's {row.twin_kl:.4g} + {floor:g}"
        row.quality_ok = bool(row.quality["kl_mean"] <= row.max_kl)
        if not row.quality_ok and run.twin is not None:
            row.suspects = diagnose(original.params, run.own.params, run.twin.params)
    return rows


@dataclass
class _Run:
    """One (artifact, backend) row being scored, and what it is compared with."""

    row: CrossRow
    backend: object
    own: ReferenceBackend  # the artifact's own weights in numpy
    protocol: Protocol
    twin: ReferenceBackend | None = None  # the artifact's plain twin in numpy
    fidelity: TokenStats = field(default_factory=TokenStats)
    quality: TokenStats = field(default_factory=TokenStats)
    twin_quality: TokenStats = field(default_factory=TokenStats)  # the twin on the same tokens

    @property
    def label(self) -> str:
        return f"{self.row.artifact} on {self.row.backend}"


def _score_windows(runs: list[_Run], protocol: Protocol, original, progress) -> None:
    """Score every run on every window of one protocol, the windows outermost."""
    n = len(protocol.sequences)
    for i in range(n):
        seq, first = protocol.sequences[i], protocol.first
        targets = protocol.targets(i)
        # the last position has no next token in the sequence
        reference = original.logits(seq, first)[:-1]
        own_logits: dict[int, np.ndarray] = {id(original): reference}  # a twin may be it
        for run in runs:
            if progress is not None:
                progress(run.label, i, n)
            for model in (run.own, run.twin):
                if model is not None and id(model) not in own_logits:
                    own_logits[id(model)] = model.logits(seq, first)[:-1]
            mine = own_logits[id(run.own)]
            if run.twin is not None:
                run.twin_quality.add(own_logits[id(run.twin)], targets, reference)
            if run.backend is run.own:
                logits = mine
            else:
                logits = run.backend.logits(seq, first)[:-1]
                run.fidelity.add(logits, targets, mine)
            run.quality.add(logits, targets, reference)
            del logits
        del own_logits, reference
    if progress is not None:
        for run in runs:
            progress(run.label, n, n)
