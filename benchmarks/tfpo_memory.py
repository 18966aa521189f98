"""Peak memory of one TFPO training step, log-probs before and after TRL's ``selective_log_softmax``.

Before (the trainer up to this change): the response positions' logits were gathered into a new
``[2B, L, V]`` tensor, cast to float32, and ``log_softmax = x - logsumexp(x)`` taken over all of
it at once (plus the same sizes again in the backward). After: ``selective_log_softmax`` over the
logits as the model returns them, one row at a time. The doctor is Qwen2.5-0.5B-shaped (random
init, hidden 896, 24 layers, vocabulary 151,936), LoRA r = 8 as ``llmdoctor train`` defaults to,
with gradient checkpointing so the layers' activations do not hide the logits' share.

Each (mode, batch) runs in a fresh process: the step's peak is the rise of the peak resident
memory over one ``Trainer`` step (forward, backward, optimizer), reset through
``/proc/self/clear_refs`` at the step's start (on CUDA: ``torch.cuda.max_memory_allocated``).
A batch whose estimated need exceeds the memory free now is skipped, not run, and recorded so
(with a straight-line extrapolation from the measured batches). Beside each step, the log-prob
computation alone (forward and backward over given logits) is measured the same way.
``--layers`` fewer than 24 keeps the step quick on a small CPU: with gradient checkpointing a
layer keeps only its input, 3.5 KiB per token (0.7 GiB for 24 layers at batch 4, L = 1024), against
1.2 GiB of float32 logits per row, so the logits' share is the same either way.

    python -m benchmarks.tfpo_memory                          # batch 4 (4 pairs = 8 rows), L = 1024
    python -m benchmarks.tfpo_memory --batch-sizes 1 2        # what a 24 GiB shared box can hold
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
    p.add_argument("--modes", nargs="+", default=["before", "after"], choices=["before", "after"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--output-dir", default=None, help="where to write tfpo_memory.json/.png (benchmarks/results)")
    p.add_argument("--one", nargs=3, metavar=("PART", "MODE", "BATCH"), help=argparse.SUPPRESS)  # in a child
    return p.parse_args(argv)


def gathered_response_terms(self, model, inputs, need_values: bool):
    """The trainer's log-probs before this change (kept here to measure them): a float32 [N, L, V] copy."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                output_hidden_states=need_values, use_cache=False)
    L = inputs["response_ids"].shape[1]
    rows, pos = self._state_positions(inputs)
    tok_logits = out.logits[rows, pos[:, :L]].float()
    logp = tok_logits.gather(-1, inputs["response_ids"][..., None]).squeeze(-1) - tok_logits.logsumexp(-1)
    return logp, self._state_values(out, rows, pos) if need_values else None


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_callback(device: str, result: dict):
    import gc

    import torch
    from transformers import TrainerCallback

    class Peak(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                result["base"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # the peak resident size restarts from the current one
                result["base"] = _rss_kb("VmRSS") * 1024

        def on_step_end(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                result["peak"] = torch.cuda.max_memory_allocated() - result["base"]
            else:
                result["peak"] = _rss_kb("VmHWM") * 1024 - result["base"]

    return Peak()


def measure(args, mode: str, batch: int) -> dict:
    """One training step's peak memory above the set-up (MiB), in this process."""
    import tempfile
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import Qwen2ForCausalLM

    from benchmarks.common import qwen2_config
    from llmdoctor_train.stage2.trainer import TFPOConfig, TFPOTrainer
    from llmdoctor_train.toy.models import build_tokenizer

    if mode == "before":
        TFPOTrainer._response_terms = gathered_response_terms
    shape = (args.hidden_size, args.layers, QWEN25_05B["num_attention_heads"], QWEN25_05B["num_key_value_heads"],
             QWEN25_05B["intermediate_size"], args.vocab_size)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen2_config(shape, tie_word_embeddings=True))
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
    return {"mode": mode, "batch_pairs": batch, "rows": 2 * batch, "peak_mib": result["peak"] / 2**20,
            "step_s": time.perf_counter() - t0,
            "logits_f32_mib": 2 * batch * (args.prompt_len + args.length) * args.vocab_size * 4 / 2**20}


def measure_logprobs(args, mode: str, batch: int) -> dict:
    """The log-prob computation alone, forward and backward, over given float32 logits (MiB above them)."""
    import gc

    import torch
    from trl.trainer.utils import selective_log_softmax

    n, t = 2 * batch, args.prompt_len + args.length
    logits = torch.randn(n, t, args.vocab_size, requires_grad=True, device=args.device)
    ids = torch.randint(0, args.vocab_size, (n, t), device=args.device)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kb("VmRSS") * 1024
    if mode == "before":  # the old path's operations, all positions as responses
        pos = torch.arange(t - 1, device=ids.device)[None].expand(n, -1)
        tok = logits[torch.arange(n, device=ids.device)[:, None], pos].float()
        logp = tok.gather(-1, ids[:, 1:, None]).squeeze(-1) - tok.logsumexp(-1)
    else:
        logp = selective_log_softmax(logits[:, :-1], ids[:, 1:])
    logp.sum().backward()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kb("VmHWM") * 1024 - base
    return {"mode": mode, "batch_pairs": batch, "rows": n, "peak_mib": peak / 2**20,
            "logits_f32_mib": logits.numel() * 4 / 2**20}


def estimated_gib(args, mode: str, batch: int) -> float:
    """A rough need (GiB): the set-up plus logits-sized tensors (measured: about 3 live at the peak
    after, 4 before; a margin on top)."""
    logits = 2 * batch * (args.prompt_len + args.length) * args.vocab_size * 4 / 2**30
    return 2.5 + logits * (4.5 if mode == "before" else 3.5)


def extrapolated(rows, batch: int) -> dict:
    """Per mode, a straight line through the measured peaks (they grow with the rows as the logits do),
    read at ``batch``: what a batch too large for this machine would take. Labelled as such."""
    import numpy as np

    out = {}
    for mode in ("before", "after"):
        pts = [(r["batch_pairs"], r["peak_mib"]) for r in rows if r["mode"] == mode and "peak_mib" in r]
        if len({b for b, _ in pts}) >= 2:
            slope, intercept = np.polyfit(*zip(*pts), 1)
            out[mode] = {"batch_pairs": batch, "peak_mib": float(intercept + slope * batch),
                         "per_pair_mib": float(slope), "from_batches": sorted({b for b, _ in pts})}
    return out


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


def run_all(args, argv) -> list[dict]:
    """Every (mode, batch) in its own process; too large ones are skipped and recorded."""
    rows = []
    for batch in args.batch_sizes:
        for mode in args.modes:
            need, free = estimated_gib(args, mode, batch), available_gib()
            if args.device == "cpu" and need > 0.8 * free:
                rows.append({"mode": mode, "batch_pairs": batch, "skipped": f"needs ~{need:.1f} GiB, {free:.1f} free"})
                print(rows[-1], flush=True)
                continue
            row = _child(argv, "step", mode, batch)
            if need < 0.8 * free:  # the log-prob part alone: the step's logits-sized share, isolated
                row["logprobs_only"] = _child(argv, "logprobs", mode, batch)
            rows.append(row)
            print(rows[-1], flush=True)
    return rows


def _child(argv, part: str, mode: str, batch: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed blocks leave the resident set
    out = subprocess.run([sys.executable, "-m", "benchmarks.tfpo_memory", *argv, "--one", part, mode, str(batch)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{part} {mode} batch {batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for mode, color in (("before", "#c55"), ("after", "#3a7")):
        pts = [(r["batch_pairs"], r["peak_mib"] / 1024) for r in rows if r["mode"] == mode and "peak_mib" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=f"step, {mode} selective_log_softmax")
        part = [(r["batch_pairs"], r["logprobs_only"]["peak_mib"] / 1024) for r in rows
                if r["mode"] == mode and "logprobs_only" in r]
        if part:
            ax.plot(*zip(*part), "s--", color=color, alpha=0.6, label=f"log-probs alone, {mode}")
    ax.set_xlabel("batch (preference pairs; rows = 2x)")
    ax.set_ylabel("peak step memory above set-up (GiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        part, mode, batch = args.one
        print(json.dumps((measure if part == "step" else measure_logprobs)(args, mode, int(batch))))
        return None
    from benchmarks.common import device_name, write_results

    argv = sys.argv[1:] if argv is None else list(argv)
    rows = run_all(args, argv)
    ratios = {}
    for b in args.batch_sizes:
        got = {r["mode"]: r["peak_mib"] for r in rows if r["batch_pairs"] == b and "peak_mib" in r}
        if len(got) == 2:
            ratios[b] = got["before"] / got["after"]
    payload = {"device": device_name(), "model": {**QWEN25_05B, "hidden_size": args.hidden_size,
                                                   "num_hidden_layers": args.layers, "vocab_size": args.vocab_size},
               "settings": {"L": args.length, "prompt_len": args.prompt_len, "lora_r": args.lora_r,
                            "gradient_checkpointing": not args.no_gradient_checkpointing, "dtype": "float32"},
               "rows": rows, "before_over_after": ratios}
    skipped = sorted({r["batch_pairs"] for r in rows if "skipped" in r})
    if skipped:
        payload["extrapolated"] = {b: extrapolated(rows, b) for b in skipped}
    path = write_results("tfpo_memory", payload, args.output_dir)
    plot(rows, path.with_suffix(".png"), f"TFPO step, Qwen2.5-0.5B-shaped doctor ({args.layers} layers), "
                                         f"L = {args.length}, {payload['device']}")
    print(f"before/after peak: {ratios}; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
