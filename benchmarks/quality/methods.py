"""The decoding side of the quality benchmark: one vLLM engine (the plugin with every doctor, and
ARGS), the evaluation prompts through the patient's chat template, and each method's settings.

Every method samples at temperature 1 from the same seeds: prompt ``i`` on seed ``s`` uses
``SEED_STRIDE * s + 1000 * i`` (vLLM seeds a request's ``n`` samples from there), so settings
differ only by their guidance. Best-of-N takes its samples from requests with ``n = 16``: each such
draw gives one best-of-16 and four best-of-4 (from disjoint groups of 4 samples).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llmdoctor_train.real import engine as real_engine
from llmdoctor_train.real.prompts import eval_prompts
from llmdoctor_train.real.sentiment import vader

SEED_STRIDE = 1_000_000
REWARD = "llmdoctor_train.real.sentiment:vader"
POSITIVE_SYSTEM = ("You are a helpful AI assistant named SmolLM, trained by Hugging Face. "
                   "Always reply in a warm, positive and upbeat tone.")


@dataclass
class Setting:
    """One decoding setting of a method: request arguments, an optional system prompt, its cost per
    delivered token (``calls``: model forwards, ``reward_calls``: reward evaluations) and a label."""

    method: str
    params: dict = field(default_factory=dict)
    extra: dict | None = None
    system: str | None = None
    calls: float = 1.0
    reward_calls: float = 0.0

    @property
    def key(self) -> str:
        """A stable label: the method and its parameters."""
        return " ".join([self.method] + [f"{k}={v}" for k, v in self.params.items()])


def settings(doctors: dict[str, str], betas, args_w, args_k: int, rules=("product", "delta")) -> list[Setting]:
    """Every single-sample setting: plain, prompted, each doctor (``{method: plugin doctor name}``) x rule
    x beta, and ARGS over ``args_w``. The delta rule runs each doctor's reference as well: one more call."""
    out = [Setting("plain"), Setting("prompted", system=POSITIVE_SYSTEM)]
    for method, name in doctors.items():
        for b in betas:
            for rule in rules:
                out.append(Setting(method, {"rule": rule, "beta": b},
                                   {f"llmdoctor_beta_{name}": b, "llmdoctor_rule": rule},
                                   calls=2.0 if rule == "product" else 3.0))
    for w in args_w:
        out.append(Setting("args", {"w": w, "k": args_k}, {"args_w": w, "args_k": args_k}, reward_calls=args_k))
    return out


class Bench:
    """The one decoding engine and the evaluation prompts; :meth:`sample` runs one setting on one seed."""

    def __init__(self, patient: str, doctors: dict[str, str], n_prompts: int, max_tokens: int,
                 cache_tokens: int | None = None, **engine_overrides):
        from vllm import LLM

        from benchmarks.quality.baselines.args import ARGSLogitsProcessor

        real_engine.in_process()
        guidance = {"doctors": doctors, "beta": 0.0} | ({"cache_tokens": cache_tokens} if cache_tokens else {})
        additional = {"args": {"reward": REWARD}} | ({"llmdoctor": guidance} if doctors else {})
        self.llm = LLM(model=patient, additional_config=additional, logits_processors=[ARGSLogitsProcessor],
                       **real_engine.engine_kwargs(**engine_overrides))
        self.prompts = eval_prompts(n_prompts)
        self.max_tokens = max_tokens

    def sample(self, setting: Setting, seed: int, n: int = 1) -> dict:
        """Every prompt once under ``setting`` (``n`` samples each): texts ``[prompt][n]``, their token
        counts, VADER scores and the wall seconds."""
        from vllm import SamplingParams

        system = [{"role": "system", "content": setting.system}] if setting.system else []
        chats = [system + real_engine.conversation(p) for p in self.prompts]
        params = [SamplingParams(n=n, temperature=1.0, max_tokens=self.max_tokens, seed=SEED_STRIDE * seed + 1000 * i,
                                 extra_args=setting.extra) for i in range(len(self.prompts))]
        t0 = time.perf_counter()
        outs = self.llm.chat(chats, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        texts = [[c.text.strip() for c in o.outputs] for o in outs]
        tokens = [[len(c.token_ids) for c in o.outputs] for o in outs]
        scores = vader([t for ts in texts for t in ts]).reshape(len(texts), n)
        return {"texts": texts, "tokens": np.array(tokens), "scores": scores, "seconds": seconds}


def best_of(sampled: dict, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Best-of-``n`` by VADER from the first ``n`` samples of each prompt: texts, scores, token counts."""
    scores = sampled["scores"][:, :n]
    pick = scores.argmax(1)
    rows = np.arange(len(pick))
    return [sampled["texts"][i][j] for i, j in enumerate(pick)], scores[rows, pick], sampled["tokens"][rows, pick]
