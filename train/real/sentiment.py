"""The task's reward: VADER's compound sentiment score (``vaderSentiment``, a lexicon and rule scorer
from outside the project), in [-1, 1]; the task counts a reply with a score of at least 0.5 as positive."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

POSITIVE = 0.5


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(texts: list[str]) -> np.ndarray:
    """VADER compound score of each text (float64 array, same order)."""
    score = _analyzer().polarity_scores
    return np.array([score(t)["compound"] for t in texts], dtype=np.float64)
