"""What guidance costs: plain vLLM vs vLLM + one / two doctors vs an HF-transformers loop.

Same run, same prompts, same engine settings. For each mode and batch size: output tokens/s,
time to first token (a 1-token run of the batch), time per output token, and memory. The
guided/plain ratio is reported next to the limit 1/(1 + c_doctor/c_patient), c being the
forward FLOPs per token. A second table times one doctor decode step against the length
already cached (256 -> 2048 tokens), with the runner alone.

    python -m benchmarks.throughput                      # tiny pair, CPU, a few minutes
    python -m benchmarks.throughput --shapes qwen2.5-7b+1.5b --batch-sizes 1 8 32   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import save_figure

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

MODES = ("plain", "guided", "guided_2_doctors", "hf_loop")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny", help="model pair shapes: tiny (CPU default) or qwen2.5-7b+1.5b")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds over all modes (the median is kept)")
    p.add_argument("--step-lengths", type=int, nargs="*", default=[256, 512, 1024, 2048],
                   help="cached lengths for the doctor step-cost table (empty to skip)")
    p.add_argument("--workdir", help="where to build the models (default: temp dir)")
    p.add_argument("--output", default="throughput", help="results name (a .json and a .png)")
    p.add_argument("--output-dir", default=None, help="where the results go (default: benchmarks/results)")
    p.add_argument("--hf-loop-worker", help=argparse.SUPPRESS)  # internal: run the HF loop in a fresh process
    return p.parse_args(argv)


def _prompts(n, length, vocab, seed=0):
    import numpy as np
    from vllm import TokensPrompt

    rng = np.random.default_rng(seed)
    return [TokensPrompt(prompt_token_ids=rng.integers(2, vocab, size=length).tolist()) for _ in range(n)]


def _time_vllm(llm, prompts, extras: dict, output_len, repeats):
    """Times every mode in turn, ``repeats`` rounds, so drift in machine speed hits all alike.

    Returns ``{mode: (output tokens, median seconds, median time to first token)}``.
    """
    import numpy as np
    from vllm import SamplingParams

    def params(extra, n):
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, extra_args=extra or None)

    for extra in extras.values():  # warm-up
        llm.generate(prompts, params(extra, output_len), use_tqdm=False)
    times = {m: [] for m in extras}
    ttfts = {m: [] for m in extras}
    n_out = {}
    for _ in range(repeats):
        for mode, extra in extras.items():
            t = time.perf_counter()
            llm.generate(prompts, params(extra, 1), use_tqdm=False)
            ttfts[mode].append(time.perf_counter() - t)
            t = time.perf_counter()
            outs = llm.generate(prompts, params(extra, output_len), use_tqdm=False)
            times[mode].append(time.perf_counter() - t)
            n_out[mode] = sum(len(o.outputs[0].token_ids) for o in outs)
    return {m: (n_out[m], float(np.median(times[m])), float(np.median(ttfts[m]))) for m in extras}


def _time_hf_loop(pair, prompts, output_len, repeats, device):
    """GenARM-style reference: transformers ``generate`` + a logits processor running the doctor."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList

    from llmdoctor_vllm.checkpoint import load_doctor

    patient = AutoModelForCausalLM.from_pretrained(pair["patient"]).to(device).eval()
    doctor = load_doctor(pair["doctors"]["doctor0"], device=device, dtype=patient.dtype).model

    class DoctorGuidance(LogitsProcessor):
        def __init__(self, beta):
            self.beta, self.cache, self.seen = beta, None, 0

        def __call__(self, input_ids, scores):
            new = input_ids[:, self.seen:]
            out = doctor(new, past_key_values=self.cache, use_cache=True)
            self.cache, self.seen = out.past_key_values, input_ids.shape[1]
            lp = torch.log_softmax(out.logits[:, -1].float(), -1)
            v = lp.shape[1]
            res = torch.log_softmax(scores.float(), -1)
            res[:, :v] += self.beta * lp
            res[:, v:] = float("-inf")  # padding rows past the tokenizer, as the plugin does
            return res

    ids = torch.tensor([p["prompt_token_ids"] for p in prompts], device=device)
    import numpy as np

    times, ttfts = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t = time.perf_counter()
            patient.generate(ids, max_new_tokens=1, do_sample=False, logits_processor=LogitsProcessorList(
                [DoctorGuidance(0.5)]), pad_token_id=0)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            out = patient.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                   logits_processor=LogitsProcessorList([DoctorGuidance(0.5)]), pad_token_id=0,
                                   past_key_values=DynamicCache())
            dt = time.perf_counter() - t
            if i:  # first is warm-up
                times.append(dt)
                ttfts.append(t1)
    n_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return n_out, float(np.median(times)), float(np.median(ttfts))


def doctor_step_cost(pair, lengths, batch, device, dtype):
    """ms per doctor decode step for ``batch`` streams that already hold ``L`` tokens."""
    import numpy as np
    import torch

    from llmdoctor_vllm.checkpoint import load_doctor
    from llmdoctor_vllm.runner import DoctorRunner

    model = load_doctor(pair["doctors"]["doctor0"], device=device, dtype=dtype).model
    rows = []
    for L in lengths:
        r = DoctorRunner(model, device=device, dtype=dtype, cache_tokens=batch * (L + 64), max_streams=batch,
                         max_len=L + 64)
        sids = np.array([r.new_stream() for _ in range(batch)])
        rng = np.random.default_rng(0)
        for chunk in range(0, L, 512):  # prefill in chunks
            r.step(sids, [rng.integers(2, 300, size=min(512, L - chunk)).tolist() for _ in range(batch)])
        times = []
        for _ in range(20):
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            r.step(sids, [[5]] * batch)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        rows.append({"cached_tokens": L, "batch_size": batch, "ms_per_step": 1000 * float(np.median(times))})
    return rows


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    modes = [m for m in MODES if any(r["mode"] == m for r in result["rows"])]
    batches = sorted({r["batch_size"] for r in result["rows"]})
    width = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        ys = [next((r["output_tokens_per_s"] for r in result["rows"] if r["mode"] == m and r["batch_size"] == b), 0)
              for b in batches]
        axes[0].bar([j + i * width for j in range(len(batches))], ys, width, label=m)
    axes[0].set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(batches))], [str(b) for b in batches])
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title(f"throughput ({result['pair']['device']})")
    axes[0].legend()
    steps = result.get("doctor_step_cost", [])
    if steps:
        axes[1].plot([s["cached_tokens"] for s in steps], [s["ms_per_step"] for s in steps], "o-")
        axes[1].set_xlabel("tokens already cached per stream")
        axes[1].set_ylabel("ms per doctor decode step")
        axes[1].set_title(f"doctor step cost, batch {steps[0]['batch_size']}")
        axes[1].set_ylim(bottom=0)
    save_figure(fig, path)


def hf_loop_worker(job: str) -> None:
    """Runs the transformers reference loop for every batch size; prints one ``ROW {json}`` each."""
    import json

    import torch

    from benchmarks.common import peak_rss_mb

    spec = json.loads(job)
    gpu = torch.cuda.is_available()
    prompts = _prompts(max(spec["batch_sizes"]), spec["prompt_len"], 300)
    for b in spec["batch_sizes"]:
        n, dt, ttft = _time_hf_loop(spec["pair"], prompts[:b], spec["output_len"], spec["repeats"],
                                    "cuda" if gpu else "cpu")
        row = {"mode": "hf_loop", "batch_size": b, "output_tokens_per_s": n / dt, "ttft_s": ttft,
               "tpot_ms": 1000 * max(dt - ttft, 0) / max(spec["output_len"] - 1, 1),
               "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss_mb()}
        print("ROW " + json.dumps(row), flush=True)


def _run_hf_loop(pair: dict, args) -> list[dict]:
    """The HF-loop rows, measured in a fresh process: the in-process vLLM engine leaves thread
    bindings behind that slow plain PyTorch down, which would flatter vLLM."""
    import json
    import subprocess
    import sys

    job = json.dumps({"pair": pair, "batch_sizes": args.batch_sizes, "prompt_len": args.prompt_len,
                      "output_len": args.output_len, "repeats": args.repeats})
    out = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--hf-loop-worker", job],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    rows = [json.loads(x[4:]) for x in out.stdout.splitlines() if x.startswith("ROW ")]
    if not rows:
        raise RuntimeError(out.stderr[-3000:])
    return rows


def _ratios(rows: list[dict], batch_sizes, limit_ratio: float) -> list[dict]:
    """Per batch size: each mode's tokens/s over plain's, guided over the HF loop, and guided/plain
    against the FLOP limit."""
    by = {(r["mode"], r["batch_size"]): r["output_tokens_per_s"] for r in rows}
    ratios = []
    for b in batch_sizes:
        if ("plain", b) in by:
            entry = {"batch_size": b}
            for m in ("guided", "guided_2_doctors", "hf_loop"):
                if (m, b) in by:
                    entry[f"{m}_over_plain"] = by[(m, b)] / by[("plain", b)]
            if ("guided", b) in by and ("hf_loop", b) in by:
                entry["guided_over_hf_loop"] = by[("guided", b)] / by[("hf_loop", b)]
            entry["guided_over_plain_vs_limit"] = entry.get("guided_over_plain", 0) / limit_ratio
            ratios.append(entry)
    return ratios


def main(argv=None):
    args = parse_args(argv)
    if args.hf_loop_worker:
        return hf_loop_worker(args.hf_loop_worker)
    import torch
    from vllm import LLM

    from benchmarks.common import SHAPES, build_pair, command_line, current_rss_mb, device_name, \
        forward_flops_per_token, peak_rss_mb, write_results

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-bench-"))
    pair = build_pair(work, args.shapes, n_doctors=2)
    pshape, dshape = SHAPES[args.shapes]
    c_p, c_d = forward_flops_per_token(pshape), forward_flops_per_token(dshape)
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = "float32" if args.shapes == "tiny" else "bfloat16"
    result = {"pair": {"patient_params": pair["patient_params"], "doctor_params": pair["doctor_params"],
                       "device": device_name(), "shapes": args.shapes, "dtype": dtype,
                       "patient_flops_per_token": c_p, "doctor_flops_per_token": c_d},
              "limit_ratio": 1.0 / (1.0 + c_d / c_p), "prompt_len": args.prompt_len, "output_len": args.output_len,
              "rows": []}
    max_b = max(args.batch_sizes)
    prompts_all = _prompts(max_b, args.prompt_len, 300)
    vllm_modes = [m for m in args.modes if m != "hf_loop"]
    if vllm_modes:
        rss0 = current_rss_mb()
        kv = {} if gpu else {"kv_cache_memory_bytes": 512 << 20}
        llm = LLM(model=pair["patient"], dtype=dtype, enforce_eager=not gpu, max_num_seqs=max(max_b, 8), **kv,
                  max_model_len=args.prompt_len + args.output_len + 16, seed=0,
                  additional_config={"llmdoctor": {"doctors": pair["doctors"], "beta": 0.0}})
        print(f"engine up; process RSS {current_rss_mb() - rss0:.0f} MiB above the start")
        extras = {"plain": {}, "guided": {"llmdoctor_beta_doctor0": 0.5},
                  "guided_2_doctors": {"llmdoctor_beta": 0.5}}
        for b in args.batch_sizes:
            timed = _time_vllm(llm, prompts_all[:b], {m: extras[m] for m in vllm_modes}, args.output_len, args.repeats)
            mem = torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss_mb()
            for mode, (n, dt, ttft) in timed.items():
                row = {"mode": mode, "batch_size": b, "output_tokens_per_s": n / dt, "ttft_s": ttft,
                       "tpot_ms": 1000 * max(dt - ttft, 0) / max(args.output_len - 1, 1), "peak_memory_mb": mem}
                result["rows"].append(row)
                print(row)
        from llmdoctor_vllm.processor import active_processors

        procs = active_processors()
        if procs:
            result["doctor_kv_pool_mb"] = {d.name: d.runner.kv_bytes / 2**20 for d in procs[0].core.doctors}
        del llm
    if "hf_loop" in args.modes:
        for row in _run_hf_loop(pair, args):
            result["rows"].append(row)
            print(row)
    result["ratios"] = _ratios(result["rows"], args.batch_sizes, result["limit_ratio"])
    if args.step_lengths:
        result["doctor_step_cost"] = doctor_step_cost(pair, args.step_lengths, 8, device,
                                                      torch.float32 if dtype == "float32" else torch.bfloat16)
    path = write_results(args.output, result, args.output_dir, command_line(__file__, argv))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    for r in result["ratios"]:
        print(r)


if __name__ == "__main__":
    main()
