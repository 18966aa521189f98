"""The decoding side of the quality benchmark: one vLLM engine with the plugin, ARGS and AISP
loaded, every method over its sweep on the held-out prompts, and the metrics of each point."""

from __future__ import annotations

import json
import time

import numpy as np

from benchmarks.baselines.aisp import aisp_generate
from benchmarks.quality_metrics import diversity, perplexity, win_rate
from llmdoctor_train.toy import pipeline as tp
from llmdoctor_train.toy import world

METHODS = ("patient", "llmdoctor_product", "llmdoctor_delta", "genarm_product", "genarm_delta", "args",
           "best_of_4", "best_of_16", "aisp")


def _say(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


class Bench:
    """The one decoding engine, the held-out prompts, and the per-setting evaluation."""

    def __init__(self, patient: str, doctors: dict, table_path: str, args):
        from benchmarks.baselines.aisp import AISPLogitsProcessor
        from benchmarks.baselines.args import ARGSLogitsProcessor

        self.args = args
        self.llm = tp.guided_engine(patient, doctors, {"args": {"token_rewards": table_path}},
                                    logits_processors=[ARGSLogitsProcessor, AISPLogitsProcessor])
        self.tok = self.llm.get_tokenizer()
        self.prompts = tp.eval_prompts(args.n_eval)
        self.baseline = None  # the patient's rewards per prompt (for win rates)

    def sample(self, extra: dict | None = None, n: int = 1):
        """Every prompt once (``n`` samples each); returns (texts [prompts][n], token counts, seconds)."""
        t0 = time.perf_counter()
        outs = tp.generate(self.llm, self.prompts, extra, n=n, max_tokens=self.args.max_tokens,
                           offset=self.args.sample_seed)
        dt = time.perf_counter() - t0
        texts = [[c.text.strip() for c in o.outputs] for o in outs]
        return texts, int(sum(len(c.token_ids) for o in outs for c in o.outputs)), dt

    def patient_logprobs(self, texts: list[str]) -> list[list[float]]:
        """Log-probabilities under the plain patient of each reply's tokens (after its prompt), via prompt_logprobs."""
        from vllm import SamplingParams, TokensPrompt

        reqs, spans = [], []
        for prompt, text in zip(self.prompts, texts):
            p_ids = self.tok(prompt)["input_ids"]
            ids = self.tok(prompt + " " + text)["input_ids"] if text else p_ids
            if ids[:len(p_ids)] != p_ids:  # never seen with this tokenizer; score the reply alone then
                ids = p_ids + self.tok(" " + text)["input_ids"]
            reqs.append(TokensPrompt(prompt_token_ids=ids))
            spans.append((len(p_ids), ids))
        outs = self.llm.generate(reqs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        return [[o.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids))]
                for o, (start, ids) in zip(outs, spans)]

    def point(self, setting: dict, texts: list[str], compute: dict) -> dict:
        """All metrics of one method setting from its final reply per prompt."""
        r = world.toy_rewards(texts)
        if self.baseline is None:
            self.baseline = r
        pt = {"setting": setting, "reward": float(r.mean()), "reward_sem": float(r.std(ddof=1) / np.sqrt(len(r))),
              "win_rate": win_rate(r, self.baseline), **diversity(texts),
              "perplexity": perplexity(self.patient_logprobs(texts)),
              "wellformed": float(world.toy_wellformed(texts).mean()),
              "mean_words": float(np.mean([len(t.split()) for t in texts])),
              "compute": compute["token_forwards"] / len(texts), "compute_detail": compute,
              "samples": texts[:3]}
        _say(f"  {json.dumps(setting)}: reward {pt['reward']:+.2f} win {pt['win_rate']:.2f} "
             f"d2 {pt['distinct_2']:.3f} sbleu {pt['self_bleu']:.3f} ppl {pt['perplexity']:.2f} "
             f"wf {pt['wellformed']:.0%} compute {pt['compute']:.0f}")
        return pt


def run_decoding(bench: Bench, args) -> dict:
    """Every method over its sweep; returns ``{method: [points]}``."""
    k = args.args_k
    sizes = sorted(set(args.best_of) | {4, 16})  # the keys always present (best-of-16 empty in --quick)
    methods = {m: [] for m in METHODS if not m.startswith("best_of_")}
    methods = {**{m: v for m, v in methods.items() if m != "aisp"}, **{f"best_of_{n}": [] for n in sizes}, "aisp": []}

    texts, toks, dt = bench.sample()
    methods["patient"].append(bench.point({}, [t[0] for t in texts], _compute(toks, dt)))

    # decoding options beside the beta sweep: sent as llmdoctor_<name>, recorded in each point's setting
    options = ({"patient_min_p": args.patient_min_p} if args.patient_min_p else {}) | (
        {"alpha": args.alpha} if args.alpha != 1.0 else {})
    extra = {f"llmdoctor_{k}": v for k, v in options.items()}
    for doctor, prefix in (("tfpo", "llmdoctor"), ("genarm", "genarm"))[:1 if args.tfpo_only else 2]:
        for rule in ("product", "delta"):
            passes = 1 if rule == "product" else 2  # delta: the doctor with its adapter on and off
            for b in args.betas:
                texts, toks, dt = bench.sample({f"llmdoctor_beta_{doctor}": b, "llmdoctor_rule": rule, **extra})
                setting = {"beta": b, "rule": rule, "doctor": doctor, **options}
                methods[f"{prefix}_{rule}"].append(bench.point(setting, [t[0] for t in texts],
                                                               _compute(toks, dt, doctor=passes * toks)))

    if args.tfpo_only or args.doctors_only:
        return methods
    for w in args.args_w:
        texts, toks, dt = bench.sample({"args_w": w, "args_k": k})
        methods["args"].append(bench.point({"w": w, "k": k}, [t[0] for t in texts],
                                           _compute(toks, dt, rm=k * toks)))

    for n in args.best_of:
        texts, toks, dt = bench.sample(n=n)
        best = [ts[int(np.argmax(world.toy_rewards(ts)))] for ts in texts]
        methods[f"best_of_{n}"].append(bench.point({"N": n}, best, _compute(toks, dt, rm=toks)))

    for spec in args.aisp:
        lam, sigma, iters = (float(x) for x in spec.split(":"))
        t0 = time.perf_counter()
        res = aisp_generate(bench.llm, bench.prompts, world.toy_rewards, n=4, iterations=int(iters), sigma=sigma,
                            lam=lam, tau=args.aisp_tau, max_tokens=args.max_tokens, temperature=1.0,
                            stop=[world.STOP], seed=args.sample_seed)
        toks = res["compute"]["generated_tokens"]
        methods["aisp"].append(bench.point({"lambda": lam, "sigma": sigma, "iterations": int(iters), "n": 4,
                                            "tau": args.aisp_tau}, [t.strip() for t in res["texts"]],
                                           _compute(toks, time.perf_counter() - t0, rm=toks)))
    return methods


def _compute(generated: int, seconds: float, doctor: int = 0, rm: int = 0) -> dict:
    """Compute of one setting, in token forwards of patient-sized models (the doctors are LoRA on the patient)."""
    return {"generated_tokens": generated, "doctor_token_forwards": doctor, "reward_model_token_evals": rm,
            "token_forwards": generated + doctor + rm, "wall_seconds": seconds}
