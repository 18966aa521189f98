"""Metrics of the quality benchmark, as pure functions: diversity, one setting's summary, the
mean and spread over seeds, and the operating point (best reward at equal fluency and diversity)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from benchmarks.quality.judge import perplexity

FIELDS = ("reward", "positive_share", "perplexity", "distinct_2", "mean_tokens", "tokens_per_second")


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The ``n``-grams of a word list, in order (none if it is shorter than ``n``)."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique word n-grams / all word n-grams, pooled over every text (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarize(scores, token_logprobs: Sequence[np.ndarray], texts: Sequence[str], tokens: Sequence[int],
              seconds: float, positive: float = 0.5) -> dict:
    """One setting on one seed: mean reward, share of replies scoring at least ``positive``, the judge's
    perplexity, distinct-2, mean reply length in tokens, and delivered reply tokens per second."""
    scores = np.asarray(scores, dtype=float)
    return {"reward": float(scores.mean()), "positive_share": float((scores >= positive).mean()),
            "perplexity": perplexity(token_logprobs), "distinct_2": distinct_n(texts, 2),
            "mean_tokens": float(np.mean(tokens)), "tokens_per_second": float(np.sum(tokens) / seconds)}


def over_seeds(runs: Sequence[dict]) -> dict:
    """The mean of every field over seeds, and ``<field>_std`` (sample std, 0 for one seed)."""
    out = {}
    for f in FIELDS:
        x = np.array([r[f] for r in runs], dtype=float)
        out[f] = float(x.mean())
        out[f + "_std"] = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    out["seeds"] = len(runs)
    return out


def operating_point(points: Sequence[dict], plain: dict, ppl_factor: float = 1.2,
                    d2_factor: float = 0.9) -> dict | None:
    """The point with the best mean reward among those at equal fluency (perplexity <= ``ppl_factor`` x
    plain's) and diversity (distinct-2 >= ``d2_factor`` x plain's), or None when no point qualifies."""
    ok = [p for p in points if p["perplexity"] <= ppl_factor * plain["perplexity"]
          and p["distinct_2"] >= d2_factor * plain["distinct_2"]]
    return max(ok, key=lambda p: p["reward"]) if ok else None
