"""Comparing next-token predictions: perplexity, KL divergence, top-1 agreement, logit difference.

Per-token statistics are accumulated window by window (`TokenStats.add`), so a long text never
holds more than one window of logits per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float logits (..., vocab)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class TokenStats:
    """Per-token figures of a candidate (and, when given, against a reference)."""

    nll: list[np.ndarray] = field(default_factory=list)
    ref_nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    max_abs: float = 0.0

    def add(self, logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray | None = None):
        """Score one window.

        Args:
            logits: the candidate's logits (n, vocab) at the scored positions.
            targets: the token that follows each scored position (n,).
            ref_logits: the reference's logits at the same positions, or None.
        """
        logp = log_softmax(logits)
        rows = np.arange(len(targets))
        self.nll.append(-logp[rows, targets])
        if ref_logits is None:
            return
        if ref_logits.shape != logits.shape:
            raise ValueError(f"logit shapes differ: {logits.shape} vs {ref_logits.shape}")
        ref_logp = log_softmax(ref_logits)
        self.ref_nll.append(-ref_logp[rows, targets])
        # KL(reference || candidate), in nats; clipped at 0 against rounding.
        kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)
        self.kl.append(np.maximum(kl, 0.0))
        self.top1.append(logits.argmax(axis=-1) == ref_logits.argmax(axis=-1))
        diff = np.abs(logits.astype(np.float64) - ref_logits)
        self.max_abs = max(self.max_abs, float(diff.max()))

    @property
    def tokens(self) -> int:
        return int(sum(len(x) for x in self.nll))

    def summary(self) -> dict:
        """The figures reports print: perplexity, and against the reference KL statistics,
        top-1 agreement and the largest absolute logit difference."""
        nll = np.concatenate(self.nll)
        out = {"tokens": int(len(nll)), "ppl": math.exp(float(nll.mean()))}
        if self.kl:
            kl = np.concatenate(self.kl)
            out |= {
                "ref_ppl": math.exp(float(np.concatenate(self.ref_nll).mean())),
                "kl_mean": float(kl.mean()),
                "kl_median": float(np.median(kl)),
                "kl_p99": float(np.percentile(kl, 99)),
                "kl_max": float(kl.max()),
                "top1": float(np.concatenate(self.top1).mean()),
                "max_abs_logit": self.max_abs,
            }
        return out
