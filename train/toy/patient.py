"""The toy world's patient: trained here on the world's corpus, sampled, and turned into preference pairs.

Seeded and built on the CPU in seconds (under one torch thread by default); nothing is
downloaded. See :mod:`llmdoctor_train.toy.world` for the task itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llmdoctor_train.toy.models import build_tiny_lm, build_tokenizer, save_lm
from llmdoctor_train.toy.world import INSTRUCTIONS, STOP, format_prompt, toy_prompts, toy_rewards, toy_wellformed, \
    toy_world_corpus


@torch.no_grad()
def sample_replies(model, tokenizer, prompts: Sequence[str], instruction: str | None = None, *,
                   max_new_tokens: int = 48, temperature: float = 1.0, batch_size: int = 64,
                   seed: int = 0) -> list[str]:
    """Samples one reply per prompt with HF ``generate`` (batched, left-padded); returns reply texts.

    A reply is cut at the first ``STOP`` (newline), as a serving engine would with
    ``stop=["\\n"]``. Runs under a forked RNG, so the caller's global torch RNG is left alone.
    """
    texts = [format_prompt(p, instruction) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True)
                gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                out += [t.split(STOP, 1)[0].strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return out


def measure_conditions(model, tokenizer, n: int = 64, seed: int = 0, **kw) -> dict[str, dict[str, float]]:
    """Samples ``n`` replies per condition (same prompts for each) and returns
    ``{"rewards": {cond: mean task reward}, "wellformed": {cond: fraction of well-formed replies}}``."""
    prompts = toy_prompts(n, seed=seed + 1000)
    rewards, wellformed = {}, {}
    for c in ("pos", "neg", "neutral"):
        replies = sample_replies(model, tokenizer, prompts, INSTRUCTIONS[c], seed=seed, **kw)
        rewards[c] = float(toy_rewards(replies).mean())
        wellformed[c] = float(toy_wellformed(replies).mean())
    return {"rewards": rewards, "wellformed": wellformed}


# ----------------------------------------------------------------------------- patient

@contextlib.contextmanager
def torch_threads(n: int | None):
    """Caps torch's intra-op threads to ``n`` inside the block (None: leave as is), then restores them.

    On a small shared CPU, one thread ran these tiny models 10-30x faster per step than two
    threads fighting other processes for the cores, and it makes float reductions reproducible.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_toy_patient(root: str | Path, seed: int = 0, steps: int = 300, *, n_examples: int = 3000,
                      vocab_size: int = 1024, num_layers: int = 2, batch_size: int = 16, lr: float = 5e-3,
                      measure: int = 64, name: str = "patient", num_threads: int | None = 1) -> dict:
    """Trains a tokenizer and a tiny Qwen2 patient on the toy world; saves it to ``root/name``.

    Qwen2: hidden 128, ``num_layers`` layers, 2 heads (head_dim 64, as vLLM's CPU attention
    needs), logits padded to a multiple of 64. nanoGPT-style loop: AdamW, linear warmup then
    cosine decay, grad clip 1, loss on all tokens; each batch holds one condition, so the short
    neutral examples are not padded to the instructed ones' length. With ``measure > 0``,
    samples ``measure`` replies per condition and reports each one's mean reward and
    well-formed fraction (the patient must follow the instructions: pos > neutral > neg).

    Seeded, built under ``torch_threads(num_threads)`` (default 1 thread). Returns
    ``dict(patient=<saved folder>, tokenizer, rewards={pos, neg, neutral}, wellformed={...},
    final_loss, train_seconds (tokenizer + LM), build_seconds (all of it), steps)``.
    """
    with torch_threads(num_threads):
        return _build_toy_patient(root, seed, steps, n_examples=n_examples, vocab_size=vocab_size,
                                  num_layers=num_layers, batch_size=batch_size, lr=lr, measure=measure, name=name)


def _build_toy_patient(root, seed, steps, *, n_examples, vocab_size, num_layers, batch_size, lr, measure, name):
    t0 = time.perf_counter()
    rows = toy_world_corpus(n_examples, seed=seed)
    tok = build_tokenizer([r["text"] for r in rows], vocab_size=vocab_size)
    ids = [x + [tok.eos_token_id] for x in tok([r["text"] for r in rows])["input_ids"]]
    T = max(map(len, ids))
    data = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
    for i, x in enumerate(ids):
        data[i, :len(x)] = torch.tensor(x)
    lens = torch.tensor([len(x) for x in ids])
    by_cond = [torch.tensor([i for i, r in enumerate(rows) if r["condition"] == c]) for c in ("pos", "neg", "neutral")]

    model = build_tiny_lm(tok, hidden_size=128, num_layers=num_layers, num_heads=2, num_kv_heads=1,
                          vocab_pad_to=64, max_position_embeddings=512, seed=seed)
    with torch.no_grad():  # undo build_tiny_lm's large lm_head init: train from a calm start
        model.lm_head.weight.normal_(0.0, 0.02)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        if step < warmup:
            lr_t = lr * (step + 1) / warmup
        else:  # cosine down to lr / 10
            lr_t = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr_t
        pool = by_cond[step % 3]
        idx = pool[torch.randint(len(pool), (batch_size,), generator=g)]
        L = int(lens[idx].max())
        x = data[idx, :L]
        labels = x.masked_fill(x == tok.pad_token_id, -100)  # right padding: no attention mask needed
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    train_seconds = time.perf_counter() - t0
    path = save_lm(model, tok, Path(root) / name)
    measured = measure_conditions(model, tok, n=measure, seed=seed) if measure else {}
    return dict(patient=path, tokenizer=tok, **measured, final_loss=float(np.mean(losses[-10:])),
                train_seconds=train_seconds, build_seconds=time.perf_counter() - t0, steps=steps)


# ----------------------------------------------------------------------------- preferences

def make_preference_dataset(patient_dir: str | Path, n_prompts: int = 256, samples_per_prompt: int = 4,
                            seed: int = 0, *, max_new_tokens: int = 48, num_threads: int | None = 1):
    """Preference pairs from the patient's own neutral replies, ranked by ``toy_reward``.

    For each of ``n_prompts`` user prompts, samples ``samples_per_prompt`` replies (no
    instruction), keeps the best as ``chosen`` and the worst as ``rejected`` (empty replies never
    count), and skips the prompt if they tie. Returns a ``datasets.Dataset`` with text columns ``prompt`` (the bare
    user request), ``chosen``, ``rejected`` (reply text, no leading space) and the float
    columns ``chosen_reward``, ``rejected_reward``.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(patient_dir)
    model = AutoModelForCausalLM.from_pretrained(patient_dir).eval()
    prompts = toy_prompts(n_prompts, seed=seed)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    with torch_threads(num_threads):
        replies = sample_replies(model, tok, flat, None, max_new_tokens=max_new_tokens, seed=seed)
    r = toy_rewards(replies).reshape(n_prompts, samples_per_prompt)
    empty = np.array([not t for t in replies]).reshape(r.shape)  # an empty reply is no response to rank
    best = np.where(empty, -np.inf, r).argmax(1)
    worst = np.where(empty, np.inf, r).argmin(1)
    rows = np.arange(n_prompts)
    keep = (r[rows, best] > r[rows, worst]) & ~empty[rows, best] & ~empty[rows, worst]
    cols = dict(prompt=[], chosen=[], rejected=[], chosen_reward=[], rejected_reward=[])
    for i in np.flatnonzero(keep):
        cols["prompt"].append(prompts[i])
        cols["chosen"].append(replies[i * samples_per_prompt + best[i]])
        cols["rejected"].append(replies[i * samples_per_prompt + worst[i]])
        cols["chosen_reward"].append(float(r[i, best[i]]))
        cols["rejected_reward"].append(float(r[i, worst[i]]))
    return Dataset.from_dict(cols)
