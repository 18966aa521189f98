"""Alignment baselines that run inside vLLM, for the quality benchmark (METHOD.md, "Baselines").

- :mod:`.args`: ARGS (Khanov et al. 2024), reward-guided top-k decoding, as a V1 logits processor.
- :mod:`.aisp`: AISP (Kanai et al. 2025), Gaussian pre-logit perturbation with MPPI mean updates:
  a V1 logits processor plus the offline driver :func:`.aisp.aisp_generate`.

Both processors keep per-slot request parameters in CPU numpy arrays, a count of active rows,
and return the logits untouched when it is zero (as vLLM's ``MinPLogitsProcessor`` does).
They implement vLLM's V1 processor interface only (the CPU runner's). On CUDA, where Model
Runner V2 is the default in vLLM 0.32 and refuses V1 classes at engine start, run with
``VLLM_USE_V2_MODEL_RUNNER=0``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["ARGSLogitsProcessor", "token_reward_table", "AISPLogitsProcessor", "aisp_generate",
           "importance_weights", "update_mean"]


def __getattr__(name):  # lazy re-exports: importing the package loads neither processor
    if name in ("ARGSLogitsProcessor", "token_reward_table"):
        from benchmarks.baselines import args

        return getattr(args, name)
    if name in ("AISPLogitsProcessor", "aisp_generate", "importance_weights", "update_mean"):
        from benchmarks.baselines import aisp

        return getattr(aisp, name)
    raise AttributeError(name)


def move_slot(arrays, a: int, b: int, swap: bool) -> None:
    """vLLM's ``moved`` entry for per-slot numpy arrays / tensors: ``a`` -> ``b`` (and ``b`` -> ``a`` if ``swap``)."""
    for arr in arrays:
        tmp = (arr[b].clone() if hasattr(arr, "clone") else arr[b].copy()) if swap else None
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


def as_float_vector(values, name: str) -> np.ndarray:
    """``values`` as a 1-D finite float32 vector; ValueError otherwise."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a list of numbers: {e}") from None
    if arr.ndim != 1 or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be a flat list of finite numbers")
    return arr
