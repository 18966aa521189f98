"""What the doctor costs next to the patient at real sizes: the doctor runner alone, no vLLM.

For GPU machines without vLLM (or to see the doctor's share in isolation). Builds random-init
models of real shapes in memory (default: a Qwen2.5-7B-shaped patient and a 1.5B-shaped doctor,
bf16; nothing is downloaded) and times, per batch size B and cached length L:

- ``patient_step_ms``: one decode step of the patient in transformers (eager, KV cache of L,
  SDPA without the cuDNN backend, which re-plans for every new key length);
  a vLLM step with CUDA graphs is faster, so the patient's weight-streaming floor
  (``patient_floor_ms`` = weight bytes / memory bandwidth, if ``--bandwidth-gbs`` is given) is
  reported beside it;
- ``doctor_step_ms``: one step of :class:`llmdoctor_vllm.runner.DoctorRunner` (the code the
  plugin runs each engine step): B streams holding L tokens each gain one token;
- ``doctor_delta_ms``: the same with a LoRA doctor under the delta rule (2B rows: adapter on
  and off in one forward);
- ``*_kernel_ms`` (GPU): the sum of kernel durations per step, from the profiler: the step's
  cost without launch overhead (what CUDA graphs would approach).

``est_ratio = patient / (patient + doctor)`` is the guided/plain throughput those times imply
(``est_ratio_kernels`` the same from kernel times), next to the FLOP limit
``1/(1 + c_doctor/c_patient)``.

    python -m benchmarks.runner_cost --bandwidth-gbs 3350         # H100 SXM; a few minutes
    python -m benchmarks.runner_cost --shapes tiny --device cpu --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import save_figure


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="qwen2.5-7b+1.5b", help="model pair shapes from benchmarks/common.py SHAPES")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="cached tokens per request")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--lora-r", type=int, default=16, help="rank of the LoRA doctor for the delta-rule row")
    p.add_argument("--bandwidth-gbs", type=float, default=None, help="device memory bandwidth, for the floor")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--doctor-cuda-graphs", action="store_true",
                   help="decode steps of the doctor over static buckets, captured as CUDA graphs on a GPU "
                        "(the plugin's cuda_graphs setting; never run on a GPU yet)")
    p.add_argument("--no-patient-cuda-graphs", dest="patient_cuda_graphs", action="store_false",
                   help="time the patient eagerly with a dynamic cache instead of its CUDA-graph decode step "
                        "over a static cache (vLLM's way; on CPU the static step runs eagerly)")
    p.add_argument("--output", default="runner_cost", help="results name (a .json and a .png)")
    p.add_argument("--output-dir", default=None, help="where the results go (default: benchmarks/results)")
    return p.parse_args(argv)


def build(shape, device, dtype, seed):
    """A random-init Qwen2 of ``shape`` (hidden, layers, heads, kv heads, ffn, vocab), in memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common import qwen2_config

    cfg = qwen2_config(shape, max_position_embeddings=32768)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def timed(fn, repeats, sync):
    """Median seconds of ``fn()`` after one warm-up call."""
    import numpy as np

    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def kernel_ms(fn, sync, repeats: int = 5) -> float | None:
    """GPU kernel time of one ``fn()`` (sum of kernel durations, from the profiler): what the step
    would cost with no launch overhead, e.g. under CUDA graphs. None on CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return None
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        sync()
    us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
             for e in prof.key_averages())
    return us / repeats / 1000


def static_decode_step(model, ids, capture: bool):
    """The patient's decode step over a static KV cache holding ``ids`` ``[B, L]``: a function
    returning the step's logits ``[B, 1, V]``, and whether it is a captured CUDA graph.

    As vLLM runs its model: fixed shapes, captured once and replayed (``capture`` on CUDA). The
    step always writes position ``L`` and attends over the ``L`` cached tokens plus the new one, so
    every replay costs one decode step at that length. If capture fails the step runs eagerly
    over the same static cache (and the result says so)."""
    import inspect

    import torch
    from transformers import StaticCache

    B, L = ids.shape
    dev = ids.device
    try:  # transformers >= 4.56 sizes the cache at its first write
        cache = StaticCache(config=model.config, max_cache_len=L + 1)
    except TypeError:
        cache = StaticCache(config=model.config, max_batch_size=B, max_cache_len=L + 1, device=dev,
                            dtype=next(model.parameters()).dtype)
    # transformers 4.x places writes by cache_position; 5.x by each layer's device-side length
    explicit = "cache_position" in inspect.signature(model.model.forward).parameters
    model(input_ids=ids, past_key_values=cache, position_ids=torch.arange(L, device=dev)[None], use_cache=True,
          logits_to_keep=1, **({"cache_position": torch.arange(L, device=dev)} if explicit else {}))
    tok, pos = ids[:, -1:].clone(), torch.tensor([L], device=dev)
    lengths = [layer.cumulative_length for layer in getattr(cache, "layers", ())
               if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def run():
        for n in lengths:  # every call writes position L again (a device op, so it is captured too)
            n.fill_(L)
        return model(input_ids=tok, past_key_values=cache, position_ids=pos[None], use_cache=True,
                     **({"cache_position": pos} if explicit else {})).logits

    if not (capture and dev.type == "cuda"):
        return run, False
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
    except Exception as e:  # noqa: BLE001 - reported, and the step is timed eagerly instead
        print(f"patient CUDA-graph capture failed ({type(e).__name__}: {e}); timing it eagerly", flush=True)
        torch.cuda.synchronize()
        return run, False

    def replay():
        graph.replay()
        return out

    return replay, True


def patient_step(model, B, L, repeats, sync, graphs: bool = True):
    """``(seconds, kernel ms, captured)`` per decode step of the patient with ``L`` tokens cached per
    row: captured in a CUDA graph over a static cache (``graphs``, as vLLM runs it), else eager
    transformers with a dynamic cache."""
    import torch
    from transformers import DynamicCache

    from torch.nn.attention import SDPBackend, sdpa_kernel

    ids = torch.randint(2, min(1000, model.config.vocab_size), (B, L), device=model.device)
    # not cuDNN attention, which re-plans for every new key length (as DoctorRunner avoids it too)
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.inference_mode(), sdpa_kernel(backends):
        if graphs:
            fn, captured = static_decode_step(model, ids, capture=True)
            return timed(fn, repeats, sync), kernel_ms(fn, sync), captured
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = ids[:, -1:]
        fn = lambda: model(input_ids=tok, past_key_values=cache, use_cache=True)  # noqa: E731
        return timed(fn, repeats, sync), kernel_ms(fn, sync), False


def doctor_step(model, B, L, repeats, sync, device, dtype, delta=False, graphs=False):
    """Seconds per DoctorRunner step for B requests (2B streams under the delta rule) holding L tokens."""
    import numpy as np

    from llmdoctor_vllm.runner import DoctorRunner

    streams = 2 * B if delta else B
    r = DoctorRunner(model, device=device, dtype=dtype, cache_tokens=streams * (L + 64) + 64 * 16,
                     max_streams=streams, max_len=L + 64)
    if graphs:  # no key budget: every step here is to run in a graph
        r.enable_static_decode(max_batch=streams, capture=str(device).startswith("cuda"), max_bucket_keys=1 << 30)
    sids = np.array([r.new_stream() for _ in range(streams)])
    off = np.arange(streams) >= B if delta else None
    rng = np.random.default_rng(0)
    for start in range(0, L, 512):
        n = min(512, L - start)
        r.step(sids, [rng.integers(2, min(1000, model.config.vocab_size), size=n).tolist() for _ in range(streams)], adapter_off=off)
    one = [[5]] * streams
    fn = lambda: r.step(sids, one, adapter_off=off)  # noqa: E731
    return timed(fn, repeats, sync), kernel_ms(fn, sync)


def main(argv=None):
    args = parse_args(argv)
    import torch

    from benchmarks.common import SHAPES, device_name, forward_flops_per_token, write_results

    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    pshape, dshape = SHAPES[args.shapes]
    limit = 1 / (1 + forward_flops_per_token(dshape) / forward_flops_per_token(pshape))
    patient = build(pshape, args.device, dtype, 0)
    p_bytes = sum(p.numel() * p.element_size() for p in patient.parameters())
    rows = []
    for L in args.lengths:
        for B in args.batch_sizes:
            wall, kern, captured = patient_step(patient, B, L, args.repeats, sync, args.patient_cuda_graphs)
            rows.append({"batch_size": B, "cached_tokens": L, "patient_step_ms": 1000 * wall,
                         "patient_kernel_ms": kern, "patient_captured": captured})
            print(rows[-1], flush=True)
    del patient
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    doctor = build(dshape, args.device, dtype, 1)
    d_bytes = sum(p.numel() * p.element_size() for p in doctor.parameters())
    for row in rows:
        wall, kern = doctor_step(doctor, row["batch_size"], row["cached_tokens"], args.repeats, sync, args.device,
                                 dtype, graphs=args.doctor_cuda_graphs)
        row["doctor_step_ms"], row["doctor_kernel_ms"] = 1000 * wall, kern
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # no peft here: the LoRA / delta-rule row is skipped
        lora = None
    else:
        lora = get_peft_model(doctor, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for row in rows:
        p, d = row["patient_step_ms"], row["doctor_step_ms"]
        row["est_ratio"] = p / (p + d)
        if lora is not None:
            wall, kern = doctor_step(lora, row["batch_size"], row["cached_tokens"], args.repeats, sync,
                                     args.device, dtype, delta=True, graphs=args.doctor_cuda_graphs)
            row["doctor_delta_ms"], row["doctor_delta_kernel_ms"] = 1000 * wall, kern
            row["est_ratio_delta"] = p / (p + row["doctor_delta_ms"])
        if row["patient_kernel_ms"] and row["doctor_kernel_ms"]:  # both without launch overhead
            pk = row["patient_kernel_ms"]
            row["est_ratio_kernels"] = pk / (pk + row["doctor_kernel_ms"])
        if args.bandwidth_gbs:
            row["patient_floor_ms"] = p_bytes / args.bandwidth_gbs / 1e6
            row["est_ratio_at_floor"] = row["patient_floor_ms"] / (row["patient_floor_ms"] + d)
        print(row, flush=True)
    x = torch.zeros(1, device=args.device)
    launch_us = 1e6 * timed(lambda: [x.add_(1) for _ in range(1000)], 3, sync) / 1000  # host cost per tiny op
    result = {"host_us_per_tiny_op": launch_us, "device": device_name() if args.device.startswith("cuda") else "cpu", "shapes": args.shapes,
              "dtype": args.dtype, "patient_gb": p_bytes / 1e9, "doctor_gb": d_bytes / 1e9, "limit_ratio": limit,
              "note": "random-init weights; patient: transformers' decode step over a static cache, captured as a "
                      "CUDA graph where patient_cuda_graphs (else eager); doctor: DoctorRunner",
              "doctor_cuda_graphs": bool(args.doctor_cuda_graphs and args.device.startswith("cuda")),
              "patient_cuda_graphs": bool(rows) and all(r["patient_captured"] for r in rows),
              "targets": targets(rows, limit), "rows": rows}
    path = write_results(args.output, result, args.output_dir)
    plot(result, path.with_suffix(".png"))
    print("wrote", path)


def targets(rows: list[dict], limit: float) -> dict:
    """The GPU-speed issue's targets per row: no host time (``doctor_step_ms <= 1.2 x
    doctor_kernel_ms``) and ``est_ratio >= 0.9 x limit_ratio``; None where kernel times are absent (CPU)."""
    host = [None if not r.get("doctor_kernel_ms") else r["doctor_step_ms"] <= 1.2 * r["doctor_kernel_ms"] for r in rows]
    ratio = [r["est_ratio"] >= 0.9 * limit for r in rows]
    return {"doctor_step_le_1.2x_kernel": None if None in host else all(host),
            "est_ratio_ge_0.9x_limit": all(ratio),
            "rows_failing": [{"batch_size": r["batch_size"], "cached_tokens": r["cached_tokens"]}
                             for r, h, q in zip(rows, host, ratio) if h is False or not q]}


def plot(result, path):
    """Step times per batch size and cached length, and the implied guided/plain ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for L in sorted({r["cached_tokens"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["cached_tokens"] == L]
        bs = [r["batch_size"] for r in rs]
        for key, style in (("patient_step_ms", "-o"), ("doctor_step_ms", "--s"), ("doctor_delta_ms", ":^")):
            if key not in rs[0]:
                continue
            a.plot(bs, [r[key] for r in rs], style, label=f"{key.split('_step')[0].split('_ms')[0]} L={L}")
        b.plot(bs, [r["est_ratio"] for r in rs], "-o", label=f"est. guided/plain L={L}")
    b.axhline(result["limit_ratio"], color="k", lw=0.8, label="FLOP limit")
    a.set(xscale="log", xlabel="batch size", ylabel="ms per step", title=f"{result['shapes']} ({result['device']})")
    b.set(xscale="log", xlabel="batch size", ylabel="ratio", ylim=(0, 1))
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
