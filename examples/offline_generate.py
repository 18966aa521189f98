"""Offline batch: one vLLM engine, guided and plain requests mixed in one ``generate`` call.

    python examples/offline_generate.py                          # tiny local models, CPU
    python examples/offline_generate.py --patient Qwen/Qwen2.5-7B-Instruct --doctor ./my-doctor
"""

from __future__ import annotations

import argparse
import tempfile


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patient", help="patient model path (default: build a tiny one here)")
    p.add_argument("--doctor", help="doctor checkpoint path (default: build a tiny one here)")
    p.add_argument("--beta", type=float, default=0.8)
    args = p.parse_args()
    engine_kw = {}
    if not args.patient:
        from llmdoctor_train.toy.models import build_tiny_pair

        pair = build_tiny_pair(tempfile.mkdtemp(prefix="llmdoctor-example-"))
        args.patient, args.doctor = pair["patient"], pair["doctors"]["doctor0"]
        # tiny models: a small KV cache (the CPU backend otherwise reserves 92% of a NUMA node)
        engine_kw = dict(kv_cache_memory_bytes=256 << 20, dtype="float32")

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.patient, max_model_len=512, enforce_eager=True, **engine_kw,
              additional_config={"llmdoctor": {"doctors": {"helpful": args.doctor}, "alpha": 1.0, "beta": 0.0}})
    prompts = ["The doctor kindly", "A small bird", "Our team"]
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    guided = SamplingParams(max_tokens=24, temperature=0.0, extra_args={"llmdoctor_beta_helpful": args.beta})
    # the delta rule, sampled, within the patient's support (tokens it gives >= 5% of its top probability)
    delta_rule = SamplingParams(max_tokens=24, temperature=0.7, seed=0,
                                extra_args={"llmdoctor_beta_helpful": args.beta, "llmdoctor_rule": "delta",
                                            "llmdoctor_patient_min_p": 0.05})
    outs = llm.generate(prompts * 3, [plain] * 3 + [guided] * 3 + [delta_rule] * 3)
    for i, o in enumerate(outs):
        kind = ("plain", "guided greedy", "delta sampled")[i // 3]
        print(f"{kind:>15} | {o.prompt!r} -> {o.outputs[0].text!r}")
    from llmdoctor_vllm.api import close_engine

    close_engine(llm)  # shut the engine down now rather than in exit-time finalisers


if __name__ == "__main__":
    main()
