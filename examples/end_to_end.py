"""The whole LLMdoctor loop on a toy task, with the project's own commands, in a few minutes on a CPU.

1. build a tiny patient that follows METHOD's positive / negative instructions, and sample
   preference pairs from it, ranked by the toy task reward (#good - #bad words);
2. Stage 1: ``llmdoctor rewards`` scores every pair with the patient in vLLM -> token rewards;
3. Stage 2: ``llmdoctor train`` fits a LoRA doctor with TFPO;
4. Stage 3: one vLLM engine with the plugin decodes held-out prompts plain and guided (per
   request, ``SamplingParams(extra_args={"llmdoctor_beta": ...})``); prints the mean reward.

Nothing is downloaded. The two commands run in this process through ``llmdoctor_vllm.cli.main``
with the same arguments as on the shell (each is printed before it runs).

    python examples/end_to_end.py                              # ~3-5 min on 2 CPU cores
    python examples/end_to_end.py --workdir runs/e2e --train-steps 600 --beta 0.5 1 2 --rule product
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines start in seconds

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=128 << 20, seed=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where the patient, data, rewards and doctor go (default: a new temp dir)")
    p.add_argument("--patient-steps", type=int, default=300, help="training steps of the toy patient (300)")
    p.add_argument("--pair-prompts", type=int, default=256,
                   help="prompts sampled for preference pairs; ties are dropped (256)")
    p.add_argument("--train-steps", type=int, default=300, help="TFPO steps of the doctor (300)")
    p.add_argument("--weighting", default="trajectory", choices=["all", "lambda", "trajectory"],
                   help="--subtb-weighting of llmdoctor train; trajectory fitted best on this toy (trajectory)")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="doctor learning rate, LoRA r=8 (5e-4)")
    p.add_argument("--beta", type=float, nargs="+", default=[1.0, 2.0], help="doctor weights to decode with (1 2)")
    p.add_argument("--rule", default="delta", choices=["delta", "product"],
                   help="decoding rule: delta adds only what training changed; product is the paper's (delta)")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts to decode (64)")
    return p.parse_args(argv)


def llmdoctor(*argv: str) -> None:
    """Runs ``llmdoctor ARGV...`` in this process (prints the shell form first)."""
    from llmdoctor_vllm.cli import main

    print("\n$ llmdoctor " + " ".join(shlex.quote(a) for a in argv), flush=True)
    main(list(argv))


def main(argv=None) -> dict:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams

    from llmdoctor_vllm import toy_world as tw

    root = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-e2e-")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] toy patient and preference pairs in {root}", flush=True)
    built = tw.build_toy_patient(root, steps=args.patient_steps)
    patient = built["patient"]
    print(f"      patient's mean reward: positive instruction {built['rewards']['pos']:+.2f}, "
          f"negative {built['rewards']['neg']:+.2f}, none {built['rewards']['neutral']:+.2f}")
    prefs = tw.make_preference_dataset(patient, n_prompts=args.pair_prompts, samples_per_prompt=4, seed=0)
    prefs = tw.as_scored(prefs)  # replies with the space after "Assistant:", as Stage 1 scores them
    prefs.to_json(str(root / "prefs.jsonl"))
    print(f"      {len(prefs)} pairs (mean reward gap {tw.preference_gap(prefs):.2f}) -> {root / 'prefs.jsonl'}")

    print("[2/4] Stage 1: token rewards from the patient in vLLM", flush=True)
    llmdoctor("rewards", "--data", str(root / "prefs.jsonl"), "--patient", patient, "--output", str(root / "rewards"),
              "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
              "--engine-arg", f"kv_cache_memory_bytes={128 << 20}", "--engine-arg", "seed=0", "--no-progress")

    print("[3/4] Stage 2: a LoRA doctor on the patient's weights, trained with TFPO", flush=True)
    with tw.torch_threads(1):  # tiny model on a small CPU: one thread is the fastest
        llmdoctor("train", "--rewards", str(root / "rewards"), "--model", patient, "--output", str(root / "doctor"),
                  "--lora-r", "8", "--max-steps", str(args.train_steps), "--batch-size", "8", "--warmup-steps", "20",
                  "--learning-rate", str(args.learning_rate), "--subtb-weighting", args.weighting,
                  "--logging-steps", "50", "--save-steps", "100000", "--trained-for", "toy: good words")

    print(f"[4/4] Stage 3: plain vs guided decoding in one engine ({args.rule} rule)", flush=True)
    llm = LLM(model=patient, additional_config={"llmdoctor": {"doctors": {"good": str(root / "doctor")},
                                                              "beta": 0.0, "rule": args.rule}}, **ENGINE)
    prompts = [tw.format_prompt(p) for p in tw.toy_prompts(args.eval_prompts, seed=12345)]
    betas = [0.0, *args.beta]
    params = [SamplingParams(max_tokens=48, temperature=1.0, seed=7, stop=[tw.STOP],
                             extra_args={"llmdoctor_beta": b} if b else None) for b in betas]
    # one batch: every prompt once per beta, plain and guided requests side by side
    outs = llm.generate([p for _ in betas for p in prompts], [sp for sp in params for _ in prompts], use_tqdm=False)
    texts = [o.outputs[0].text.strip() for o in outs]
    n = len(prompts)
    by_beta = {b: texts[i * n:(i + 1) * n] for i, b in enumerate(betas)}
    reward = {b: float(tw.toy_rewards(t).mean()) for b, t in by_beta.items()}
    wellformed = {b: float(tw.toy_wellformed(t).mean()) for b, t in by_beta.items()}
    print(f"\n      {n} held-out prompts, sampled at temperature 1: mean task reward (#good - #bad words), "
          f"share of well-formed replies")
    for b in betas:
        label = "plain" if not b else f"guided beta={b:g}"
        print(f"      {label:>16}: {reward[b]:+.2f}   {wellformed[b]:.0%}")
    print(f"\n      e.g. {prompts[0]!r}")
    for b in betas:
        print(f"      {'plain' if not b else f'beta={b:g}':>9}: {by_beta[b][0]!r}")
    return {"reward": reward, "wellformed": wellformed, "workdir": str(root)}


if __name__ == "__main__":
    main()
