"""AISP (Kanai et al., arXiv 2510.26219): adaptive importance sampling on the patient's pre-logits.

For generated positions ``t < tau`` the pre-logits ``z_t`` (the lm_head input) are perturbed by
``v_t ~ N(u_t, sigma^2 I)``, so the logits become ``W (z_t + v_t) = logits + W v_t`` (``W``: the
patient's output embedding). Each iteration samples ``n`` completions per prompt, scores them
with a sequence reward, and moves the mean by importance weights ``w_i ∝ exp(r_i / lam)``
(MPPI form: ``u_t <- sum_i w_i v_t^(i)``); after ``k`` iterations the best sample seen is
returned. As ``lam -> 0`` the weights are one-hot on the best sample (best-of-n selection).

Two pieces:

- :class:`AISPLogitsProcessor` (vLLM V1 interface) adds ``v_t @ W.T`` to the rows of AISP
  requests, all rows in one matmul. Listing it in ``logits_processors`` enables it; no
  ``additional_config`` section is needed. At engine start it reads ``W`` (``lm_head.weight``,
  or ``embed_tokens`` for tied embeddings) with safetensors from the patient's checkpoint
  folder (``vllm_config.model_config.model``) into one extra copy in the model's dtype (a
  checkpoint without safetensors stops the engine there). Per request ``extra_args``: ``aisp_seed`` (int), ``aisp_sigma``
  (float >= 0), ``aisp_tau`` (int >= 0), optional ``aisp_mean`` (``tau * hidden`` floats,
  row-major; zeros if omitted). ``v = mean + sigma * eps`` with ``eps = aisp_noise(seed, tau,
  hidden)``, drawn when the request is added, so the driver can rebuild every ``v^(i)``.
  A request's output position is read from the length of its live output-token list (one
  ``len`` per active row; vLLM also runs the sampler for partial-prefill rows, so a step
  counter would drift); rows past ``tau`` leave the active set.
- :func:`aisp_generate`: the offline driver over an ``LLM`` built with the processor.

Not modelled: logit soft-capping or a logit scale between ``W z`` and the logits (Qwen2 and
Llama have neither).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Sequence

import numpy as np
import torch

from benchmarks.baselines import as_float_vector, check_keys, number
from benchmarks.baselines.slots import SlotProcessor

logger = logging.getLogger("llmdoctor_vllm")

KEYS = ("aisp_seed", "aisp_sigma", "aisp_tau", "aisp_mean")


# ----------------------------------------------------------------------------- math

def aisp_noise(seed: int, tau: int, hidden: int) -> np.ndarray:
    """The standard-normal ``eps`` ``[tau, hidden]`` (float32) of a request with ``aisp_seed=seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((tau, hidden), generator=g, dtype=torch.float32).numpy()


def importance_weights(rewards, lam: float) -> np.ndarray:
    """``w_i ∝ exp(r_i / lam)`` over the last axis (softmax, max-shifted, so large ``r/lam`` is safe).

    ``lam == 0``: one-hot on the first argmax (best-of-n); ``lam == inf``: uniform.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if lam < 0 or np.isnan(lam):
        raise ValueError(f"lam must be >= 0, got {lam}")
    if lam == 0:
        return np.eye(r.shape[-1])[np.argmax(r, axis=-1)]
    z = np.exp((r - r.max(axis=-1, keepdims=True)) / lam)
    return z / z.sum(axis=-1, keepdims=True)


def update_mean(eps, weights, mean, sigma: float) -> np.ndarray:
    """MPPI step ``u <- sum_i w_i v^(i)`` with ``v^(i) = u + sigma * eps^(i)`` and ``sum_i w_i = 1``.

    Shapes: ``eps [..., n, tau, hidden]``, ``weights [..., n]``, ``mean [..., tau, hidden]``.
    """
    eps, weights = np.asarray(eps, dtype=np.float32), np.asarray(weights, dtype=np.float32)
    return np.asarray(mean, dtype=np.float32) + sigma * np.einsum("...n,...nth->...th", weights, eps)


def sample_seeds(seed: int, iteration: int, num_prompts: int, n: int) -> np.ndarray:
    """The per-sample seeds ``[num_prompts, n]`` that :func:`aisp_generate` uses in ``iteration``."""
    return np.random.default_rng([seed, iteration]).integers(0, 2**31 - 1, size=(num_prompts, n))


# ----------------------------------------------------------------------------- weights

def load_output_embedding(model_path: str, hf_config=None) -> torch.Tensor:
    """The patient's output embedding ``W [vocab, hidden]`` from its safetensors checkpoint.

    ``lm_head.weight``, or the input embedding when the config ties them (or there is no head).
    """
    from safetensors import safe_open

    folder = model_path
    if not os.path.isdir(folder):  # a hub id: its cached snapshot
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors"])
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            where = json.load(f)["weight_map"]
    else:
        files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
        where = {}
        for name in files:
            with safe_open(os.path.join(folder, name), "pt") as f:
                where.update({k: name for k in f.keys()})
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    heads = [k for k in where if k.endswith("lm_head.weight")]
    embeds = [k for k in where if k.endswith("embed_tokens.weight")]
    keys = (embeds if tied or not heads else heads)
    if not keys:
        raise ValueError(f"aisp: no lm_head / embed_tokens weight in the safetensors of {model_path}")
    with safe_open(os.path.join(folder, where[keys[0]]), "pt") as f:
        return f.get_tensor(keys[0])


# ----------------------------------------------------------------------------- processor

def parse_request(extra: dict | None) -> dict | None:
    """A request's AISP arguments, or None if it has none; ValueError if malformed."""
    extra = extra or {}
    if not check_keys(extra, "aisp_", KEYS):
        return None
    tau = number(extra, "aisp_tau", integer=True, low=0)
    if tau is None:
        raise ValueError("aisp_tau is required with aisp_* arguments")
    out = dict(seed=number(extra, "aisp_seed", integer=True, default=0), tau=tau,
               sigma=number(extra, "aisp_sigma", low=0.0, default=0.0), mean=None)
    if "aisp_mean" in extra:
        out["mean"] = as_float_vector(extra["aisp_mean"], "aisp_mean")
        if tau == 0 or len(out["mean"]) % tau:
            raise ValueError(f"aisp_mean has {len(out['mean'])} values: not tau * hidden with tau={tau}")
    return out


class AISPLogitsProcessor(SlotProcessor):
    """Adds ``v_t @ W.T`` to the logits of AISP requests at output positions ``t < tau``."""

    name = "aisp"

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool = False):
        mc = vllm_config.model_config
        self.model_path, self.hf_config = mc.model, mc.hf_text_config
        self.hidden = mc.get_hidden_size()
        self.device = torch.device(device)
        self.W = load_output_embedding(self.model_path, self.hf_config).to(self.device, mc.dtype)
        logger.info("aisp: output embedding %s from %s", tuple(self.W.shape), self.model_path)
        slots = vllm_config.scheduler_config.max_num_seqs
        super().__init__(slots)
        self.tau = np.zeros(slots, dtype=np.int64)
        self.outputs: list = [None] * slots  # live output-token lists (their length is the position)
        self.v = torch.zeros((slots, 0, self.hidden), device=self.device)  # grows to the largest tau

    @classmethod
    def parse_request(cls, extra: dict | None):
        return parse_request(extra)

    def _slot_arrays(self) -> tuple:
        return (self.active, self.tau, self.v)

    def _remove(self, slot: int) -> None:
        super()._remove(slot)
        self.outputs[slot] = None

    def _add(self, slot: int, req: dict, output: list) -> None:
        tau = req["tau"]
        if tau == 0:
            return
        eps = aisp_noise(req["seed"], tau, self.hidden)
        mean = req["mean"]
        if mean is not None and mean.size != tau * self.hidden:
            logger.error("aisp: aisp_mean has %d values, tau * hidden = %d; request not perturbed",
                         mean.size, tau * self.hidden)
            return
        v = req["sigma"] * eps if mean is None else mean.reshape(tau, self.hidden) + req["sigma"] * eps
        if tau > self.v.shape[1]:
            grown = torch.zeros((self.v.shape[0], tau, self.hidden), device=self.device)
            grown[:, : self.v.shape[1]] = self.v
            self.v = grown
        self.v[slot, :tau] = torch.from_numpy(v).to(self.device)
        self.v[slot, tau:] = 0
        self.tau[slot], self.outputs[slot] = tau, output
        self.active[slot] = True
        self.count += 1

    def _move(self, a: int, b: int, swap: bool) -> None:
        out_a, out_b = self.outputs[a], self.outputs[b]  # the live output lists move with their requests
        super()._move(a, b, swap)
        self.outputs[b], self.outputs[a] = out_a, (out_b if swap else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.count:
            return logits
        rows = np.flatnonzero(self.active[: logits.shape[0]])
        pos = np.fromiter(map(len, map(self.outputs.__getitem__, rows)), dtype=np.int64, count=len(rows))
        live = pos < self.tau[rows]
        if not live.all():  # past tau: never perturbed again
            self.active[rows[~live]] = False
            self.count -= int((~live).sum())
            rows, pos = rows[live], pos[live]
        if not len(rows):
            return logits
        dev = logits.device
        r = torch.from_numpy(rows).to(dev)
        vt = self.v[r, torch.from_numpy(pos).to(dev)]  # [rows, hidden]
        vocab = min(self.W.shape[0], logits.shape[1])
        logits[r, :vocab] += (vt.to(self.W.dtype) @ self.W[:vocab].T).to(logits.dtype)
        return logits


# ----------------------------------------------------------------------------- driver

def sampling_params(seeds: np.ndarray, mean: np.ndarray | None, *, sigma: float, tau: int, max_tokens: int,
                    temperature: float, stop=None, **kw) -> list:
    """One ``SamplingParams`` per seed (sampling seed = noise seed), all around ``mean [tau, hidden]``."""
    from vllm import SamplingParams

    extra = {"aisp_sigma": float(sigma), "aisp_tau": int(tau)}
    if mean is not None and np.any(mean):
        extra["aisp_mean"] = np.asarray(mean, dtype=np.float32).ravel().tolist()
    return [SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop, seed=int(s),
                           extra_args={**extra, "aisp_seed": int(s)}, **kw) for s in np.ravel(seeds)]


def aisp_generate(llm, prompts: Sequence[str], reward_fn: Callable[[list], np.ndarray], *, n: int = 4,
                  iterations: int = 2, sigma: float = 0.5, lam: float = 1.0, tau: int = 16, max_tokens: int = 48,
                  temperature: float = 1.0, stop=None, seed: int = 0) -> dict:
    """AISP over ``prompts`` with an ``LLM`` whose ``logits_processors`` include :class:`AISPLogitsProcessor`.

    Each of the ``iterations`` runs one batched ``llm.generate`` over all prompts x ``n``
    samples (seeds from :func:`sample_seeds`), scores them with ``reward_fn(texts) -> rewards``,
    and updates each prompt's mean (:func:`importance_weights`, :func:`update_mean`). Returns
    ``texts`` / ``rewards`` (the best sample per prompt over all iterations, first one on ties),
    ``compute`` (``generated_tokens``, ``samples``, ``iterations``), ``sample_texts`` /
    ``sample_rewards`` (``[iterations, prompts, n]``) and ``means`` (the mean used by each
    iteration, ``[iterations, prompts, tau, hidden]``).
    """
    prompts = list(prompts)
    P, H = len(prompts), llm.llm_engine.model_config.get_hidden_size()
    mean = np.zeros((P, tau, H), dtype=np.float32)
    best_r, best_t = np.full(P, -np.inf), [None] * P
    all_t, all_r, means, gen_tokens = [], [], [], 0
    for it in range(iterations):
        seeds = sample_seeds(seed, it, P, n)
        params = [sp for p in range(P) for sp in sampling_params(seeds[p], mean[p], sigma=sigma, tau=tau,
                                                                 max_tokens=max_tokens, temperature=temperature,
                                                                 stop=stop)]
        outs = llm.generate([p for p in prompts for _ in range(n)], params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        gen_tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        r = np.asarray(reward_fn(texts), dtype=np.float64).reshape(P, n)
        j = r.argmax(axis=1)
        for p in np.flatnonzero(r[np.arange(P), j] > best_r):
            best_r[p], best_t[p] = r[p, j[p]], texts[p * n + j[p]]
        means.append(mean)
        all_t.append([texts[p * n:(p + 1) * n] for p in range(P)])
        all_r.append(r)
        if it + 1 < iterations:
            eps = np.stack([aisp_noise(s, tau, H) for s in seeds.ravel()]).reshape(P, n, tau, H)
            mean = update_mean(eps, importance_weights(r, lam), mean, sigma)
    return {"texts": best_t, "rewards": best_r,
            "compute": {"generated_tokens": int(gen_tokens), "samples": P * n * iterations, "iterations": iterations},
            "sample_texts": all_t, "sample_rewards": np.stack(all_r), "means": np.stack(means)}
