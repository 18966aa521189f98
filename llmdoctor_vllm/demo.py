"""The embedded default: a tiny patient and doctor built here, plain vs guided from a real vLLM engine."""

from __future__ import annotations

import os
import tempfile
import textwrap


def run_demo(workdir: str | None = None, beta: float = 1.0, max_tokens: int = 24) -> list[dict]:
    """Builds a tiny patient and doctor under ``workdir``, then prints plain vs guided completions.

    Nothing is downloaded: the tokenizer is trained on generated text and both models are
    random-initialised, saved as HF folders, and loaded by vLLM and the plugin.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import SamplingParams

    from llmdoctor_vllm.api import LLMdoctor
    from llmdoctor_vllm.toy import build_tiny_pair

    workdir = workdir or tempfile.mkdtemp(prefix="llmdoctor-demo-")
    print(f"[llmdoctor] building a tiny patient and doctor in {workdir}")
    pair = build_tiny_pair(workdir, n_doctors=1)
    doctor = pair["doctors"]["doctor0"]
    engine = LLMdoctor(patient_model=pair["patient"], doctor_checkpoint=doctor, alpha=1.0, beta=beta,
                       dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0)
    prompts = ["The doctor kindly", "A small bird", "My friend quickly writes"]
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    plain = engine.generate(prompts, greedy, beta=0.0)
    guided = engine.generate(prompts, greedy)
    rows = []
    for p, a, b in zip(prompts, plain, guided):
        print(f"\nprompt : {p!r}")
        print(textwrap.indent(f"plain  : {a!r}\nguided : {b!r}  (alpha=1, beta={beta})", "  "))
        rows.append({"prompt": p, "plain": a, "guided": b})
    print("\n(random-init tiny models: the text is noise; what matters is that the doctor moves it)")
    return rows
