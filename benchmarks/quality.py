"""Alignment quality on the toy task: LLMdoctor vs GenARM, ARGS, best-of-N and AISP, end to end on CPU.

1. a tiny instruction-following patient is trained on a generated corpus (``llmdoctor_train.toy``);
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

    python -m benchmarks.quality                          # the full default run (~15 min on 2 cores)
    python -m benchmarks.quality --quick --output-dir /tmp/q   # the smoke-test size (~1-2 min)
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

from benchmarks.common import RESULTS, command_line
from benchmarks.quality_methods import Bench, run_decoding
from benchmarks.quality_report import probe_doctors, probe_lines, targets, write_report
from benchmarks.quality_frontier import frontier
from benchmarks.quality_metrics import pearson
from llmdoctor_train.toy import pipeline as tp

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines start in seconds
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


WORLD_KEYS = ("world_seed", "patient_steps", "pair_prompts", "samples_per_prompt", "max_tokens")  # what builds a world
BETAS = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where models, pairs and rewards are built (default: a temp dir)")
    p.add_argument("--output-dir", default=str(RESULTS), help="where results go (benchmarks/results)")
    p.add_argument("--name", default="quality", help="results file stem (quality)")
    p.add_argument("--reuse", action="store_true", help="reuse the patient, rewards and doctors found in --workdir")
    p.add_argument("--tfpo-only", action="store_true", help="decode the patient and the TFPO doctor only (variants)")
    p.add_argument("--doctors-only", action="store_true",
                   help="decode the patient and both doctors only, no baselines (decoding variants)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test size: tiny training, 8 prompts, one setting per method")
    g = p.add_argument_group("sizes")
    g.add_argument("--patient-steps", type=int, default=300, help="patient training steps (300)")
    g.add_argument("--pair-prompts", type=int, default=256, help="prompts sampled for preference pairs (256)")
    g.add_argument("--samples-per-prompt", type=int, default=4, help="replies per pair prompt (4)")
    g.add_argument("--train-steps", type=int, default=300, help="doctor training steps, TFPO and GenARM (300)")
    g.add_argument("--n-eval", type=int, default=64,
                   help="held-out prompts (64). distinct-2 is counted over all replies together, so it falls as "
                        "prompts are added (the patient: 0.35 at 64, 0.15 at 256): the frontier's levels "
                        "0.30 / 0.25 / 0.20 are set for 64")
    g.add_argument("--max-tokens", type=int, default=48, help="max reply tokens (48)")
    g.add_argument("--world-seed", type=int, default=0,
                   help="seed of the world: the patient (corpus, initialisation, training) and the preference "
                        "pairs (0); a --reuse'd workdir must hold the same world")
    g.add_argument("--train-seed", type=int, default=42, help="seed of both doctors' training (42)")
    g.add_argument("--sample-seed", type=int, default=0,
                   help="sampling seed of the held-out decoding, every method (0: the original seeds)")
    g.add_argument("--tfpo-arg", action="append", default=[], metavar="ARG",
                   help="an extra `llmdoctor train` argument for the TFPO doctor, e.g. --tfpo-arg=--lam=0.5 "
                        "(repeatable)")
    g.add_argument("--reward-sign", choices=("label", "patient"), default="label",
                   help="Stage 1's sign of r for the TFPO doctor: the label (the paper's) or log pi_pos - log pi_neg "
                        "(scored into WORKDIR/rewards_patient)")
    g.add_argument("--append-eos", action="store_true",
                   help="both doctors train on responses that end in EOS (Stage 1's --append-eos, scored into "
                        "WORKDIR/rewards[_patient]_eos), so they learn where replies stop, as TRL's DPO does")
    g.add_argument("--tag", default="", help="suffix of the TFPO doctor's folder (variants side by side)")
    s = p.add_argument_group("sweeps")
    s.add_argument("--betas", type=float, nargs="+", default=BETAS,
                   help="doctor weights, every doctor x rule (fine enough that every doctor has points across "
                        "distinct-2 0.20-0.33)")
    s.add_argument("--patient-min-p", type=float, default=0.0,
                   help="both doctors' points decoded with llmdoctor_patient_min_p (0: the full vocabulary)")
    s.add_argument("--alpha", type=float, default=1.0,
                   help="both doctors' points decoded with llmdoctor_alpha, the patient's weight (1: the paper's)")
    s.add_argument("--args-w", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
                   help="ARGS reward weights")
    s.add_argument("--args-k", type=int, default=10, help="ARGS candidates (10)")
    s.add_argument("--best-of", type=int, nargs="+", default=[2, 4, 8, 16], help="best-of-N sizes (2 4 8 16)")
    s.add_argument("--aisp", nargs="+", metavar="LAM:SIGMA:ITERS",
                   default=["1:0.5:2", "1:1:2", "1:0.5:4", "1:1:4", "0.25:1:4", "0.5:2:4", "1:0.5:8", "1:1:8"],
                   help="AISP points, n=4 samples per iteration")
    s.add_argument("--aisp-tau", type=int, default=24, help="AISP perturbed positions (24)")
    args = p.parse_args(argv)
    if args.quick:
        args.patient_steps, args.pair_prompts, args.train_steps, args.n_eval = 60, 24, 4, 8
        args.betas, args.args_w, args.best_of, args.aisp = [1.0], [1.0], [4], ["1:1:2"]
    return args


# ----------------------------------------------------------------------------- steps 1-4: the world and the doctors

def build_patient_and_stage1(root: Path, args) -> tuple[dict, dict]:
    """The patient, preference pairs from it and Stage 1 token rewards (reused from ``root`` with
    ``--reuse``); returns the patient's summary and Stage 1's with its correlations."""
    folder = root / "patient" / "patient"
    marker = root / "world.json"  # absent in workdirs built before --world-seed: world 0
    world = {k: getattr(args, k) for k in WORLD_KEYS}
    if args.reuse and (folder / "config.json").exists() and (root / "rewards" / "summary.json").exists():
        held = json.loads(marker.read_text()) if marker.exists() else {"world_seed": 0}
        if held["world_seed"] != args.world_seed:
            raise SystemExit(f"quality: {root} holds world {held['world_seed']}, not --world-seed {args.world_seed}")
        differ = {k: (v, world[k]) for k, v in held.items() if k in world and v != world[k]}
        if differ:  # markers written before the sizes were recorded hold the seed only
            raise SystemExit(f"quality: {root} was built with other world sizes (held, asked): {differ}")
        patient = {"patient": str(folder), "reused": True}
    else:
        built = tp.build_patient_and_pairs(root, patient_steps=args.patient_steps, pair_prompts=args.pair_prompts,
                                           samples_per_prompt=args.samples_per_prompt,
                                           max_new_tokens=args.max_tokens, measure=32, seed=args.world_seed)
        marker.write_text(json.dumps(world))
        built["prefs"].save_to_disk(str(root / "prefs"))
        tp.score_pairs(built["prefs"], built["patient"], root / "rewards", progress=False)
        patient = {"patient": built["patient"], "rewards_by_instruction": built["rewards"],
                   "wellformed_by_instruction": built["wellformed"], "final_loss": built["final_loss"],
                   "build_seconds": built["build_seconds"]}
    from datasets import load_from_disk

    from llmdoctor_train.stage1.pipeline import RewardsConfig, compute_rewards

    for sign in dict.fromkeys((args.reward_sign, "label")):  # the TFPO doctor's sign, and the label's for GenARM
        if not (rewards_dir(root, args, sign) / "summary.json").exists():
            compute_rewards(load_from_disk(str(root / "prefs")), patient["patient"], rewards_dir(root, args, sign),
                            RewardsConfig(reward_sign=sign, append_eos=args.append_eos),
                            engine_kwargs=tp.engine_kwargs(), progress=False)
    return patient, stage1_summary(root, rewards_dir(root, args))


def rewards_dir(root: Path, args, sign: str | None = None) -> Path:
    """Stage 1's output for a doctor: ``rewards`` (the label's sign) or ``rewards_<sign>``, plus ``_eos`` with
    ``--append-eos``; ``sign`` defaults to the TFPO doctor's (GenARM's pairs are read with the label's)."""
    sign = sign or args.reward_sign
    return root / (("rewards" if sign == "label" else f"rewards_{sign}") + ("_eos" if args.append_eos else ""))


def stage1_summary(root: Path, rewards: Path) -> dict:
    """Stage 1's summary of the pairs in ``root``, and how its token rewards correlate with the task reward."""
    from datasets import load_from_disk

    prefs = load_from_disk(str(root / "prefs"))
    summary = json.loads((rewards / "summary.json").read_text())
    ds = load_from_disk(str(rewards))
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
    jobs, paths, t0 = {}, {}, time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for loss in ("tfpo", "genarm"):
        tag = f"_s{args.train_seed}" + ("_eos" if args.append_eos else "") + (args.tag if loss == "tfpo" else "")
        paths[loss] = str(root / f"doctor_{loss}{tag}")
        if args.reuse and (Path(paths[loss]) / "llmdoctor.json").exists():
            continue
        rewards = rewards_dir(root, args, None if loss == "tfpo" else "label")
        cmd = [sys.executable, "-m", "llmdoctor_train.cli",
               *tp.train_command(rewards, patient, paths[loss], steps=args.train_steps, loss_type=loss,
                                 trained_for=f"toy: good words ({loss})", seed=args.train_seed,
                                 extra=args.tfpo_arg if loss == "tfpo" else ())]
        log = open(root / f"train_{loss}{tag}.log", "w")
        jobs[loss] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for name, (proc, log) in jobs.items():
        rc = proc.wait()
        log.close()
        if rc:
            raise RuntimeError(f"training the {name} doctor failed ({rc}):\n" + Path(log.name).read_text()[-3000:])
    return {"paths": paths, "train_seconds": time.perf_counter() - t0}


def _say(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


def reward_table(root: Path, patient: str) -> str:
    """ARGS's exact token table of the task reward over the patient's vocabulary, saved in ``root``."""
    from transformers import AutoTokenizer

    from benchmarks.baselines.args import token_reward_table
    from llmdoctor_train.toy.world import toy_reward

    table = token_reward_table(AutoTokenizer.from_pretrained(patient), toy_reward)
    np.save(root / "token_rewards.npy", table)
    return str(root / "token_rewards.npy")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    root = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-quality-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    _say(f"1-3/5 patient ({args.patient_steps} steps), preference pairs and Stage 1 token rewards in {root}")
    patient, s1 = build_patient_and_stage1(root, args)
    _say(f"    {patient}")
    _say(f"    {json.dumps({k: v for k, v in s1.items() if k != 'note'})}")
    _say(f"4/5 Stage 2: TFPO and GenARM LoRA doctors, {args.train_steps} steps each")
    docs = train_doctors(root, patient["patient"], args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    docs["probe"] = probe_doctors(root, docs["paths"], n_prompts=args.n_eval, rewards=rewards_dir(root, args))
    for line in probe_lines(docs["probe"]):
        _say("    " + line)

    _say("5/5 decoding held-out prompts in one engine")
    bench = Bench(patient["patient"], docs["paths"], reward_table(root, patient["patient"]), args)
    t_dec = time.perf_counter()
    methods = run_decoding(bench, args)

    result = {
        "task": "toy instruction world (train/toy/world.py): reward = #good - #bad words of a reply; "
                f"{args.n_eval} held-out prompts (seed {tp.EVAL_SEED}), sampled at temperature 1, max {args.max_tokens} "
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
        "frontier": frontier({"methods": methods}),
        "seconds": {"total": time.perf_counter() - t_start, "decoding": time.perf_counter() - t_dec},
    }
    path, table_md = write_report(result, out, args.name, command_line(__file__, argv))
    print(table_md)
    _say(f"targets: {json.dumps(result['targets'])}")
    _say(f"targets, perplexity <= 1.5x the patient's: {json.dumps(result['targets_fluent'])}")
    _say(f"wrote {path}, {args.name}.md, {args.name}.png, {args.name}_compute.png in {out} "
         f"({result['seconds']['total']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
