"""Alignment baselines that run inside vLLM, for the quality benchmark.

- :mod:`.args`: ARGS (Khanov et al. 2024), reward-guided top-k decoding with a text reward, as a V1
  logits processor.

The processor keeps per-slot request parameters in CPU arrays, a count of active rows, and returns
the logits untouched when it is zero (as vLLM's ``MinPLogitsProcessor`` does). It implements vLLM's
V1 processor interface only (the CPU runner's). On CUDA, where Model Runner V2 is the default in
vLLM 0.32 and refuses V1 classes at engine start, run with ``VLLM_USE_V2_MODEL_RUNNER=0``.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["ARGSLogitsProcessor"]


def __getattr__(name):  # lazy re-export: importing the package does not load vLLM
    if name == "ARGSLogitsProcessor":
        from benchmarks.quality.baselines import args

        return args.ARGSLogitsProcessor
    raise AttributeError(name)


def move_slot(arrays, a: int, b: int, swap: bool) -> None:
    """vLLM's ``moved`` entry for per-slot arrays (numpy, tensors, or lists of live objects):
    ``a`` -> ``b`` (and ``b`` -> ``a`` if ``swap``)."""
    for arr in arrays:
        tmp = None
        if swap:
            tmp = arr[b] if isinstance(arr, list) else (arr[b].clone() if hasattr(arr, "clone") else arr[b].copy())
        arr[b] = arr[a]
        if swap:
            arr[a] = tmp


def number(extra: dict, key: str, *, integer: bool = False, low: float | None = None, default=None):
    """``extra[key]`` checked as a finite number (an int if ``integer``) ``>= low``; ValueError names it."""
    if key not in extra:
        return default
    v = extra[key]
    ok = isinstance(v, numbers.Integral if integer else numbers.Real) and not isinstance(v, bool)
    if ok and not integer:
        v = float(v)
        ok = math.isfinite(v)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{key} must be {kind}, got {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{key} must be >= {low}, got {v!r}")
    return int(v) if integer else v


def check_keys(extra: dict, prefix: str, known: tuple[str, ...]) -> bool:
    """Whether ``extra`` holds any ``prefix`` key; ValueError for an unknown one."""
    mine = [k for k in extra if k.startswith(prefix)]
    unknown = sorted(set(mine) - set(known))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; known: {list(known)}")
    return bool(mine)
