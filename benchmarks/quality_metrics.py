"""Metrics of the alignment-quality benchmark: diversity, self-BLEU, win rate, perplexity, correlation.

Pure functions over lists of texts or numpy arrays. Texts are split on whitespace (the toy's
words keep their punctuation: "doctor." is one token), so the numbers are about words, not
about the patient's BPE pieces.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The ``n``-grams of a word list, in order (none if it is shorter than ``n``)."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: unique n-grams / all n-grams, pooled over every text (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Sentence BLEU-``max_n`` of a word list against several references, with Lin & Och's add-one smoothing.

    A hypothesis n-gram's count is clipped to its largest count in any one reference; with ``m_n``
    clipped matches out of ``t_n`` hypothesis n-grams, ``p_1 = m_1 / t_1`` and, for ``n >= 2``,
    ``p_n = (m_n + 1) / (max(t_n, 1) + 1)`` (the form of NLTK's ``method2``); geometric mean with
    uniform weights; brevity penalty ``exp(1 - r / c)`` when the hypothesis length ``c`` is below
    ``r``, the reference length closest to ``c`` (the shorter one on a tie). No unigram match (or
    an empty hypothesis, or no reference) scores 0.
    """
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        most = Counter()
        for ref in references:
            most |= Counter(ngrams(ref, n))  # | keeps the max count per n-gram
        m, t = sum(min(k, most[g]) for g, k in hyp.items()), sum(hyp.values())
        if n == 1 and m == 0:
            return 0.0
        log_p += math.log(m / t if n == 1 else (m + 1) / (max(t, 1) + 1)) / max_n
    r = min((len(ref) for ref in references), key=lambda L: (abs(L - c), L))
    bp = 1.0 if c >= r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def self_bleu(texts: Sequence[str], max_n: int = 4) -> float:
    """Self-BLEU: mean BLEU of each text against all the others as references (higher = less diverse).

    Empty texts count as hypotheses (BLEU 0) but not as references; fewer than two texts: 0.
    """
    words = [t.split() for t in texts]
    if len(words) < 2:
        return 0.0
    scores = [bleu(w, [r for j, r in enumerate(words) if j != i and r], max_n) for i, w in enumerate(words)]
    return float(np.mean(scores))


def win_rate(rewards, baseline_rewards) -> float:
    """Per prompt: 1 if ``rewards`` beats the baseline's reward on it, 0.5 on a tie, 0 below; the mean."""
    a, b = np.asarray(rewards, dtype=float), np.asarray(baseline_rewards, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"win_rate: {a.shape} rewards vs {b.shape} baseline rewards")
    return float(np.mean((a > b) + 0.5 * (a == b))) if a.size else float("nan")


def perplexity(token_logprobs: Sequence[Sequence[float]]) -> float:
    """Corpus perplexity ``exp(-sum log p / #tokens)`` over the tokens of every reply (empty replies add nothing)."""
    flat = np.concatenate([np.asarray(x, dtype=float) for x in token_logprobs] + [np.zeros(0)])
    return float(np.exp(-flat.mean())) if flat.size else float("nan")


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length vectors (nan if either is constant or they are empty)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def diversity(texts: Sequence[str]) -> dict:
    """``distinct_1/2/3`` and ``self_bleu`` of a set of replies."""
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "distinct_3": distinct_n(texts, 3), "self_bleu": self_bleu(texts)}
