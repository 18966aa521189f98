"""ARGS (Khanov et al. 2024): reward-guided decoding as a vLLM V1 logits processor.

At every step of a guided request, ``score(v) = logit(v) + w * RM(x, y_<t + v)`` over the top-k
(default 10) of the patient's logits; every other token gets ``-inf``. Greedy decoding of the
scores is ARGS-greedy, sampling them is ARGS-stochastic (vLLM's temperature applies after).

The reward model is a text reward: a function from a list of texts to an array of scores, named
as ``"module:function"`` (the quality benchmark uses VADER, ``llmdoctor_train.real.sentiment:vader``).
Each candidate is scored on the reply so far with the candidate appended, decoded by the model's
tokenizer: ``rows x k`` reward calls per step, in one call of the function.

Engine config::

    LLM(..., logits_processors=[ARGSLogitsProcessor],
        additional_config={"args": {"reward": "llmdoctor_train.real.sentiment:vader"}})

(``"k"`` there sets the default k.) Per request: ``SamplingParams.extra_args = {"args_w": float,
"args_k": int}``; requests without ``args_w`` are untouched. Without an ``args`` section the
processor is idle and a request with ``args_w`` goes on unguided (a warning is logged).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

import numpy as np
import torch

from benchmarks.quality.baselines import check_keys, number
from benchmarks.quality.baselines.slot_processor import SlotProcessor

logger = logging.getLogger("llmdoctor_vllm")

KEYS = ("args_w", "args_k")
DEFAULT_K = 10


def parse_request(extra: dict | None, default_k: int = DEFAULT_K) -> tuple[float, int] | None:
    """``(w, k)`` of a request, or None when it is not an ARGS request; ValueError if malformed."""
    extra = extra or {}
    if not check_keys(extra, "args_", KEYS):
        return None
    w = number(extra, "args_w")
    if w is None:
        raise ValueError("args_k given without args_w")
    return w, number(extra, "args_k", integer=True, low=1, default=default_k)


def load_reward(spec: str) -> Callable[[list[str]], np.ndarray]:
    """The text reward named ``"module:function"``; ValueError if it cannot be imported."""
    module, _, name = str(spec).partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"args.reward: cannot load {spec!r} (expected 'module:function'): {e}") from None
    if not callable(fn):
        raise ValueError(f"args.reward: {spec!r} is not callable")
    return fn


class ARGSLogitsProcessor(SlotProcessor):
    """ARGS over per-request ``args_w`` / ``args_k``: one batched top-k, one reward call per step."""

    name = "args"

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool = False):
        slots = vllm_config.scheduler_config.max_num_seqs
        super().__init__(slots)
        self.w = np.zeros(slots, dtype=np.float32)
        self.k = np.zeros(slots, dtype=np.int64)
        self.outputs: list[list[int] | None] = [None] * slots  # each request's live output token list
        self.reward = None
        self.default_k = DEFAULT_K
        cfg = (getattr(vllm_config, "additional_config", None) or {}).get("args")
        if cfg is None:
            return
        from transformers import AutoTokenizer

        self.reward = load_reward(cfg.get("reward"))
        self.tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.default_k = number(cfg, "k", integer=True, low=1, default=DEFAULT_K)
        logger.info("args: text reward %s, default k=%d", cfg.get("reward"), self.default_k)

    @classmethod
    def parse_request(cls, extra: dict | None):
        return parse_request(extra)

    def _slot_arrays(self) -> tuple:
        return (self.active, self.w, self.k, self.outputs)

    def _parse_added(self, params):
        if self.reward is None:  # no reward configured: idle, and say so to ARGS requests
            if "args_w" in (params.extra_args or {}):
                logger.warning("args: no 'args' section in additional_config; request not guided")
            return None
        try:
            return parse_request(params.extra_args, self.default_k)
        except ValueError as e:
            logger.warning("args: request not guided: %s", e)
            return None

    def _add(self, slot: int, req: tuple[float, int], output: list) -> None:
        self.active[slot] = True
        self.w[slot], self.k[slot] = req
        self.outputs[slot] = output
        self.count += 1

    def candidate_rewards(self, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``RM(y_<t + v)`` for each row's candidates ``idx[i]``: the reward of the decoded reply so far
        with each candidate appended (one reward call for every row and candidate)."""
        seqs = [list(self.outputs[r]) + [int(v)] for r, cand in zip(rows, idx) for v in cand]
        texts = self.tokenizer.batch_decode(seqs, skip_special_tokens=True)
        return np.asarray(self.reward(texts), dtype=np.float32).reshape(idx.shape)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.count:
            return logits
        rows = np.flatnonzero(self.active[: logits.shape[0]])
        if not len(rows):
            return logits
        dev = logits.device
        r = torch.from_numpy(rows).to(dev)
        sub = logits[r]
        ks = np.minimum(self.k[rows], sub.shape[1])
        kmax = int(ks.max())
        top, idx = sub.topk(kmax, dim=1)
        rm = torch.from_numpy(self.candidate_rewards(rows, idx.cpu().numpy())).to(dev, sub.dtype)
        w = torch.from_numpy(self.w[rows]).to(dev, sub.dtype)
        score = top + w[:, None] * rm
        if ks.min() < kmax:  # rows asking for fewer candidates than the widest row
            cut = torch.arange(kmax, device=dev)[None, :] >= torch.from_numpy(ks).to(dev)[:, None]
            score.masked_fill_(cut, float("-inf"))
        logits[r] = torch.full_like(sub, float("-inf")).scatter_(1, idx, score)
        return logits
