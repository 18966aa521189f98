"""Peak activation memory of one doctor step: a long guided prompt alone vs beside decoding streams.

The doctor runner packs every stream's new tokens without padding and feeds a long prompt in
passes of ``--pass-tokens`` (the doctor's own chunked prefill), so a 32k-token prompt arriving
while 32 other requests decode should cost about what the prompt costs alone, not 33 x 32k
padded rows. Each mode runs in a fresh process: on CPU the step's peak is the rise of the
process's peak resident memory (reset through ``/proc/self/clear_refs`` after set-up; glibc
serves large blocks from mmap, so what is freed leaves the resident set), on CUDA
``torch.cuda.max_memory_allocated`` over the step. Models are random-init, of ``--shapes``' doctor.

    python -m benchmarks.doctor_memory                                  # 32k prompt, 32 streams, CPU
    python -m benchmarks.doctor_memory --prompt-tokens 2048 --streams 4 --cached 256   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny", help="model shapes from benchmarks.common.SHAPES (tiny)")
    p.add_argument("--prompt-tokens", type=int, default=32768, help="the long guided prompt (32768)")
    p.add_argument("--streams", type=int, default=32, help="requests decoding beside it (32)")
    p.add_argument("--cached", type=int, default=2048, help="tokens each decoding stream holds (2048)")
    p.add_argument("--pass-tokens", type=int, default=2048, help="the runner's tokens per forward (2048)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--output-dir", default=None, help="where to write doctor_memory.json/.png (benchmarks/results)")
    p.add_argument("--mode", choices=["alone", "mixed"], help=argparse.SUPPRESS)  # one measurement, in a child
    return p.parse_args(argv)


def measure(args) -> dict:
    """One step's peak memory above what the set-up holds (MiB), in this process."""
    import numpy as np
    import torch

    from benchmarks.common import SHAPES, reset_peak_rss, rss_kb, shape_kwargs
    from llmdoctor_train.toy.models import build_tiny_lm
    from llmdoctor_vllm.runner import DoctorRunner

    shape = SHAPES[args.shapes][1]
    max_len = max(args.prompt_tokens, args.cached) + 16
    model = build_tiny_lm(**shape_kwargs(shape), max_position_embeddings=max_len, lm_head_std=None,
                          dtype=getattr(torch, args.dtype)).to(args.device)
    streams = args.streams if args.mode == "mixed" else 0
    runner = DoctorRunner(model, device=args.device, dtype=getattr(torch, args.dtype),
                          cache_tokens=args.prompt_tokens + 32 + streams * (args.cached + 32), max_streams=streams + 1,
                          max_len=max_len, prefill_chunk_tokens=args.pass_tokens)
    rng = np.random.default_rng(0)
    vocab = min(shape[5], 300)
    decoding = np.array([runner.new_stream() for _ in range(streams)], dtype=np.int64)
    for start in range(0, args.cached if streams else 0, args.pass_tokens):  # fill the decoding streams
        n = min(args.pass_tokens, args.cached - start)
        runner.step(decoding, [rng.integers(2, vocab, n).tolist() for _ in decoding])
    long = runner.new_stream()
    sids = np.append(decoding, long)
    feed = [rng.integers(2, vocab, 1).tolist() for _ in decoding] + [rng.integers(2, vocab, args.prompt_tokens).tolist()]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.step(sids, feed)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        import gc

        gc.collect()
        base = reset_peak_rss()
        runner.step(sids, feed)
        peak = rss_kb("VmHWM") * 1024 - base
    return {"mode": args.mode, "peak_mib": peak / 2**20, "kv_pool_mib": runner.kv_bytes / 2**20,
            "new_tokens": int(sum(map(len, feed)))}


def main(argv=None):
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args)))
        return
    from benchmarks.common import device_name, save_figure, write_results

    argv = sys.argv[1:] if argv is None else list(argv)
    rows = {}
    for mode in ("alone", "mixed"):
        # large blocks straight from mmap: freed memory leaves the resident set, so its peak is the step's
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-m", "benchmarks.doctor_memory", *argv, "--mode", mode],
                             capture_output=True, text=True, check=True, env=env)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[mode], flush=True)
    ratio = rows["mixed"]["peak_mib"] / max(rows["alone"]["peak_mib"], 1e-9)
    payload = {"device": device_name(), "shapes": args.shapes, "prompt_tokens": args.prompt_tokens,
               "decoding_streams": args.streams, "cached_per_stream": args.cached, "pass_tokens": args.pass_tokens,
               "alone": rows["alone"], "mixed": rows["mixed"], "mixed_over_alone": ratio, "target": "<= 2",
               # the layout before packing: every stream padded to the longest new-token run
               "padded_token_rows_before": (args.streams + 1) * args.prompt_tokens,
               "packed_token_rows": rows["mixed"]["new_tokens"]}
    path = write_results("doctor_memory", payload, args.output_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    labels = [f"{args.prompt_tokens}-token prompt alone", f"... beside {args.streams} decoding streams"]
    ax.bar(labels, [rows["alone"]["peak_mib"], rows["mixed"]["peak_mib"]], color=["#888", "#3a7"])
    ax.set_ylabel("peak step memory above set-up (MiB)")
    ax.set_title(f"doctor step memory ({payload['device']}); mixed/alone = {ratio:.2f}", fontsize=9)
    save_figure(fig, path.with_suffix(".png"))
    print(f"mixed/alone peak = {ratio:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
