"""A tiny, self-contained alignment task: a patient that follows instructions, a task reward, preferences.

The world is short assistant replies made of simple sentences ("The cat kindly helps the
doctor."). Some words are GOOD (kindly, clearly, ..., helps) and some BAD (badly, rarely, ...,
never); the task reward of a text is ``#good words - #bad words``. A tiny Qwen2 *patient* is
trained from scratch on replies written under Stage 1's default positive instruction (they
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

import random
import re
from typing import Iterable

import numpy as np

from llmdoctor_train.stage1.data import render_plain
from llmdoctor_train.stage1.rewards import DEFAULT_NEGATIVE as NEGATIVE_INSTRUCTION
from llmdoctor_train.stage1.rewards import DEFAULT_POSITIVE as POSITIVE_INSTRUCTION

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
ADVERBS = GOOD_ADVERBS + BAD_ADVERBS + NEUTRAL_ADVERBS
VERBS = GOOD_VERBS + BAD_VERBS + NEUTRAL_VERBS
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


_SENTENCE = " ".join([_alt(w[0].upper() + w[1:] for w in SUBJECTS), _alt(ADVERBS), _alt(VERBS), _alt(OBJECTS)]) + r"\."
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
    return render_plain([{"role": "user", "content": prompt}], instruction)


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


def as_scored(ds):
    """The pairs as Stage 1 scores them: each reply after the space that follows ``"Assistant:"``
    (the patient read ``"... Assistant: <reply>"`` in training, so the space belongs to the reply)."""
    return ds.map(lambda r: {"chosen": " " + r["chosen"], "rejected": " " + r["rejected"]})


def preference_gap(ds) -> float:
    """Mean ``chosen_reward - rejected_reward`` over a preference dataset's rows."""
    return float(np.mean(np.asarray(ds["chosen_reward"]) - np.asarray(ds["rejected_reward"]))) if len(ds) else 0.0
