"""One command for a maintainer with a GPU and vLLM: does guidance hold on the real serving paths?

Each check starts its own vLLM engine (in a child process) with one engine feature on, decodes
guided greedy requests (long prompts beside short ones, both rules), and compares every token
with guided decoding recomputed in transformers (full forwards, no cache, no vLLM):

- ``chunked_prefill``: a 32-token scheduler budget, prompts several times longer;
- ``prefix_caching``: prompts sharing a long prefix, each sent twice (the second hits the cache);
- ``preemption``: a KV cache too small for the batch, so vLLM preempts and resumes;
- ``async_scheduling``: vLLM's async scheduler (GPU only; the CPU platform forces it off);
- ``tensor_parallel_2``: TP = 2 (two GPUs);
- ``spec_decode_refused``: an n-gram speculative engine must refuse a guided request, saying why.

On a GPU the engine runs Model Runner V2 (vLLM's default there); set ``VLLM_USE_V2_MODEL_RUNNER=0``
to check the V1 runner. Without ``--patient``/``--doctor`` it builds tiny local models (nothing is
downloaded). On a CPU, vLLM has no MRV2 and no async scheduling: the script
runs the checks that can run and marks the others skipped. Writes ``gpu_check.json``.

    python -m benchmarks.gpu_check                                    # tiny models, every check
    python -m benchmarks.gpu_check --patient Qwen/Qwen2.5-7B-Instruct --doctor /ckpt/helpful
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHECKS = ["chunked_prefill", "prefix_caching", "preemption", "async_scheduling", "tensor_parallel_2",
          "spec_decode_refused"]
SENTENCE = "The cat kindly helps the doctor."
GUIDES = [{"llmdoctor_beta": 1.0}, {"llmdoctor_beta": 0.8, "llmdoctor_rule": "delta"}, {"llmdoctor_beta": 1.5}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patient", help="patient model (default: a tiny local one)")
    p.add_argument("--doctor", help="doctor checkpoint (default: a tiny local one)")
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=CHECKS, help="which checks (all)")
    p.add_argument("--max-tokens", type=int, default=12, help="tokens per request (12)")
    p.add_argument("--output-dir", default=None, help="where to write gpu_check.json (benchmarks/results)")
    p.add_argument("--check", choices=CHECKS, help=argparse.SUPPRESS)  # one check, in a child process
    return p.parse_args(argv)


def _prompts(tokenizer, long_reps: int) -> list[list[int]]:
    long = " ".join([SENTENCE] * long_reps)
    texts = ["The cat kindly", long + " A dog", "Our team", long + " The teacher writes"]
    return [tokenizer(t)["input_ids"] for t in texts]


def reference(patient_path: str, doctor_path: str, prompts, guides, max_tokens: int) -> list[list[int]]:
    """Guided greedy decoding in transformers: full forwards, the plugin's combine rule, no vLLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmdoctor_vllm.checkpoint import load_doctor
    from llmdoctor_vllm.combine import combine

    tok = AutoTokenizer.from_pretrained(patient_path)
    patient = AutoModelForCausalLM.from_pretrained(patient_path).eval()
    doctor = load_doctor(doctor_path, patient_tokenizer=tok)
    out = []
    for ids, guide in zip(prompts, guides):
        ids, beta = list(ids), float(guide["llmdoctor_beta"])
        delta = guide.get("llmdoctor_rule") == "delta"
        for _ in range(max_tokens):
            with torch.no_grad():
                x = torch.tensor([ids])
                logits = patient(x).logits[0, -1:].float()
                term = torch.log_softmax(doctor.model(x).logits[0, -1:].float(), -1)
                if delta and doctor.is_lora:
                    with doctor.model.disable_adapter():
                        term = term - torch.log_softmax(doctor.model(x).logits[0, -1:].float(), -1)
                elif delta:
                    term = term - torch.log_softmax(doctor.reference_model(x).logits[0, -1:].float(), -1)
            nxt = int(combine(logits, torch.ones(1), beta * term, len(tok)).argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        out.append(ids)
    return out


def _engine_kwargs(check: str) -> dict | None:
    """The engine settings of a check, or ``None`` where this machine cannot run it."""
    import torch

    gpu = torch.cuda.is_available()
    kw = dict(enforce_eager=not gpu, max_model_len=512, max_num_seqs=4, seed=0)
    kw |= {} if gpu else dict(dtype="float32", kv_cache_memory_bytes=64 << 20)
    if check == "chunked_prefill":
        kw |= dict(max_num_batched_tokens=32, enable_chunked_prefill=True)
    elif check == "prefix_caching":
        kw |= dict(enable_prefix_caching=True)
    elif check == "preemption":  # five 32-token blocks for four requests that grow to two blocks each
        kw |= dict(max_model_len=64, block_size=32)
        kw |= dict(num_gpu_blocks_override=5) if gpu else dict(kv_cache_memory_bytes=240 << 10)
    elif check == "async_scheduling":
        if not gpu:
            return None
        kw |= dict(async_scheduling=True, logits_processors=["llmdoctor_vllm:GuidanceProcessor"])
    elif check == "tensor_parallel_2":
        if torch.cuda.device_count() < 2:
            return None
        kw |= dict(tensor_parallel_size=2)
    elif check == "spec_decode_refused":
        kw |= dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
    return kw


def run_check(check: str, patient: str, doctor: str, max_tokens: int) -> dict:
    """One check in this process: ``{"status": "pass" | "fail" | "skipped", ...}``."""
    kw = _engine_kwargs(check)
    if kw is None:
        return {"status": "skipped", "reason": "needs a GPU (two for TP = 2) with vLLM's GPU build"}
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams, TokensPrompt

    tok = AutoTokenizer.from_pretrained(patient)
    prompts = _prompts(tok, long_reps=0 if check == "preemption" else 12)
    if check == "preemption":  # short prompts, long replies: the batch outgrows the cache while decoding
        max_tokens = 40
    guides = [GUIDES[i % len(GUIDES)] for i in range(len(prompts))]
    if check == "prefix_caching":
        prompts, guides = prompts + prompts, guides + guides
    llm = LLM(model=patient, additional_config={"llmdoctor": {"doctors": {"d": doctor}, "beta": 0.0}}, **kw)
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=g) for g in guides]
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    if check == "spec_decode_refused":
        try:
            llm.generate(inputs[:1], params[:1], use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - vLLM's validation error type moves between versions
            ok = "speculative" in str(e)
            return {"status": "pass" if ok else "fail", "message": str(e)[:300]}
        return {"status": "fail", "message": "a guided request was accepted by a speculative engine"}
    outs = llm.generate(inputs, params, use_tqdm=False)
    got = [list(p) + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
    want = reference(patient, doctor, prompts, guides, max_tokens)
    mismatches = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    from llmdoctor_vllm.processor import active_processors  # the engine runs in this process

    resumed = sum(p.core.resumed for p in active_processors())
    ok = not mismatches and (check != "preemption" or resumed > 0)
    return {"status": "pass" if ok else "fail", "requests": len(got), "mismatched_requests": mismatches,
            "prompt_tokens": [len(p) for p in prompts], "guided_requests_resumed": resumed}


def _default_models(root: str) -> tuple[str, str]:
    from llmdoctor_train.toy.models import build_tiny_pair

    pair = build_tiny_pair(root, n_doctors=1)
    return pair["patient"], pair["doctors"]["doctor0"]


def main(argv=None):
    args = parse_args(argv)
    if args.check:
        print(json.dumps(run_check(args.check, args.patient, args.doctor, args.max_tokens)))
        return
    from benchmarks.common import device_name, write_results

    with tempfile.TemporaryDirectory() as tmp:
        patient, doctor = (args.patient, args.doctor) if args.patient else _default_models(tmp)
        results = {}
        for check in args.checks:
            child = [sys.executable, "-m", "benchmarks.gpu_check", "--check", check, "--patient", patient,
                     "--doctor", doctor, "--max-tokens", str(args.max_tokens)]
            # the engine in the child's own process, so the check can read the plugin's counters
            env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if check != "tensor_parallel_2" else None
            out = subprocess.run(child, capture_output=True, text=True, env=env)
            lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
            results[check] = json.loads(lines[-1]) if lines else {"status": "fail", "error": out.stderr[-2000:]}
            print(check, results[check]["status"], flush=True)
    import vllm

    runner = "V1" if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "0" else "default (MRV2 on CUDA, V1 on CPU)"
    payload = {"device": device_name(), "vllm": vllm.__version__, "model_runner": runner,
               "patient": args.patient or "tiny (built locally)", "doctor": args.doctor or "tiny (built locally)",
               "checks": results, "all_passed": all(r["status"] != "fail" for r in results.values())}
    path = write_results("gpu_check", payload, args.output_dir)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
