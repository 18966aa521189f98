"""Alignment quality on the toy task: LLMdoctor vs GenARM, ARGS, best-of-N and AISP, end to end on CPU.

1. a tiny instruction-following patient is trained on a generated corpus (``toy_world``);
   the task reward is ``#good - #bad`` words;
2. preference pairs: the patient's own replies, ranked by that reward;
3. Stage 1 token rewards from the patient in vLLM (reported: fraction rewarded, and how the
   summed token rewards correlate with the task reward on the training pairs);
4. Stage 2: a TFPO LoRA doctor and a GenARM LoRA doctor (same trainer, ``--loss-type genarm``);
5. held-out prompts decoded in ONE vLLM engine: the patient alone; each doctor with the product
   and the delta rule over a beta sweep; ARGS (top-k rescored by the reward, w swept) and AISP
   as logits processors; best-of-N with vLLM's ``n``.
   ARGS, best-of-N and AISP score with the task's own reward (an oracle reward model: this
   favours them).

Per method and setting: mean held-out reward, win rate vs the patient, distinct-1/2/3,
self-BLEU, perplexity under the patient, share of well-formed replies, and compute. Writes
``quality.json``, ``quality.md`` (the table), ``quality.png`` (reward vs distinct-2) and
``quality_compute.png`` (reward vs compute) to ``--output-dir``.

    python benchmarks/quality.py                          # the full default run (~15 min on 2 cores)
    python benchmarks/quality.py --quick --output-dir /tmp/q   # the smoke-test size (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines start in seconds
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]

METHODS = ("patient", "llmdoctor_product", "llmdoctor_delta", "genarm_product", "genarm_delta", "args",
           "best_of_4", "best_of_16", "aisp")
EVAL_SEED = 12345  # held-out prompts (training pairs use seed 0)
SAMPLE_SEED = 1000  # request i samples with seed SAMPLE_SEED + i in every method
MULTI_SEED = 1_000_000  # with n > 1 samples, prompt i seeds MULTI_SEED + 1000 i (+ j for its j-th sample)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where models, pairs and rewards are built (default: a temp dir)")
    p.add_argument("--output-dir", default=str(HERE / "results"), help="where results go (benchmarks/results)")
    p.add_argument("--name", default="quality", help="results file stem (quality)")
    p.add_argument("--reuse", action="store_true", help="reuse the patient, rewards and doctors found in --workdir")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test size: tiny training, 8 prompts, one setting per method")
    g = p.add_argument_group("sizes")
    g.add_argument("--patient-steps", type=int, default=300, help="patient training steps (300)")
    g.add_argument("--pair-prompts", type=int, default=256, help="prompts sampled for preference pairs (256)")
    g.add_argument("--samples-per-prompt", type=int, default=4, help="replies per pair prompt (4)")
    g.add_argument("--train-steps", type=int, default=300, help="doctor training steps, TFPO and GenARM (300)")
    g.add_argument("--n-eval", type=int, default=64, help="held-out prompts (64)")
    g.add_argument("--max-tokens", type=int, default=48, help="max reply tokens (48)")
    s = p.add_argument_group("sweeps")
    s.add_argument("--betas", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0, 2.0, 4.0],
                   help="doctor weights, every doctor x rule (the small ones reach the diversity floor)")
    s.add_argument("--args-w", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0], help="ARGS reward weights")
    s.add_argument("--args-k", type=int, default=10, help="ARGS candidates (10)")
    s.add_argument("--best-of", type=int, nargs="+", default=[2, 4, 8, 16], help="best-of-N sizes (2 4 8 16)")
    s.add_argument("--aisp", nargs="+", default=["1:0.5:2", "1:1:2", "1:1:4", "0.25:1:4", "0.5:2:4"], metavar="LAM:SIGMA:ITERS",
                   help="AISP points, n=4 samples per iteration")
    s.add_argument("--aisp-tau", type=int, default=24, help="AISP perturbed positions (24)")
    args = p.parse_args(argv)
    if args.quick:
        args.patient_steps, args.pair_prompts, args.train_steps, args.n_eval = 60, 24, 4, 8
        args.betas, args.args_w, args.best_of, args.aisp = [1.0], [1.0], [4], ["1:1:2"]
    return args


def _say(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


# ----------------------------------------------------------------------------- steps 1-4: the world and the doctors

ENGINE_KW = dict(dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=128 << 20, seed=0)


def build_patient(root: Path, args) -> dict:
    from llmdoctor_vllm import toy_world as tw

    folder = root / "patient" / "patient"
    if args.reuse and (folder / "config.json").exists():
        return {"patient": str(folder), "reused": True}
    built = tw.build_toy_patient(root / "patient", steps=args.patient_steps, measure=32)
    return {"patient": built["patient"], "rewards_by_instruction": built["rewards"],
            "wellformed_by_instruction": built["wellformed"], "final_loss": built["final_loss"],
            "build_seconds": built["build_seconds"]}


def stage1(root: Path, patient: str, args) -> dict:
    """Preference pairs from the patient + Stage 1 token rewards; their summary and correlations."""
    from datasets import load_from_disk

    from llmdoctor_vllm import toy_world as tw
    from quality_metrics import pearson

    out = root / "rewards"
    if not (args.reuse and (out / "summary.json").exists()):
        from vllm import LLM

        from train.rewards_pipeline import compute_rewards

        prefs = tw.make_preference_dataset(patient, n_prompts=args.pair_prompts,
                                           samples_per_prompt=args.samples_per_prompt, seed=0,
                                           max_new_tokens=args.max_tokens)
        prefs = tw.as_scored(prefs)  # replies with the space after "Assistant:", as Stage 1 scores them
        prefs.save_to_disk(str(root / "prefs"))
        scorer = LLM(model=patient, **ENGINE_KW)
        compute_rewards(prefs, patient, out, llm=scorer, progress=False)
        del scorer
    prefs = load_from_disk(str(root / "prefs"))
    summary = json.loads((out / "summary.json").read_text())
    ds = load_from_disk(str(out))
    rows = ds["row_index"]
    cr, rr = (np.asarray(prefs[c], dtype=float)[rows] for c in ("chosen_reward", "rejected_reward"))
    cs = np.array([np.sum(x) for x in ds["chosen_rewards"]])
    rs = np.array([np.sum(x) for x in ds["rejected_rewards"]])
    return {"pairs": len(prefs), "pairs_scored": len(ds), "mean_task_gap": float(np.mean(cr - rr)),
            "tokens": summary["tokens"], "fraction_rewarded": summary["fraction_rewarded"],
            "mean_abs_reward": summary["mean_abs_reward"],
            "pearson_gap": pearson(cs - rs, cr - rr),
            "pearson_per_response": pearson(np.concatenate([cs, rs]), np.concatenate([cr, rr])),
            "note": "pearson_gap: per pair, (sum of chosen token rewards - sum of rejected) vs the task-reward gap; "
                    "pearson_per_response: each response's summed token rewards vs its task reward (their sign "
                    "comes from the chosen/rejected label, so this one is partly the label)"}


def train_doctors(root: Path, patient: str, args) -> dict:
    """TFPO and GenARM LoRA doctors, trained side by side in two one-thread processes."""
    common = ["--rewards", str(root / "rewards"), "--model", patient, "--lora-r", "8", "--max-steps",
              str(args.train_steps), "--batch-size", "8", "--warmup-steps", str(min(20, args.train_steps // 5)),
              "--learning-rate", "5e-4", "--subtb-weighting", "trajectory", "--logging-steps", "50",
              "--save-steps", "100000", "--report-to", "none"]
    jobs, paths, t0 = {}, {}, time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name, loss in (("tfpo", "tfpo"), ("genarm", "genarm")):
        paths[name] = str(root / f"doctor_{name}")
        if args.reuse and (Path(paths[name]) / "llmdoctor.json").exists():
            continue
        cmd = [sys.executable, "-m", "train.train_cli", *common, "--output", paths[name], "--loss-type", loss,
               "--trained-for", f"toy: good words ({loss})"]
        log = open(root / f"train_{name}.log", "w")
        jobs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in jobs.items():
        rc = proc.wait()
        log.close()
        if rc:
            raise RuntimeError(f"training the {name} doctor failed ({rc}):\n"
                               + (root / f"train_{name}.log").read_text()[-3000:])
    return {"paths": paths, "train_seconds": time.perf_counter() - t0}


def probe_doctors(root: Path, paths: dict, n_prompts: int, n_pairs: int = 64) -> dict:
    """What each LoRA doctor learned, adapter on vs off (the delta rule's reference), in transformers.

    ``slots``: mean probability of the good and of the bad words at the adverb slot ("... Assistant:
    The cat _") and the verb slot ("... The cat quickly _") of held-out prompts. ``pairs``: on up to
    ``n_pairs`` training pairs, the doctor's shift of ``log p(chosen) - log p(rejected)`` against
    Stage 1's target ``sum r(chosen) - sum r(rejected)`` (TFPO's optimum matches them; GenARM's
    loss scales them by 1 / beta_r)."""
    import contextlib
    import random

    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from llmdoctor_vllm import toy_world as tw
    from llmdoctor_vllm.checkpoint import load_doctor

    tok = AutoTokenizer.from_pretrained(paths["tfpo"])
    tok.padding_side = "right"
    ids = lambda words: [tok(" " + w)["input_ids"][0] for w in words]  # noqa: E731  (one token each)
    rng = random.Random(EVAL_SEED)
    heads = [tw.format_prompt(p) + " " + s[0].upper() + s[1:] for p, s in (tw.sample_prompt(rng)
                                                                             for _ in range(n_prompts))]
    slots = {"adverb": (heads, ids(tw.GOOD_ADVERBS), ids(tw.BAD_ADVERBS)),
             "verb": ([h + " " + rng.choice(tw.NEUTRAL_ADVERBS) for h in heads], ids(tw.GOOD_VERBS),
                      ids(tw.BAD_VERBS))}
    pairs = load_from_disk(str(root / "rewards"))
    pairs = pairs.select(range(min(n_pairs, len(pairs))))
    out = {}
    with tw.torch_threads(1), torch.no_grad():
        for name, path in paths.items():
            model = load_doctor(path, load_reference=False).model.eval()

            def logp(run, enc):  # next-token log-probs at every position, adapter on (run=model) or off
                return torch.log_softmax(run(**enc).logits, -1)

            res = {"slots": {}}
            for slot, (texts, good, bad) in slots.items():
                enc = tok(texts, return_tensors="pt", padding=True)
                last = enc["attention_mask"].sum(1) - 1
                for tag, ctx in (("doctor", None), ("reference", model.disable_adapter)):
                    with ctx() if ctx else contextlib.nullcontext():
                        lp = logp(model, enc)[torch.arange(len(texts)), last].exp()
                    res["slots"][f"{slot}_{tag}"] = {"p_good": float(lp[:, good].sum(1).mean()),
                                                     "p_bad": float(lp[:, bad].sum(1).mean())}
            shift, target = [], []
            for r in pairs:
                total = 0.0
                for side, sign in (("chosen", 1), ("rejected", -1)):
                    x = torch.tensor([r["prompt_ids"] + r[f"{side}_ids"]])
                    n = len(r["prompt_ids"])
                    for ctx, w in ((None, 1), (model.disable_adapter, -1)):
                        with ctx() if ctx else contextlib.nullcontext():
                            lp = logp(model, {"input_ids": x})[0, n - 1:-1].gather(1, x[0, n:, None]).sum()
                        total += sign * w * float(lp)
                shift.append(total)
                target.append(sum(r["chosen_rewards"]) - sum(r["rejected_rewards"]))
            from quality_metrics import pearson

            res["pairs"] = {"logratio_shift": float(np.mean(shift)), "stage1_target": float(np.mean(target)),
                            "pearson": pearson(shift, target), "n": len(shift)}
            out[name] = res
            del model
    return out


def probe_lines(probe: dict) -> list[str]:
    """One readable line per doctor from :func:`probe_doctors`."""
    lines = []
    for name, r in probe.items():
        sl = r["slots"]
        slots = "; ".join(f"{k} P(good)/P(bad) {sl[k + '_reference']['p_good']:.2f}/{sl[k + '_reference']['p_bad']:.2f}"
                          f" -> {sl[k + '_doctor']['p_good']:.2f}/{sl[k + '_doctor']['p_bad']:.2f}"
                          for k in ("adverb", "verb"))
        lines.append(f"{name}: {slots} (adapter off -> on); pair log-ratio shift {r['pairs']['logratio_shift']:+.2f} "
                     f"vs Stage 1 target {r['pairs']['stage1_target']:+.2f} (pearson {r['pairs']['pearson']:.2f})")
    return lines


# ----------------------------------------------------------------------------- step 5: decoding

class Bench:
    """The one decoding engine, the held-out prompts, and the per-setting evaluation."""

    def __init__(self, patient: str, doctors: dict, table_path: str, args):
        from vllm import LLM

        from llmdoctor_vllm import toy_world as tw
        from llmdoctor_vllm.baselines.aisp import AISPLogitsProcessor
        from llmdoctor_vllm.baselines.args import ARGSLogitsProcessor

        self.tw, self.args = tw, args
        self.llm = LLM(model=patient, logits_processors=[ARGSLogitsProcessor, AISPLogitsProcessor],
                       additional_config={"llmdoctor": {"doctors": doctors, "beta": 0.0},
                                          "args": {"token_rewards": table_path}}, **ENGINE_KW)
        self.tok = self.llm.get_tokenizer()
        self.prompts = [tw.format_prompt(p) for p in tw.toy_prompts(args.n_eval, seed=EVAL_SEED)]
        self.baseline = None  # the patient's rewards per prompt (for win rates)

    def params(self, i: int, extra: dict | None = None, n: int = 1):
        from vllm import SamplingParams

        # vLLM seeds the n samples of a request seed, seed + 1, ...: keep prompts' seed ranges disjoint
        seed = SAMPLE_SEED + i if n == 1 else MULTI_SEED + 1000 * i
        return SamplingParams(max_tokens=self.args.max_tokens, temperature=1.0, seed=seed, n=n,
                              stop=[self.tw.STOP], extra_args=extra)

    def sample(self, extra: dict | None = None, n: int = 1):
        """Every prompt once (``n`` samples each); returns (texts [prompts][n], token counts, seconds)."""
        t0 = time.perf_counter()
        outs = self.llm.generate(self.prompts, [self.params(i, extra, n) for i in range(len(self.prompts))],
                                 use_tqdm=False)
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
        from quality_metrics import diversity, perplexity, win_rate

        r = self.tw.toy_rewards(texts)
        if self.baseline is None:
            self.baseline = r
        pt = {"setting": setting, "reward": float(r.mean()), "reward_sem": float(r.std(ddof=1) / np.sqrt(len(r))),
              "win_rate": win_rate(r, self.baseline), **diversity(texts),
              "perplexity": perplexity(self.patient_logprobs(texts)),
              "wellformed": float(self.tw.toy_wellformed(texts).mean()),
              "mean_words": float(np.mean([len(t.split()) for t in texts])),
              "compute": compute["token_forwards"] / len(texts), "compute_detail": compute,
              "samples": texts[:3]}
        _say(f"  {json.dumps(setting)}: reward {pt['reward']:+.2f} win {pt['win_rate']:.2f} "
             f"d2 {pt['distinct_2']:.3f} sbleu {pt['self_bleu']:.3f} ppl {pt['perplexity']:.2f} "
             f"wf {pt['wellformed']:.0%} compute {pt['compute']:.0f}")
        return pt


def run_decoding(bench: Bench, args) -> dict:
    """Every method over its sweep; returns ``{method: [points]}``."""
    tw = bench.tw
    k = args.args_k
    sizes = sorted(set(args.best_of) | {4, 16})  # the keys always present (best-of-16 empty in --quick)
    methods = {m: [] for m in METHODS if not m.startswith("best_of_")}
    methods = {**{m: v for m, v in methods.items() if m != "aisp"}, **{f"best_of_{n}": [] for n in sizes}, "aisp": []}

    texts, toks, dt = bench.sample()
    methods["patient"].append(bench.point({}, [t[0] for t in texts], _compute(toks, dt)))

    for doctor, prefix in (("tfpo", "llmdoctor"), ("genarm", "genarm")):
        for rule in ("product", "delta"):
            passes = 1 if rule == "product" else 2  # delta: the doctor with its adapter on and off
            for b in args.betas:
                texts, toks, dt = bench.sample({f"llmdoctor_beta_{doctor}": b, "llmdoctor_rule": rule})
                methods[f"{prefix}_{rule}"].append(bench.point(
                    {"beta": b, "rule": rule, "doctor": doctor}, [t[0] for t in texts],
                    _compute(toks, dt, doctor=passes * toks)))

    for w in args.args_w:
        texts, toks, dt = bench.sample({"args_w": w, "args_k": k})
        methods["args"].append(bench.point({"w": w, "k": k}, [t[0] for t in texts],
                                           _compute(toks, dt, rm=k * toks)))

    for n in args.best_of:
        texts, toks, dt = bench.sample(n=n)
        best = [ts[int(np.argmax(tw.toy_rewards(ts)))] for ts in texts]
        methods[f"best_of_{n}"].append(bench.point({"N": n}, best, _compute(toks, dt, rm=toks)))

    from llmdoctor_vllm.baselines.aisp import aisp_generate

    for spec in args.aisp:
        lam, sigma, iters = (float(x) for x in spec.split(":"))
        t0 = time.perf_counter()
        res = aisp_generate(bench.llm, bench.prompts, tw.toy_rewards, n=4, iterations=int(iters), sigma=sigma,
                            lam=lam, tau=args.aisp_tau, max_tokens=args.max_tokens, temperature=1.0,
                            stop=[tw.STOP], seed=0)
        toks = res["compute"]["generated_tokens"]
        methods["aisp"].append(bench.point({"lambda": lam, "sigma": sigma, "iterations": int(iters), "n": 4,
                                            "tau": args.aisp_tau}, [t.strip() for t in res["texts"]],
                                           _compute(toks, time.perf_counter() - t0, rm=toks)))
    return methods


def _compute(generated: int, seconds: float, doctor: int = 0, rm: int = 0) -> dict:
    """Compute of one setting, in token forwards of patient-sized models (the doctors are LoRA on the patient)."""
    return {"generated_tokens": generated, "doctor_token_forwards": doctor, "reward_model_token_evals": rm,
            "token_forwards": generated + doctor + rm, "wall_seconds": seconds}


# ----------------------------------------------------------------------------- reporting

LABELS = {"patient": "patient", "llmdoctor_product": "LLMdoctor (TFPO), product", "llmdoctor_delta":
          "LLMdoctor (TFPO), delta", "genarm_product": "GenARM, product", "genarm_delta": "GenARM, delta",
          "args": "ARGS (oracle RM)", "best_of_4": "best-of-4 (oracle RM)", "best_of_16": "best-of-16 (oracle RM)",
          "aisp": "AISP (oracle RM)"}


def targets(methods: dict, ppl_factor: float | None = None) -> dict:
    """The issue's targets: among points whose distinct-2 is >= 95% of the patient's, LLMdoctor's best
    reward vs GenARM's best and vs best-of-16's reward (that point's reward whatever its distinct-2,
    and within the floor). With ``ppl_factor``, points must also keep their perplexity under the
    patient within ``ppl_factor`` times the patient's (garbled text is diverse too)."""
    ref = methods["patient"][0]
    floor = 0.95 * ref["distinct_2"]
    ppl_max = ppl_factor * ref["perplexity"] if ppl_factor else float("inf")
    ok = lambda p: p["distinct_2"] >= floor and p.get("perplexity", 0) <= ppl_max  # noqa: E731

    def best(names, within=True):
        pts = [p for m in names for p in methods.get(m, []) if ok(p) or not within]
        return max((p["reward"] for p in pts), default=None)

    ours, genarm = best(["llmdoctor_product", "llmdoctor_delta"]), best(["genarm_product", "genarm_delta"])
    bo16, bo16_all = best(["best_of_16"]), best(["best_of_16"], within=False)
    ge = lambda a, b: None if a is None or b is None else bool(a >= b)  # noqa: E731
    out = {"distinct_2_floor": floor, "llmdoctor_best": ours, "genarm_best": genarm,
           "best_of_16": bo16_all, "best_of_16_within_floor": bo16,
           "llmdoctor_ge_genarm": ge(ours, genarm), "llmdoctor_ge_best_of_16": ge(ours, bo16_all),
           "llmdoctor_ge_best_of_16_within_floor": ge(ours, bo16)}
    if ppl_factor:
        out["perplexity_max"] = ppl_max
    return out


def _fmt_setting(s: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()
                     if k not in ("doctor",)) or "-"


def markdown_table(methods: dict) -> str:
    rows = ["| method | setting | reward | win rate | distinct-2 | self-BLEU | ppl | well-formed | compute |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m, pts in methods.items():
        for p in pts:
            label = LABELS.get(m, f"best-of-{m[8:]} (oracle RM)" if m.startswith("best_of_") else m)
            rows.append(f"| {label} | {_fmt_setting(p['setting'])} | {p['reward']:+.2f} | "
                        f"{p['win_rate']:.2f} | {p['distinct_2']:.3f} | {p['self_bleu']:.3f} | "
                        f"{p['perplexity']:.2f} | {p['wellformed']:.0%} | {p['compute']:.0f} |")
    return "\n".join(rows) + "\n"


def plot(methods: dict, path: Path, x: str, xlabel: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    curves = {m: pts for m, pts in methods.items() if pts and not m.startswith("best_of_")}
    curves["best-of-N (oracle RM)"] = sorted((p for m, pts in methods.items() if m.startswith("best_of_") for p in pts),
                                            key=lambda p: p["setting"]["N"])
    garbled = 1.5 * methods["patient"][0]["perplexity"]
    for i, (m, pts) in enumerate(curves.items()):  # points joined in sweep order (beta, w, N ... ascending)
        if not pts:
            continue
        color = "k" if m == "patient" else f"C{i - 1}"
        ax.plot([p[x] for p in pts], [p["reward"] for p in pts], "*" if m == "patient" else "o-", color=color,
                label=LABELS.get(m, m), markersize=12 if m == "patient" else 4)
        bad = [p for p in pts if p["perplexity"] > garbled]
        ax.plot([p[x] for p in bad], [p["reward"] for p in bad], "o", color=color, mfc="white", ms=7)
    ax.plot([], [], "o", color="grey", mfc="white", label="perplexity > 1.5x the patient's (garbled)")
    if x == "distinct_2":
        ax.axvline(0.95 * methods["patient"][0]["distinct_2"], color="grey", ls=":", lw=1,
                   label="95% of the patient's distinct-2")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean held-out task reward (#good - #bad words)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from llmdoctor_vllm import toy_world as tw
    from llmdoctor_vllm.baselines.args import token_reward_table

    root = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-quality-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    _say(f"1/5 patient ({args.patient_steps} steps) in {root}")
    patient = build_patient(root, args)
    _say(f"    {patient}")
    _say("2-3/5 preference pairs and Stage 1 token rewards")
    s1 = stage1(root, patient["patient"], args)
    _say(f"    {json.dumps({k: v for k, v in s1.items() if k != 'note'})}")
    _say(f"4/5 Stage 2: TFPO and GenARM LoRA doctors, {args.train_steps} steps each")
    docs = train_doctors(root, patient["patient"], args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    docs["probe"] = probe_doctors(root, docs["paths"], n_prompts=args.n_eval)
    for line in probe_lines(docs["probe"]):
        _say("    " + line)

    _say("5/5 decoding held-out prompts in one engine")
    from transformers import AutoTokenizer

    table = token_reward_table(AutoTokenizer.from_pretrained(patient["patient"]), tw.toy_reward)
    np.save(root / "token_rewards.npy", table)
    bench = Bench(patient["patient"], docs["paths"], str(root / "token_rewards.npy"), args)
    t_dec = time.perf_counter()
    methods = run_decoding(bench, args)

    result = {
        "task": "toy instruction world (llmdoctor_vllm/toy_world.py): reward = #good - #bad words of a reply; "
                f"{args.n_eval} held-out prompts (seed {EVAL_SEED}), sampled at temperature 1, max {args.max_tokens} "
                "tokens, stop at newline, request i seeded 1000+i (best-of-N: 10^6 + 1000 i + j)",
        "reward_model": "ARGS, best-of-N and AISP score with the task reward itself (an oracle reward model; "
                        "ARGS through its exact token table): this favours those baselines",
        "compute_unit": "token forwards per prompt of patient-sized models: generated tokens (all samples) + "
                        "doctor token forwards (LoRA doctor on the patient: 1 per token with the product rule, 2 "
                        "with delta: adapter on and off) + reward-model token evaluations a non-oracle reward model "
                        "would need (best-of-N / AISP: each sample scored once; ARGS: k candidates per step); "
                        "prompt prefill not counted; wall seconds in compute_detail",
        "perplexity": "corpus perplexity of the final replies' tokens under the plain patient (vLLM prompt logprobs)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("workdir", "output_dir", "reuse")},
        "patient": patient, "stage1": s1, "doctors": docs,
        "methods": methods, "targets": targets(methods), "targets_fluent": targets(methods, ppl_factor=1.5),
        "seconds": {"total": time.perf_counter() - t_start, "decoding": time.perf_counter() - t_dec},
    }
    from common import command_line, write_results

    command = command_line(__file__, argv)
    path = write_results(args.name, result, out, command, indent=1)
    table_md = markdown_table(methods)
    (out / f"{args.name}.md").write_text(
        f"# Alignment quality on the toy task\n\n`{command}`\n\n{result['task']}.\n"
        f"{result['reward_model']}.\n\nCompute: {result['compute_unit']}.\n\n" + table_md
        + f"\nTargets: {json.dumps(result['targets'])}\n\nTargets with perplexity <= 1.5x the patient's: "
          f"{json.dumps(result['targets_fluent'])}\n\nStage 1: {json.dumps(s1)}\n\nWhat the doctors learned "
          "(probe_doctors):\n\n" + "".join(f"- {line}\n" for line in probe_lines(docs["probe"])))
    plot(methods, out / f"{args.name}.png", "distinct_2", "distinct-2 of the replies (diversity)")
    plot(methods, out / f"{args.name}_compute.png", "compute", "compute: token forwards per prompt (log)", logx=True)
    print(table_md)
    _say(f"targets: {json.dumps(result['targets'])}")
    _say(f"targets, perplexity <= 1.5x the patient's: {json.dumps(result['targets_fluent'])}")
    _say(f"wrote {path}, {args.name}.md, {args.name}.png, {args.name}_compute.png in {out} "
         f"({result['seconds']['total']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
