"""ARGS (Khanov et al. 2024): reward-guided decoding as a vLLM V1 logits processor.

At every step of a guided request, ``score(v) = logit(v) + w * RM(x, y_<t, v)`` over the top-k
(default 10) of the patient's logits; every other token gets ``-inf``. Greedy decoding of the
scores is ARGS-greedy, sampling them is ARGS-stochastic (vLLM's temperature applies after).

The reward model here is a **token-level reward table** ``table[v]``: the increment of an
additive sequence reward when ``v`` is appended, so ``RM(x, y_<t, v) = table[v]`` for every
candidate at once (one gather, no extra forward). :func:`token_reward_table` builds it by
scoring each token's decoded text with a text reward (e.g. ``llmdoctor_train.toy.world.toy_reward``).

Exactness for the toy world (checked on the toy world's tokenizer: ``build_tokenizer`` on
``toy_world_corpus(3000)`` with ``vocab_size=1024``, which has 622 tokens): each of the 14
good/bad words, with its leading space (``"Ġkindly"``, ``"Ġnever"``, ``"Ġignores"`` ...), is one
token, and no other token's text contains any of them; so the table is +1 on the 7 good-word
tokens, -1 on the 7 bad-word tokens (plus their space-less lowercase forms, all single tokens
except ``ignores`` and ``blames``), 0 elsewhere, and the sum of the table over a well-formed
reply's tokens equals ``toy_reward`` exactly. It is not exact for text that splits a word over
tokens (capitalised ``" Kindly"`` is 4 tokens, scored 0) or glues a word token to letters
(``" kindly" + "s"`` is scored +1, ``toy_reward`` says 0) — neither occurs in the corpus grammar.

Engine config::

    LLM(..., logits_processors=[ARGSLogitsProcessor],
        additional_config={"args": {"token_rewards": "/path/table.npy"}})   # or a list of floats

(``"k"`` there sets the default k.) Per request: ``SamplingParams.extra_args = {"args_w": float,
"args_k": int}``; requests without ``args_w`` are untouched. Without an ``args`` section the
processor is idle and a request with ``args_w`` goes on unguided (a warning is logged).
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from benchmarks.baselines import as_float_vector, check_keys, number
from benchmarks.baselines.slots import SlotProcessor

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


def token_reward_table(tokenizer, reward_fn: Callable[[str], float], size: int | None = None) -> np.ndarray:
    """``table[v] = reward_fn(decode([v]))`` for every token of ``tokenizer`` (float32).

    Exact for a reward that is a sum over whole-token pieces (see the module docstring); pads
    with zeros to ``size`` (e.g. the model's padded vocabulary) if given.
    """
    n = len(tokenizer)
    table = np.zeros(max(n, size or 0), dtype=np.float32)
    texts = [tokenizer.decode([i]) for i in range(n)]
    table[:n] = [reward_fn(t) for t in texts]
    return table


def load_table(spec, vocab_size: int) -> np.ndarray:
    """The engine's table from ``additional_config["args"]["token_rewards"]`` (``.npy`` path or list),
    zero-padded to ``vocab_size``; ValueError if it is longer, not 1-D, or not finite."""
    if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
        try:
            spec = np.load(spec)
        except OSError as e:
            raise ValueError(f"args.token_rewards: cannot read {spec!r}: {e}") from None
    table = as_float_vector(spec, "args.token_rewards")
    if len(table) > vocab_size:
        raise ValueError(f"args.token_rewards has {len(table)} entries, the model's vocabulary {vocab_size}")
    return np.pad(table, (0, vocab_size - len(table)))


class ARGSLogitsProcessor(SlotProcessor):
    """ARGS over per-request ``args_w`` / ``args_k``; all guided rows in one batched top-k."""

    name = "args"

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool = False):
        slots = vllm_config.scheduler_config.max_num_seqs
        super().__init__(slots)
        self.w = np.zeros(slots, dtype=np.float32)
        self.k = np.zeros(slots, dtype=np.int64)
        self.table = None
        self.default_k = DEFAULT_K
        cfg = (getattr(vllm_config, "additional_config", None) or {}).get("args")
        if cfg is None:
            return
        vocab = vllm_config.model_config.get_vocab_size()
        self.table = torch.from_numpy(load_table(cfg.get("token_rewards"), vocab)).to(device)
        self.default_k = number(cfg, "k", integer=True, low=1, default=DEFAULT_K)
        logger.info("args: token reward table of %d entries, default k=%d", vocab, self.default_k)

    @classmethod
    def parse_request(cls, extra: dict | None):
        return parse_request(extra)

    def _slot_arrays(self) -> tuple:
        return (self.active, self.w, self.k)

    def _parse_added(self, params):
        if self.table is None:  # no table configured: idle, and say so to ARGS requests
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
        self.count += 1

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
        w = torch.from_numpy(self.w[rows]).to(dev, sub.dtype)
        score = top + w[:, None] * self.table[idx].to(sub.dtype)
        if ks.min() < kmax:  # rows asking for fewer candidates than the widest row
            cut = torch.arange(kmax, device=dev)[None, :] >= torch.from_numpy(ks).to(dev)[:, None]
            score.masked_fill_(cut, float("-inf"))
        logits[r] = torch.full_like(sub, float("-inf")).scatter_(1, idx, score)
        return logits
