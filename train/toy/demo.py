"""The embedded default: the whole LLMdoctor loop on a toy task, built here in a few minutes.

1. a tiny patient is trained on generated replies so that it follows METHOD's positive and
   negative instructions (more GOOD words after the positive one, more BAD after the negative);
2. preference pairs are sampled from it and ranked by the task reward (#good - #bad words);
3. Stage 1: the patient, in vLLM, scores each pair under both instructions -> token rewards;
4. Stage 2: a LoRA doctor on the patient's weights is trained with TFPO;
5. Stage 3: held-out prompts are decoded plain and guided through the plugin, side by side.
Nothing is downloaded; every model is saved as an HF folder and loaded by the real code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llmdoctor_train.toy.world import preference_gap


def _say(msg: str) -> None:
    print(f"\n[llmdoctor] {msg}", flush=True)


def run_demo(workdir: str | None = None, betas=(1.0, 2.0), train_steps: int = 300, n_eval: int = 64,
             rules=("product", "delta"), patient_min_p: float = 0.05) -> dict:
    """Runs the five steps above and prints plain vs guided replies with their rewards."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines start in seconds
    from llmdoctor_train.toy import pipeline as toy

    root = Path(workdir or tempfile.mkdtemp(prefix="llmdoctor-demo-")).resolve()
    _say(f"1/5 training a tiny instruction-following patient in {root}")
    _say("2/5 sampling preference pairs from the patient, ranked by the task reward")
    built = toy.build_patient_and_pairs(root)
    patient, prefs = built["patient"], built["prefs"]
    print(f"    {toy.patient_summary(built)}")
    print(f"    {len(prefs)} pairs, mean reward gap {preference_gap(prefs):.2f}")

    _say("3/5 Stage 1: token rewards from the patient in vLLM (positive vs negative instruction)")
    summary = toy.score_pairs(prefs, patient, root / "rewards")
    print(f"    {summary['tokens']} tokens, fraction rewarded {summary['fraction_rewarded']:.2f}")

    _say(f"4/5 Stage 2: TFPO, a LoRA doctor on the patient's weights, {train_steps} steps")
    toy.run_llmdoctor(toy.train_command(root / "rewards", patient, root / "doctor", steps=train_steps))

    _say("5/5 Stage 3: plain vs guided decoding in one vLLM engine")
    llm = toy.guided_engine(patient, {"good": str(root / "doctor")})
    prompts = toy.eval_prompts(n_eval)
    settings = toy.guidance_settings(betas, rules, patient_min_p)
    return toy.report(prompts, toy.compare(llm, prompts, settings)) | {"workdir": str(root)}
