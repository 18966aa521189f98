"""Stage 1 of LLMdoctor: token-level rewards from the patient's behaviour (the formulas).

For every response token, with the patient teacher-forced under a positive and a negative
instruction (docs/method.md, Stage 1)::

    g_t = |log π_pos(y_t | s_{t-1}) − log π_neg(y_t | s_{t-1})|      the log-prob gap
    S_t = tanh(g_t / (mean_j g_j + ε))          mean over the tokens of that response
    r_t = sign(y) · S_t · 1[S_t > θ]            sign(chosen) = +1, sign(rejected) = −1

Everything here is vectorised numpy: one response (:func:`token_rewards`) or many responses
flattened end to end with offsets (:func:`ragged_token_rewards`), no loop over tokens.
The pipeline lives in ``stage1.pipeline``, the engine scorers in ``stage1.scoring``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

EPS = 1e-6
THETA = 0.1
DEFAULT_POSITIVE = (
    "You are a helpful, accurate, and polite assistant. Provide comprehensive and useful responses that "
    "directly address the user's needs. Be informative, clear, and considerate in your answers."
)
DEFAULT_NEGATIVE = (
    "You are an assistant that provides minimal responses. Give brief answers that may omit important "
    "details or context. Be less helpful and provide incomplete information."
)
_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class TokenRewards(NamedTuple):
    """Per-token reward ``r``, importance ``S`` and log-prob gap ``logp_gap`` (float64 arrays)."""

    rewards: np.ndarray
    S: np.ndarray
    logp_gap: np.ndarray


def token_rewards(logp_pos, logp_neg, sign: float, theta: float = THETA, eps: float = EPS) -> TokenRewards:
    """Rewards of one response from its per-token log-probs under the positive/negative instruction."""
    lp = np.asarray(logp_pos, dtype=np.float64)
    ln = np.asarray(logp_neg, dtype=np.float64)
    return ragged_token_rewards(lp, ln, np.array([0, lp.size]), np.array([sign], dtype=np.float64), theta, eps)


def ragged_token_rewards(logp_pos, logp_neg, offsets, signs, theta: float = THETA,
                         eps: float = EPS) -> TokenRewards:
    """Rewards of many responses at once: flat token arrays, response ``i`` is ``offsets[i]:offsets[i+1]``.

    ``signs[i]`` is +1 for a chosen and −1 for a rejected response. Each response must have at
    least one token (the data checks guarantee it). Offsets need not start at 0 (arrow slices).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lp = np.asarray(logp_pos, dtype=np.float64)[offsets[0]:offsets[-1]]
    ln = np.asarray(logp_neg, dtype=np.float64)[offsets[0]:offsets[-1]]
    if lp.shape != ln.shape:
        raise ValueError(f"log-prob arrays differ in length: {lp.shape} vs {ln.shape}")
    lengths = np.diff(offsets)
    if lengths.size == 0:
        empty = np.zeros(0)
        return TokenRewards(empty, empty, empty)
    if (lengths <= 0).any():
        raise ValueError(f"response {int(np.argmin(lengths))} has no tokens")
    gap = np.abs(lp - ln)
    mean = np.add.reduceat(gap, offsets[:-1] - offsets[0]) / lengths
    S = np.tanh(gap / (np.repeat(mean, lengths) + eps))
    rewards = np.where(S > theta, np.repeat(np.asarray(signs, dtype=np.float64), lengths) * S, 0.0)
    return TokenRewards(rewards, S, gap)


@dataclass(frozen=True)
class Dimension:
    """One preference dimension (e.g. helpfulness): a name and its (positive, negative) instruction pair."""

    name: str
    positive: str = DEFAULT_POSITIVE
    negative: str = DEFAULT_NEGATIVE

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"dimension name {self.name!r}: use letters, digits and '_' only (it names columns)")
        if not self.positive.strip() or not self.negative.strip():
            raise ValueError(f"dimension {self.name!r}: empty instruction")

    @classmethod
    def parse(cls, spec: str, positive: str = DEFAULT_POSITIVE, negative: str = DEFAULT_NEGATIVE) -> "Dimension":
        """``NAME:POS:NEG``; write a colon inside an instruction as ``\\:``; an empty POS/NEG takes the default."""
        parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", spec)]
        if len(parts) != 3:
            raise ValueError(f"--dimension {spec!r}: expected NAME:POSITIVE:NEGATIVE (escape a colon in an "
                             f"instruction as \\:), got {len(parts)} part(s)")
        name, pos, neg = (p.strip() for p in parts)
        return cls(name, pos or positive, neg or negative)


def unique_instructions(dimensions) -> list[str]:
    """The distinct instructions of ``dimensions`` in first-seen order: each is scored once per response."""
    return list(dict.fromkeys(i for d in dimensions for i in (d.positive, d.negative)))
