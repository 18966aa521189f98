"""Peak memory of one TFPO training step of the trainer as it is, and of its log-prob computation alone.

The trainer takes the response tokens' log-probs with TRL's ``selective_log_softmax`` over the
logits as the model returns them, one row at a time, so no float32 ``[2B, L, V]`` copy of the
logits is made; what remains is the logits themselves and their gradient. The doctor is
Qwen2.5-0.5B-shaped (random init, hidden 896, 24 layers, vocabulary 151,936), LoRA r = 8 as
``llmdoctor train`` defaults to, with gradient checkpointing so the layers' activations do not
hide the logits' share.

Each batch runs in a fresh process: the step's peak is the rise of the peak resident memory over
one ``Trainer`` step (forward, backward, optimizer), reset through ``/proc/self/clear_refs`` at
the step's start (on CUDA: ``torch.cuda.max_memory_allocated``). A batch whose estimated need
exceeds the memory free now is skipped, not run, and recorded so (with a straight-line
extrapolation from the measured batches). Beside each step, the log-prob computation alone
(forward and backward over given logits) is measured the same way and reported as a multiple of
the logits' size. ``--layers`` fewer than 24 keeps the step quick on a small CPU: with gradient
checkpointing a layer keeps only its input, 3.5 KiB per token (0.7 GiB for 24 layers at batch 4,
L = 1024), against 1.2 GiB of float32 logits per row, so the logits' share is the same either way.

    python -m benchmarks.tfpo_memory                          # batch 4 (4 pairs = 8 rows), L = 1024
    python -m benchmarks.tfpo_memory --batch-sizes 1 2 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4], help="preference pairs per step (4)")
    p.add_argument("--length", type=int, default=1024, help="response tokens per row, L (1024)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row (32)")
    p.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"], help="decoder layers (24)")
    p.add_argument("--vocab-size", type=int, default=QWEN25_05B["vocab_size"], help="V (151936)")
    p.add_argument("--hidden-size", type=int, default=QWEN25_05B["hidden_size"], help="hidden size (896)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank; 0 = full fine-tuning (8)")
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every layer's activations")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--output-dir", default=None, help="where to write tfpo_memory.json/.png (benchmarks/results)")
    p.add_argument("--one", nargs=2, metavar=("PART", "BATCH"), help=argparse.SUPPRESS)  # in a child
    return p.parse_args(argv)


def _peak_callback(device: str, result: dict):
    import gc

    import torch
    from transformers import TrainerCallback

    from benchmarks.common import reset_peak_rss, rss_kb

    class Peak(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                result["base"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                result["base"] = reset_peak_rss()

        def on_step_end(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                result["peak"] = torch.cuda.max_memory_allocated() - result["base"]
            else:
                result["peak"] = rss_kb("VmHWM") * 1024 - result["base"]

    return Peak()


def measure(args, batch: int) -> dict:
    """One training step's peak memory above the set-up (MiB), in this process."""
    import tempfile
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from llmdoctor_train.stage2.trainer import TFPOConfig, TFPOTrainer
    from llmdoctor_train.toy.models import build_tiny_lm, build_tokenizer

    model = build_tiny_lm(hidden_size=args.hidden_size, num_layers=args.layers,
                          num_heads=QWEN25_05B["num_attention_heads"], num_kv_heads=QWEN25_05B["num_key_value_heads"],
                          intermediate_size=QWEN25_05B["intermediate_size"], vocab_size=args.vocab_size,
                          max_position_embeddings=4096, tie_word_embeddings=True, lm_head_std=None).train()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(10, args.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    recs = [{"prompt_ids": ids(args.prompt_len), "chosen_ids": ids(args.length), "rejected_ids": ids(args.length),
             "chosen_rewards": [0.1] * args.length, "rejected_rewards": [-0.1] * args.length} for _ in range(batch)]
    cfg = TFPOConfig(output_dir=tempfile.mkdtemp(prefix="tfpo_memory_"), max_steps=1,
                     per_device_train_batch_size=batch, save_strategy="no", report_to=[], logging_steps=1,
                     use_cpu=args.device == "cpu", gradient_checkpointing=not args.no_gradient_checkpointing,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, disable_tqdm=True,
                     max_length=args.prompt_len + args.length)
    peft = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear") if args.lora_r else None
    result: dict = {}
    trainer = TFPOTrainer(model, args=cfg, train_dataset=Dataset.from_list(recs), processing_class=build_tokenizer(),
                          peft_config=peft, callbacks=[_peak_callback(args.device, result)])
    t0 = time.perf_counter()
    trainer.train()
    return {"batch_pairs": batch, "rows": 2 * batch, "peak_mib": result["peak"] / 2**20,
            "step_s": time.perf_counter() - t0,
            "logits_f32_mib": 2 * batch * (args.prompt_len + args.length) * args.vocab_size * 4 / 2**20}


def measure_logprobs(args, batch: int) -> dict:
    """The trainer's log-prob computation alone (``selective_log_softmax``), forward and backward, over
    given float32 logits (MiB above them)."""
    import gc

    import torch
    from trl.trainer.utils import selective_log_softmax

    from benchmarks.common import reset_peak_rss, rss_kb

    n, t = 2 * batch, args.prompt_len + args.length
    logits = torch.randn(n, t, args.vocab_size, requires_grad=True, device=args.device)
    ids = torch.randint(0, args.vocab_size, (n, t), device=args.device)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_peak_rss()
    logp = selective_log_softmax(logits[:, :-1], ids[:, 1:])
    logp.sum().backward()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss_kb("VmHWM") * 1024 - base
    logits_mib = logits.numel() * 4 / 2**20
    return {"batch_pairs": batch, "rows": n, "peak_mib": peak / 2**20, "logits_f32_mib": logits_mib,
            "peak_over_logits": peak / 2**20 / logits_mib}


def estimated_gib(args, batch: int) -> float:
    """A rough need (GiB): the set-up plus logits-sized tensors (about 3 live at the peak; a margin on top)."""
    logits = 2 * batch * (args.prompt_len + args.length) * args.vocab_size * 4 / 2**30
    return 2.5 + logits * 3.5


def extrapolated(rows, batch: int) -> dict | None:
    """A straight line through the measured peaks (they grow with the rows as the logits do), read at
    ``batch``: what a batch too large for this machine would take. Labelled as such."""
    import numpy as np

    pts = [(r["batch_pairs"], r["peak_mib"]) for r in rows if "peak_mib" in r]
    if len({b for b, _ in pts}) < 2:
        return None
    slope, intercept = np.polyfit(*zip(*pts), 1)
    return {"batch_pairs": batch, "peak_mib": float(intercept + slope * batch), "per_pair_mib": float(slope),
            "from_batches": sorted({b for b, _ in pts})}


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


def run_all(args, argv) -> list[dict]:
    """Every batch in its own process; too large ones are skipped and recorded."""
    rows = []
    for batch in args.batch_sizes:
        need, free = estimated_gib(args, batch), available_gib()
        if args.device == "cpu" and need > 0.8 * free:
            rows.append({"batch_pairs": batch, "skipped": f"needs ~{need:.1f} GiB, {free:.1f} free"})
            print(rows[-1], flush=True)
            continue
        row = _child(argv, "step", batch)
        row["logprobs_only"] = _child(argv, "logprobs", batch)  # the step's logits-sized share, isolated
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def _child(argv, part: str, batch: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks leave the resident set
    out = subprocess.run([sys.executable, "-m", "benchmarks.tfpo_memory", *argv, "--one", part, str(batch)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{part} batch {batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    measured = [r for r in rows if "peak_mib" in r]
    if measured:
        b = [r["batch_pairs"] for r in measured]
        ax.plot(b, [r["peak_mib"] / 1024 for r in measured], "o-", color="#3a7", label="training step")
        ax.plot(b, [r["logprobs_only"]["peak_mib"] / 1024 for r in measured], "s--", color="#3a7", alpha=0.6,
                label="log-probs alone")
        ax.plot(b, [r["logits_f32_mib"] / 1024 for r in measured], ":", color="#888", label="float32 logits")
    ax.set_xlabel("batch (preference pairs; rows = 2x)")
    ax.set_ylabel("peak step memory above set-up (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        part, batch = args.one
        print(json.dumps((measure if part == "step" else measure_logprobs)(args, int(batch))))
        return None
    from benchmarks.common import device_name, write_results

    argv = sys.argv[1:] if argv is None else list(argv)
    rows = run_all(args, argv)
    payload = {"device": device_name(), "model": {**QWEN25_05B, "hidden_size": args.hidden_size,
                                                   "num_hidden_layers": args.layers, "vocab_size": args.vocab_size},
               "settings": {"L": args.length, "prompt_len": args.prompt_len, "lora_r": args.lora_r,
                            "gradient_checkpointing": not args.no_gradient_checkpointing, "dtype": "float32"},
               "rows": rows}
    skipped = sorted({r["batch_pairs"] for r in rows if "skipped" in r})
    if skipped:
        payload["extrapolated"] = {b: extrapolated(rows, b) for b in skipped}
    path = write_results("tfpo_memory", payload, args.output_dir)
    plot(rows, path.with_suffix(".png"), f"TFPO step, Qwen2.5-0.5B-shaped doctor ({args.layers} layers), "
                                         f"L = {args.length}, {payload['device']}")
    print(f"peak step memory (MiB): {[(r['batch_pairs'], round(r['peak_mib'])) for r in rows if 'peak_mib' in r]}; "
          f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
