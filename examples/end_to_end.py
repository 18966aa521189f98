"""The whole LLMdoctor loop on a toy task, with the project's own commands, in a few minutes on a CPU.

1. build a tiny patient that follows METHOD's positive / negative instructions, and sample
   preference pairs from it, ranked by the toy task reward (#good - #bad words);
2. Stage 1: ``llmdoctor rewards`` scores every pair with the patient in vLLM -> token rewards;
3. Stage 2: ``llmdoctor train`` fits a LoRA doctor with TFPO;
4. Stage 3: one vLLM engine with the plugin decodes held-out prompts plain and guided (per
   request, ``SamplingParams(extra_args={"llmdoctor_beta": ...})``); prints the mean reward.

Nothing is downloaded. The two commands run in this process through ``llmdoctor_train.cli.main``
with the same arguments as on the shell (each is printed before it runs). Every step is a
function of ``llmdoctor_train.toy.pipeline``, the same ones `llmdoctor demo --toy` runs.

    python examples/end_to_end.py                              # ~3-5 min on 2 CPU cores
    python examples/end_to_end.py --workdir runs/e2e --train-steps 600 --beta 0.5 1 2 --rule product
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines start in seconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where the patient, data, rewards and doctor go (default: a new temp dir)")
    p.add_argument("--patient-steps", type=int, default=300, help="training steps of the toy patient (300)")
    p.add_argument("--pair-prompts", type=int, default=256,
                   help="prompts sampled for preference pairs; ties are dropped (256)")
    p.add_argument("--train-steps", type=int, default=300, help="TFPO steps of the doctor (300)")
    p.add_argument("--weighting", default="trajectory", choices=["all", "lambda", "trajectory"],
                   help="--subtb_weighting of llmdoctor train; trajectory fitted best on this toy (trajectory)")
    p.add_argument("--learning-rate", type=float, default=5e-4, help="doctor learning rate, LoRA r=8 (5e-4)")
    p.add_argument("--beta", type=float, nargs="+", default=[1.0, 2.0], help="doctor weights to decode with (1 2)")
    p.add_argument("--rule", default="delta", choices=["delta", "product"],
                   help="decoding rule: delta adds only what training changed; product is the paper's (delta)")
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts to decode (64)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from llmdoctor_train.toy import pipeline as toy
    from llmdoctor_train.toy.world import preference_gap

    root = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-e2e-")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] toy patient and preference pairs in {root}", flush=True)
    built = toy.build_patient_and_pairs(root, patient_steps=args.patient_steps, pair_prompts=args.pair_prompts)
    patient, prefs = built["patient"], built["prefs"]
    print(f"      {toy.patient_summary(built)}")
    prefs.to_json(str(root / "prefs.jsonl"))
    print(f"      {len(prefs)} pairs (mean reward gap {preference_gap(prefs):.2f}) -> {root / 'prefs.jsonl'}")

    print("[2/4] Stage 1: token rewards from the patient in vLLM", flush=True)
    toy.run_llmdoctor(toy.rewards_command(root / "prefs.jsonl", patient, root / "rewards"), threads=None, echo=True)

    print("[3/4] Stage 2: a LoRA doctor on the patient's weights, trained with TFPO", flush=True)
    toy.run_llmdoctor(toy.train_command(root / "rewards", patient, root / "doctor", steps=args.train_steps,
                                     learning_rate=args.learning_rate, weighting=args.weighting), echo=True)

    print(f"[4/4] Stage 3: plain vs guided decoding in one engine ({args.rule} rule)", flush=True)
    llm = toy.guided_engine(patient, {"good": str(root / "doctor")})
    prompts = toy.eval_prompts(args.eval_prompts)
    results = toy.compare(llm, prompts, toy.guidance_settings(args.beta, [args.rule]))
    return toy.report(prompts, results, show=1) | {"workdir": str(root)}


if __name__ == "__main__":
    main()
