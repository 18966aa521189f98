"""What guidance costs: plain vLLM vs vLLM + one / two doctors vs an HF-transformers loop.

Same run, same prompts, same engine settings. For each mode and batch size: output tokens/s,
time to first token (a 1-token run of the batch), time per output token, and memory. The
guided/plain ratio is reported next to the limit 1/(1 + c_doctor/c_patient), c being the
forward FLOPs per token. A second table times one doctor decode step against the length
already cached (256 -> 2048 tokens), with the runner alone.

    python -m benchmarks.throughput                      # tiny pair, CPU, a few minutes
    python -m benchmarks.throughput --shapes qwen2.5-7b+1.5b --batch-sizes 1 8 32   # on a GPU
    python -m benchmarks.throughput --shapes smollm2 --batch-sizes 1 8 32 64 --output-len 48 \
        --output throughput_real                         # the real model (`llmdoctor smollm2` first)

With ``--shapes smollm2`` the patient is SmolLM2-135M-Instruct and two doctors of real shape run
beside it, each alone: a LoRA doctor on the patient's own weights (random adapter weights unless
``--lora-doctor`` names a trained one) and a full doctor cut to the patient's first
``--cut-layers`` layers (``--cut-doctor``). Each gets guided/plain per batch size against its
limit, the HF-transformers loop with the same guidance, and its KV pool beside the patient's.
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
    p.add_argument("--shapes", default="tiny",
                   help="model pair shapes: tiny (CPU default), qwen2.5-7b+1.5b, or smollm2 (the real model)")
    p.add_argument("--lora-doctor", help="smollm2: a trained LoRA doctor checkpoint (default: random adapter)")
    p.add_argument("--cut-doctor", help="smollm2: a trained cut doctor checkpoint (default: the cut, untrained)")
    p.add_argument("--cut-layers", type=int, default=10, help="smollm2: layers of the cut doctor")
    p.add_argument("--hf-loop-max-batch", type=int, default=32, help="smollm2: largest batch the HF loop runs")
    p.add_argument("--threads", type=int, help="CPU threads for the engine and the HF loop (bound to cores 0..n-1; "
                   "default: vLLM's own binding)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, help="timed rounds over all modes, the median kept (default: 15 for the tiny "
                   "pair, whose millisecond steps are noisy; 5 otherwise)")
    p.add_argument("--step-lengths", type=int, nargs="*", default=[256, 512, 1024, 2048],
                   help="cached lengths for the doctor step-cost table (empty to skip)")
    p.add_argument("--workdir", help="where to build the models (default: temp dir)")
    p.add_argument("--output", default="throughput", help="results name (a .json and a .png)")
    p.add_argument("--output-dir", default=None, help="where the results go (default: benchmarks/results)")
    p.add_argument("--hf-loop-worker", help=argparse.SUPPRESS)  # internal: run the HF loop in a fresh process
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 15 if args.shapes == "tiny" else 5
    return args


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
        llm.generate(prompts, params(extra, min(output_len, 4)), use_tqdm=False)
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


def _time_hf_loop(pair, prompts, output_len, repeats, device, doctor="doctor0"):
    """GenARM-style reference: transformers ``generate`` + a logits processor running the doctor."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList

    from llmdoctor_vllm.checkpoint import load_doctor

    patient = AutoModelForCausalLM.from_pretrained(pair["patient"]).to(device).eval()
    doctor = load_doctor(pair["doctors"][doctor], device=device, dtype=patient.dtype).model

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
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    prompts = _prompts(max(spec["batch_sizes"]), spec["prompt_len"], spec.get("vocab", 300))
    for b in spec["batch_sizes"]:
        n, dt, ttft = _time_hf_loop(spec["pair"], prompts[:b], spec["output_len"], spec["repeats"],
                                    "cuda" if gpu else "cpu", spec.get("doctor", "doctor0"))
        row = {"mode": spec.get("mode", "hf_loop"), "batch_size": b, "output_tokens_per_s": n / dt, "ttft_s": ttft,
               "tpot_ms": 1000 * max(dt - ttft, 0) / max(spec["output_len"] - 1, 1),
               "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else peak_rss_mb()}
        print("ROW " + json.dumps(row), flush=True)


def _run_hf_loop(pair: dict, args, batch_sizes=None, **job_extra) -> list[dict]:
    """The HF-loop rows, measured in a fresh process: the in-process vLLM engine leaves thread
    bindings behind that slow plain PyTorch down, which would flatter vLLM."""
    import json
    import subprocess
    import sys

    job = json.dumps({"pair": pair, "batch_sizes": batch_sizes or args.batch_sizes, "prompt_len": args.prompt_len,
                      "output_len": args.output_len, "repeats": args.repeats, **job_extra})
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
    tpot = {(r["mode"], r["batch_size"]): r["tpot_ms"] for r in rows}
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
            if ("guided", b) in tpot:  # the plugin's cost per step beyond plain decoding
                entry["guided_minus_plain_tpot_ms"] = tpot[("guided", b)] - tpot[("plain", b)]
            ratios.append(entry)
    return ratios


def build_real_doctors(root: Path, patient: str, cut_layers: int, lora: str | None = None,
                       cut_doctor: str | None = None) -> dict:
    """Doctors of real shape for the real patient, ``{name: checkpoint}``: ``lora`` (default: a random
    LoRA adapter on its weights) and ``cut_doctor`` (default: its first ``cut_layers`` layers as a
    full doctor, untrained); only the ones not given are built."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmdoctor_train.real.cut import cut_layers as cut
    from llmdoctor_train.toy.models import build_tiny_doctor
    from llmdoctor_vllm.checkpoint import save_doctor
    from llmdoctor_vllm.value_head import ValueHead

    tok = AutoTokenizer.from_pretrained(patient)
    out = {"lora": lora or build_tiny_doctor(tok, root / "lora", seed=1, lora_base=patient,
                                             trained_for="benchmark (random LoRA adapter)")}
    if cut_doctor:
        return {**out, "cut": cut_doctor}
    base = cut(patient, cut_layers, root / "cut_base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    save_doctor(root / "cut", model, tok, ValueHead(model.config.hidden_size),
                trained_for=f"benchmark (first {cut_layers} layers, untrained)")
    out["cut"] = str(root / "cut")
    return out


def _real_shape(config, layers=None) -> tuple:
    """The shape tuple of :func:`benchmarks.common.forward_flops_per_token` for an HF config."""
    return (config.hidden_size, layers or config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size, config.vocab_size)


def run_real(args) -> dict:
    """guided/plain on the real patient, one doctor at a time, and the HF loop (see the module doc)."""
    import torch
    from transformers import AutoConfig
    from vllm import LLM

    from benchmarks.common import command_line, current_rss_mb, device_name, forward_flops_per_token, peak_rss_mb
    from llmdoctor_train.real import smollm2_path

    patient = str(smollm2_path())
    if args.threads:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-bench-real-"))
    doctors = build_real_doctors(work, patient, args.cut_layers, args.lora_doctor, args.cut_doctor)
    cfg = AutoConfig.from_pretrained(patient)
    c_p = forward_flops_per_token(_real_shape(cfg))
    c_d = {"lora": c_p, "cut": forward_flops_per_token(_real_shape(cfg, args.cut_layers))}
    limits = {name: 1.0 / (1.0 + c_d[name] / c_p) for name in doctors}
    max_b = max(args.batch_sizes)
    max_len = args.prompt_len + args.output_len + 16
    kv_bytes = 512 << 20
    rss0 = current_rss_mb()
    llm = LLM(model=patient, dtype="float32", enforce_eager=True, max_num_seqs=max(max_b, 8),
              kv_cache_memory_bytes=kv_bytes, max_model_len=max_len, seed=0, enable_chunked_prefill=False,
              additional_config={"llmdoctor": {"doctors": doctors, "beta": 0.0}})
    engine_rss = current_rss_mb() - rss0
    vocab = cfg.vocab_size
    prompts_all = _prompts(max_b, args.prompt_len, vocab)
    extras = {"plain": {}, "guided_lora": {"llmdoctor_beta_lora": 0.5}, "guided_cut": {"llmdoctor_beta_cut": 0.5}}
    modes = []
    for b in args.batch_sizes:
        timed = _time_vllm(llm, prompts_all[:b], extras, args.output_len, args.repeats)
        for mode, (n, dt, ttft) in timed.items():
            row = {"mode": mode, "batch_size": b, "output_tokens_per_s": n / dt, "ttft_s": ttft,
                   "tpot_ms": 1000 * max(dt - ttft, 0) / max(args.output_len - 1, 1), "peak_rss_mb": peak_rss_mb()}
            modes.append(row)
            print(row, flush=True)
    from llmdoctor_vllm.processor import active_processors

    procs = active_processors()
    pools = {d.name: d.runner.kv_bytes / 2**20 for d in procs[0].core.doctors} if procs else {}
    del llm
    hf_batches = [b for b in args.batch_sizes if b <= args.hf_loop_max_batch]
    if hf_batches:
        pair = {"patient": patient, "doctors": doctors}
        modes += _run_hf_loop(pair, args, hf_batches, doctor="lora", mode="hf_loop_lora", vocab=vocab,
                              threads=args.threads)
    by = {(r["mode"], r["batch_size"]): r for r in modes}
    rows = []
    for name in doctors:
        for b in args.batch_sizes:
            plain, guided = by[("plain", b)], by[(f"guided_{name}", b)]
            row = {"doctor": name, "batch": b, "guided_over_plain": guided["output_tokens_per_s"] /
                   plain["output_tokens_per_s"], "limit_ratio": limits[name]}
            row["guided_over_plain_vs_limit"] = row["guided_over_plain"] / limits[name]
            row["guided_minus_plain_tpot_ms"] = guided["tpot_ms"] - plain["tpot_ms"]
            hf = by.get((f"hf_loop_{name}", b))
            if hf:
                row["guided_over_hf_loop"] = guided["output_tokens_per_s"] / hf["output_tokens_per_s"]
            rows.append(row)
    return {"pair": {"patient": "SmolLM2-135M-Instruct", "device": device_name(), "dtype": "float32",
                     "patient_flops_per_token": c_p, "doctor_flops_per_token": c_d, "cut_layers": args.cut_layers,
                     "doctors": {k: str(v) for k, v in doctors.items()}},
            "prompt_len": args.prompt_len, "output_len": args.output_len, "decoding": "greedy", "threads": args.threads,
            "rows": rows, "modes": modes,
            "memory": {"patient_kv_cache_mib": kv_bytes / 2**20, "doctor_kv_pool_mib": pools,
                       "engine_rss_mib_above_start": engine_rss, "peak_rss_mib": peak_rss_mb()}}


def plot_real(result, path: Path):
    """guided/plain per batch size for each doctor, against its limit and 0.9 x the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, name in enumerate(sorted({r["doctor"] for r in result["rows"]})):
        rows = [r for r in result["rows"] if r["doctor"] == name]
        xs = [r["batch"] for r in rows]
        line, = ax.plot(xs, [r["guided_over_plain"] for r in rows], "o-", label=f"{name} doctor: guided / plain")
        ax.axhline(rows[0]["limit_ratio"], color=line.get_color(), ls="--", lw=1, label=f"{name}: FLOP limit")
        ax.axhline(0.9 * rows[0]["limit_ratio"], color=line.get_color(), ls=":", lw=1, label=f"{name}: 0.9 x limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s, guided over plain")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"SmolLM2-135M patient, {result['output_len']} tokens greedy ({result['pair']['device']})")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    if args.hf_loop_worker:
        return hf_loop_worker(args.hf_loop_worker)
    if args.shapes == "smollm2":
        from benchmarks.common import command_line, write_results

        result = run_real(args)
        path = write_results(args.output, result, args.output_dir, command_line(__file__, argv))
        plot_real(result, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
        for r in result["rows"]:
            print(r)
        return
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
