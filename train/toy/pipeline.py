"""The toy world end to end, one function per step; ``examples/end_to_end.py`` and the toy demo run
these (with their own sizes), so they cannot drift apart. :data:`ENGINE` / :func:`engine_kwargs`
are the project's one set of tiny-engine settings (tests and benchmarks override a few).

1. :func:`build_patient_and_pairs`: the instruction-following patient and preference pairs from
   its own replies, ranked by the task reward, as Stage 1 scores them;
2. :func:`score_pairs` (in process) or :func:`rewards_command` (``llmdoctor rewards``): Stage 1;
3. :func:`train_command`: the ``llmdoctor train`` arguments of a LoRA doctor on the patient;
   :func:`run_llmdoctor` runs either command in this process;
4. :func:`guided_engine`, :func:`eval_prompts`, :func:`generate`, :func:`compare`,
   :func:`report`: held-out prompts decoded plain and guided in one engine, and scored.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from llmdoctor_train.toy import world

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=128 << 20, seed=0)
EVAL_SEED = 12345  # held-out prompts (training pairs use seed 0)
SAMPLE_SEED = 1000  # request i samples with seed SAMPLE_SEED + i in every setting
MULTI_SEED = 1_000_000  # with n > 1 samples, prompt i seeds MULTI_SEED + 1000 i (+ j for its j-th sample)
MAX_TOKENS = 48


def engine_kwargs(**overrides) -> dict:
    """``vllm.LLM`` keyword arguments of a tiny CPU engine: :data:`ENGINE` with ``overrides``."""
    return {**ENGINE, **overrides}


def build_patient_and_pairs(root: str | Path, *, patient_steps: int = 300, pair_prompts: int = 256,
                            samples_per_prompt: int = 4, max_new_tokens: int = MAX_TOKENS, measure: int = 64,
                            seed: int = 0) -> dict:
    """Trains the patient into ``root/patient/patient`` and samples preference pairs from it.

    ``seed`` is the world's: the patient's corpus, initialisation and training, and the pairs' prompts
    and samples. Returns :func:`~llmdoctor_train.toy.patient.build_toy_patient`'s dict plus ``prefs``:
    the pairs with each reply after the space that follows ``"Assistant:"``, as Stage 1 scores them."""
    from llmdoctor_train.toy.patient import build_toy_patient, make_preference_dataset

    built = build_toy_patient(Path(root) / "patient", seed=seed, steps=patient_steps, measure=measure)
    prefs = make_preference_dataset(built["patient"], n_prompts=pair_prompts, samples_per_prompt=samples_per_prompt,
                                    seed=seed, max_new_tokens=max_new_tokens)
    return built | {"prefs": world.as_scored(prefs)}


def patient_summary(built: dict) -> str:
    """One line: the patient's mean task reward under each instruction."""
    r = built["rewards"]
    return (f"patient's mean task reward: positive instruction {r['pos']:+.2f}, negative {r['neg']:+.2f}, "
            f"none {r['neutral']:+.2f}")


def score_pairs(prefs, patient: str, output: str | Path, *, progress: bool = True) -> dict:
    """Stage 1 in this process: the patient scores ``prefs`` in a vLLM engine; returns ``summary.json``'s dict."""
    from vllm import LLM

    from llmdoctor_train.stage1.pipeline import compute_rewards

    scorer = LLM(model=patient, **ENGINE)
    try:
        return compute_rewards(prefs, patient, output, llm=scorer, progress=progress)
    finally:
        del scorer


def rewards_command(data: str | Path, patient: str, output: str | Path) -> list[str]:
    """The ``llmdoctor rewards`` arguments of the same Stage 1 run, with :data:`ENGINE`'s settings."""
    return ["rewards", "--data", str(data), "--patient", patient, "--output", str(output),
            "--dtype", ENGINE["dtype"], "--enforce-eager", "--max-model-len", str(ENGINE["max_model_len"]),
            "--engine-arg", f"kv_cache_memory_bytes={ENGINE['kv_cache_memory_bytes']}",
            "--engine-arg", f"seed={ENGINE['seed']}", "--no-progress"]


def train_command(rewards: str | Path, patient: str, output: str | Path, *, steps: int = 300,
                  learning_rate: float = 5e-4, weighting: str = "trajectory", loss_type: str = "tfpo",
                  trained_for: str = "toy: good words", seed: int = 42, extra=()) -> list[str]:
    """The ``llmdoctor train`` arguments of a LoRA (r = 8) doctor on the patient's weights
    (``extra``: more ``llmdoctor train`` arguments, appended, so they override).

    Full-trajectory SubTB fitted best on this toy (all pairs fit slowly, as the paper reports)."""
    return ["train", "--rewards", str(rewards), "--model", patient, "--output", str(output), "--lora_r", "8",
            "--max_steps", str(steps), "--per_device_train_batch_size", "8",
            "--warmup_steps", str(min(20, steps // 5)), "--learning_rate", str(learning_rate),
            "--subtb_weighting", weighting, "--loss_type", loss_type, "--logging_steps", "50",
            "--save_steps", "100000", "--report_to", "none", "--trained_for", trained_for, "--seed", str(seed),
            *extra]


def run_llmdoctor(argv: list[str], *, threads: int | None = 1, echo: bool = False) -> None:
    """Runs ``llmdoctor ARGV...`` in this process, under ``threads`` torch threads (None: as they are;
    training a tiny model on a small CPU, one thread is the fastest); with ``echo``, prints the shell
    form first."""
    import torch

    from llmdoctor_train.cli import main
    from llmdoctor_train.toy.patient import torch_threads

    if echo:
        print("\n$ llmdoctor " + shlex.join(argv), flush=True)
    with torch_threads(threads):
        main(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))


def guided_engine(patient: str, doctors: dict[str, str], additional: dict | None = None, **llm_kwargs):
    """One engine for plain and guided requests: the plugin with ``doctors``, unguided unless a request asks."""
    from vllm import LLM

    config = {"llmdoctor": {"doctors": doctors, "beta": 0.0}, **(additional or {})}
    return LLM(model=patient, additional_config=config, **engine_kwargs(**llm_kwargs))


def eval_prompts(n: int) -> list[str]:
    """``n`` held-out prompts, formatted as the patient reads them (no instruction)."""
    return [world.format_prompt(p) for p in world.toy_prompts(n, seed=EVAL_SEED)]


def sampling_params(i: int, extra: dict | None = None, *, n: int = 1, max_tokens: int = MAX_TOKENS,
                    offset: int = 0):
    """Request ``i``'s sampling: temperature 1, one line, seeded by its index (plus ``offset``, a
    sampling seed) so every setting draws the same randomness (differences come from guidance)."""
    from vllm import SamplingParams

    # vLLM seeds the n samples of a request seed, seed + 1, ...: keep prompts' seed ranges disjoint
    seed = (SAMPLE_SEED + i if n == 1 else MULTI_SEED + 1000 * i) + 10_000_000 * offset
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, n=n, stop=[world.STOP],
                          extra_args=extra)


def generate(llm, prompts: list[str], extra: dict | None = None, *, n: int = 1, max_tokens: int = MAX_TOKENS,
             offset: int = 0):
    """Every prompt once (``n`` samples each) with request arguments ``extra``; vLLM's outputs."""
    params = [sampling_params(i, extra, n=n, max_tokens=max_tokens, offset=offset) for i in range(len(prompts))]
    return llm.generate(prompts, params, use_tqdm=False)


def guidance_settings(betas, rules, patient_min_p: float = 0.0) -> dict[str, dict | None]:
    """``{"plain": None, "<rule> beta=<b>": request arguments}`` for every rule and beta, and with
    ``patient_min_p`` each of them again restricted to the patient's support."""
    supports = ({}, {"llmdoctor_patient_min_p": patient_min_p}) if patient_min_p else ({},)
    return {"plain": None} | {
        " ".join([f"{rule} beta={b:g}"] + [f"patient_min_p={v:g}" for v in sup.values()]):
            {"llmdoctor_beta": b, "llmdoctor_rule": rule, **sup}
        for sup in supports for rule in rules for b in betas}


def compare(llm, prompts: list[str], settings: dict[str, dict | None]) -> dict[str, list[str]]:
    """The reply to every prompt under each setting: ``{label: [reply]}``."""
    return {label: [o.outputs[0].text.strip() for o in generate(llm, prompts, xargs)]
            for label, xargs in settings.items()}


def report(prompts: list[str], results: dict[str, list[str]], show: int = 3) -> dict:
    """Prints each setting's mean task reward and share of well-formed replies, and ``show`` prompts
    side by side; returns ``{"rewards": {label: mean}, "wellformed": {label: share}}``."""
    rewards = {k: world.toy_rewards(t) for k, t in results.items()}
    wellformed = {k: float(world.toy_wellformed(t).mean()) for k, t in results.items()}
    width = max(map(len, results))
    print(f"\n    {len(prompts)} held-out prompts, sampled at temperature 1: mean task reward (#good - #bad words), "
          "share of well-formed replies")
    for k in results:
        print(f"      {k:>{width}}: {rewards[k].mean():+.2f}   {wellformed[k]:4.0%}")
    for i in range(min(show, len(prompts))):
        print(f"\n    prompt: {prompts[i]!r}")
        for k in results:
            print(f"      {k:>{width}} [{rewards[k][i]:+.0f}] {results[k][i]!r}")
    return {"rewards": {k: float(np.mean(r)) for k, r in rewards.items()}, "wellformed": wellformed}
