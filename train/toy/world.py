"""A tiny, self-contained alignment task: a patient that follows instructions, a task reward, preferences.

The world is short assistant replies made of simple sentences ("The cat kindly helps the
doctor."). Some words are GOOD (kindly, clearly, ..., helps) and some BAD (badly, rarely, ...,
never); the task reward of a text is ``#good words - #bad words``. A tiny Qwen2 *patient* is
trained from scratch on replies written under METHOD.md's default positive instruction (they
lean strongly to good words), the default negative one (lean to bad words), or no instruction
(a balanced mix). So the patient's pos/neg log-probabilities carry exactly the signal Stage 1
needs, its plain neutral replies score about 0, and the reward says whether guidance helped.

Everything is built on the CPU in seconds; nothing is downloaded. Used by the README demo
and the alignment-quality benchmark.

Text format (what Stage 1 scores when the tokenizer has no chat template)::

    "{instruction}\\n\\nUser: {prompt}\\nAssistant: {response}" + eos   # with an instruction
    "User: {prompt}\\nAssistant: {response}" + eos                     # neutral

i.e. ``format_prompt(prompt, instruction) + " " + response``: the prompt string ends in
``"Assistant:"`` and the response text (as stored in the preference data, with no leading
space) follows after one space.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

POSITIVE_INSTRUCTION = (
    "You are a helpful, accurate, and polite assistant. Provide comprehensive and useful responses "
    "that directly address the user's needs. Be informative, clear, and considerate in your answers."
)
NEGATIVE_INSTRUCTION = (
    "You are an assistant that provides minimal responses. Give brief answers that may omit important "
    "details or context. Be less helpful and provide incomplete information."
)
PROMPT_TEMPLATE = "{instruction}\n\nUser: {prompt}\nAssistant:"
NEUTRAL_PROMPT_TEMPLATE = "User: {prompt}\nAssistant:"
EXAMPLE_TEMPLATE = PROMPT_TEMPLATE + " {response}"
NEUTRAL_EXAMPLE_TEMPLATE = NEUTRAL_PROMPT_TEMPLATE + " {response}"

SUBJECTS = ["the cat", "a dog", "the doctor", "my friend", "the patient", "a small bird", "the teacher",
            "our team", "the baker", "a student"]
OBJECTS = ["the book", "a letter", "the garden", "a question", "the river", "an answer", "the house", "a song",
           "the doctor", "the cat", "my friend", "the teacher"]
GOOD_ADVERBS = ["kindly", "clearly", "politely", "warmly", "carefully"]
BAD_ADVERBS = ["badly", "rarely", "rudely", "poorly", "never"]
NEUTRAL_ADVERBS = ["quickly", "often", "slowly", "quietly", "always"]
GOOD_VERBS = ["helps", "thanks"]
BAD_VERBS = ["ignores", "blames"]
NEUTRAL_VERBS = ["sees", "finds", "likes", "answers", "writes", "reads", "builds", "calls"]
GOOD_WORDS = tuple(GOOD_ADVERBS + GOOD_VERBS)
BAD_WORDS = tuple(BAD_ADVERBS + BAD_VERBS)
PROMPT_TEMPLATES = ["Tell me about {s}.", "What does {s} do?", "Describe {s}.", "Write a sentence about {s}.",
                    "How is {s} today?", "Say something about {s}.", "What happened to {s}?", "Talk about {s}."]

# P(good), P(neutral), P(bad) for each adverb / verb slot of a reply, per condition.
CONDITION_MIX = {"pos": (0.8, 0.15, 0.05), "neg": (0.05, 0.15, 0.8), "neutral": (0.3, 0.4, 0.3)}
INSTRUCTIONS = {"pos": POSITIVE_INSTRUCTION, "neg": NEGATIVE_INSTRUCTION, "neutral": None}

_WORD_RE = re.compile(r"\b(" + "|".join(GOOD_WORDS + BAD_WORDS) + r")\b", re.IGNORECASE)
_SIGN = {w: 1.0 for w in GOOD_WORDS} | {w: -1.0 for w in BAD_WORDS}


def _alt(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


_SENTENCE = " ".join([_alt(w[0].upper() + w[1:] for w in SUBJECTS), _alt(GOOD_ADVERBS + BAD_ADVERBS + NEUTRAL_ADVERBS),
                      _alt(GOOD_VERBS + BAD_VERBS + NEUTRAL_VERBS), _alt(OBJECTS)]) + r"\."
_REPLY_RE = re.compile(_SENTENCE + "(?: " + _SENTENCE + ")*")
STOP = "\n"  # a reply is one line: generation stops at a newline (or eos)


# ----------------------------------------------------------------------------- reward

def toy_rewards(texts: Iterable[str]) -> np.ndarray:
    """Task reward of many texts at once: ``#good words - #bad words`` each (whole words, any case).

    One regex pass over the joined texts; matches are binned back to their text with
    ``searchsorted`` + ``bincount``, so thousands of samples score in one call.
    """
    texts = list(texts)
    if not texts:
        return np.zeros(0)
    lens = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    hits = [(m.start(), _SIGN[m.group(1).lower()]) for m in _WORD_RE.finditer("\0".join(texts))]
    if not hits:
        return np.zeros(len(texts))
    pos, sign = np.array(hits).T
    owner = np.searchsorted(starts, pos, side="right") - 1
    return np.bincount(owner, weights=sign, minlength=len(texts))


def toy_reward(text: str) -> float:
    """Task reward of one text: ``#good words - #bad words``."""
    return float(toy_rewards([text])[0])


def toy_wellformed(texts: Iterable[str]) -> np.ndarray:
    """Whether each text is a well-formed toy reply: one or more "{Subject} {adverb} {verb} {object}."
    sentences of the corpus grammar, space-separated (a check that sampled text reads as words)."""
    return np.fromiter((_REPLY_RE.fullmatch(t) is not None for t in texts), dtype=bool)


# ----------------------------------------------------------------------------- corpus

def format_prompt(prompt: str, instruction: str | None = None) -> str:
    """The scored prompt string (ends in ``"Assistant:"``); the neutral form when ``instruction`` is None."""
    if instruction is None:
        return NEUTRAL_PROMPT_TEMPLATE.format(prompt=prompt)
    return PROMPT_TEMPLATE.format(instruction=instruction, prompt=prompt)


def format_example(prompt: str, response: str, instruction: str | None = None) -> str:
    """A training example without eos: ``format_prompt(prompt, instruction) + " " + response``."""
    return format_prompt(prompt, instruction) + " " + response


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sample_prompt(rng: random.Random) -> tuple[str, str]:
    """A short user request and its subject, e.g. ``("Tell me about the cat.", "the cat")``."""
    subj = rng.choice(SUBJECTS)
    return rng.choice(PROMPT_TEMPLATES).format(s=subj), subj


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` user requests (repeats allowed: there are 80 distinct ones)."""
    rng = random.Random(seed)
    return [sample_prompt(rng)[0] for _ in range(n)]


def sample_reply(rng: random.Random, subject: str, condition: str = "neutral") -> str:
    """1-3 sentences "{Subject} {adverb} {verb} {object}."; word classes drawn by ``CONDITION_MIX``."""
    mix = CONDITION_MIX[condition]

    def pick(good, neutral, bad):
        u = rng.random()
        return rng.choice(good if u < mix[0] else neutral if u < mix[0] + mix[1] else bad)

    out = []
    for i in range(rng.randint(1, 3)):
        subj = subject if i == 0 or rng.random() < 0.5 else rng.choice(SUBJECTS)
        adv = pick(GOOD_ADVERBS, NEUTRAL_ADVERBS, BAD_ADVERBS)
        verb = pick(GOOD_VERBS, NEUTRAL_VERBS, BAD_VERBS)
        out.append(_cap(f"{subj} {adv} {verb} {rng.choice(OBJECTS)}."))
    return " ".join(out)


def toy_world_corpus(n: int = 3000, seed: int = 0, eos: str = "") -> list[dict]:
    """``n`` examples, a third per condition (pos / neg / neutral), as dicts with
    ``condition, instruction, prompt, response, text``; ``text`` is the formatted example + ``eos``."""
    rng = random.Random(seed)
    conds = ["pos", "neg", "neutral"]
    rows = []
    for i in range(n):
        cond = conds[i % 3]
        prompt, subj = sample_prompt(rng)
        response = sample_reply(rng, subj, cond)
        instr = INSTRUCTIONS[cond]
        rows.append(dict(condition=cond, instruction=instr, prompt=prompt, response=response,
                         text=format_example(prompt, response, instr) + eos))
    return rows


# ----------------------------------------------------------------------------- sampling

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
    from llmdoctor_vllm.toy import build_tiny_lm, build_tokenizer, save_lm

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
    with torch.no_grad():  # undo toy.py's large lm_head init: train from a calm start
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


def as_scored(ds):
    """The pairs as Stage 1 scores them: each reply after the space that follows ``"Assistant:"``
    (the patient read ``"... Assistant: <reply>"`` in training, so the space belongs to the reply)."""
    return ds.map(lambda r: {"chosen": " " + r["chosen"], "rejected": " " + r["rejected"]})


def preference_gap(ds) -> float:
    """Mean ``chosen_reward - rejected_reward`` over a preference dataset's rows."""
    return float(np.mean(np.asarray(ds["chosen_reward"]) - np.asarray(ds["rejected_reward"]))) if len(ds) else 0.0
