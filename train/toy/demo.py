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


def _say(msg: str) -> None:
    print(f"\n[llmdoctor] {msg}", flush=True)


def run_demo(workdir: str | None = None, betas=(1.0, 2.0), train_steps: int = 300, n_eval: int = 64,
             rules=("product", "delta")) -> dict:
    """Runs the five steps above and prints plain vs guided replies with their rewards."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines start in seconds
    import torch
    from vllm import LLM

    from llmdoctor_vllm import toy_world as tw
    from train.rewards_pipeline import compute_rewards
    from train.train_cli import main as train_main

    root = Path(workdir or tempfile.mkdtemp(prefix="llmdoctor-demo-")).resolve()
    _say(f"1/5 training a tiny instruction-following patient in {root}")
    built = tw.build_toy_patient(root / "patient")
    patient = built["patient"]
    print(f"    patient's mean task reward: positive instruction {built['rewards']['pos']:+.2f}, "
          f"negative {built['rewards']['neg']:+.2f}, none {built['rewards']['neutral']:+.2f}")

    _say("2/5 sampling preference pairs from the patient, ranked by the task reward")
    prefs = tw.make_preference_dataset(patient, n_prompts=256, samples_per_prompt=4, seed=0)
    prefs = tw.as_scored(prefs)  # replies with the space after "Assistant:", as Stage 1 scores them
    print(f"    {len(prefs)} pairs, mean reward gap {tw.preference_gap(prefs):.2f}")

    _say("3/5 Stage 1: token rewards from the patient in vLLM (positive vs negative instruction)")
    engine_kw = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=128 << 20, seed=0)
    scorer = LLM(model=patient, **engine_kw)
    summary = compute_rewards(prefs, patient, root / "rewards", llm=scorer)
    print(f"    {summary['tokens']['total'] if isinstance(summary.get('tokens'), dict) else summary.get('tokens')} "
          f"tokens, fraction rewarded {summary.get('fraction_rewarded', float('nan')):.2f}")
    del scorer

    # full-trajectory SubTB fitted best on this toy (all-pairs fits slowly, as METHOD reports)
    _say(f"4/5 Stage 2: TFPO, a LoRA doctor on the patient's weights, {train_steps} steps")
    with tw.torch_threads(1):
        train_main(["--rewards", str(root / "rewards"), "--model", patient, "--output", str(root / "doctor"),
                    "--lora-r", "8", "--max-steps", str(train_steps), "--batch-size", "8", "--warmup-steps", "20",
                    "--learning-rate", "5e-4",
                    "--subtb-weighting", "trajectory", "--logging-steps", "50", "--save-steps", "100000",
                    "--report-to", "none", "--trained-for", "toy: good words"])
    torch.set_num_threads(max(1, torch.get_num_threads()))

    _say("5/5 Stage 3: plain vs guided decoding in one vLLM engine")
    return compare_decoding(patient, str(root / "doctor"), betas, rules, n_eval, engine_kw) | {"workdir": str(root)}


def compare_decoding(patient: str, doctor: str, betas, rules, n_eval: int = 64, engine_kw: dict | None = None) -> dict:
    """Decodes held-out toy prompts plain and guided (each rule x beta) in one engine; prints the
    mean task reward and share of well-formed replies per setting, and three prompts side by side."""
    from vllm import LLM, SamplingParams

    from llmdoctor_vllm import toy_world as tw

    llm = LLM(model=patient, additional_config={"llmdoctor": {"doctors": {"good": doctor}, "beta": 0.0}},
              **(engine_kw or {}))
    prompts = [tw.format_prompt(p) for p in tw.toy_prompts(n_eval, seed=12345)]
    settings = [("plain", None)] + [(f"{rule} beta={b:g}", {"llmdoctor_beta": b, "llmdoctor_rule": rule})
                                    for rule in rules for b in betas]
    results = {}
    for label, xargs in settings:  # one seed per prompt, shared by all settings: differences come from guidance
        sps = [SamplingParams(max_tokens=48, temperature=1.0, seed=1000 + i, stop=[tw.STOP], extra_args=xargs)
               for i in range(len(prompts))]
        results[label] = [o.outputs[0].text.strip() for o in llm.generate(prompts, sps, use_tqdm=False)]
    rewards = {k: tw.toy_rewards(t) for k, t in results.items()}
    wellformed = {k: tw.toy_wellformed(t).mean() for k, t in results.items()}
    width = max(map(len, results))
    print(f"\n    {n_eval} held-out prompts, sampled at temperature 1: mean task reward (#good - #bad words), "
          "share of well-formed replies")
    for k in results:
        print(f"      {k:>{width}}: {rewards[k].mean():+.2f}   {wellformed[k]:4.0%}")
    for i in range(3):
        print(f"\n    prompt: {prompts[i]!r}")
        for k in results:
            print(f"      {k:>{width}} [{rewards[k][i]:+.0f}] {results[k][i]!r}")
    return {"rewards": {k: float(r.mean()) for k, r in rewards.items()},
            "wellformed": {k: float(w) for k, w in wellformed.items()}}
