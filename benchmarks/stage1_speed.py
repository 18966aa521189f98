"""Stage 1 scoring speed: the vLLM pipeline against the transformers reference scorer, same data, same run.

A toy preference dataset (prompts and replies of ``llmdoctor_train.toy.world``: chosen replies
written under the positive mix, rejected under the negative) is turned into the pairs Stage 1
scores: every response under the positive and the negative instruction (4 sequences a row),
as ``llmdoctor_train.stage1.scoring.score_shard`` builds them. The same pairs are then scored by

- ``hf_reference``: ``llmdoctor_train.stage1.scoring.score_with_hf``, the tests' reference (transformers,
  one sequence per forward pass);
- ``hf_batched``: transformers with padded batches (length-sorted): a stronger baseline, to
  see how much of vLLM's lead is batching alone;
- ``vllm``: ``score_with_vllm``, one ``generate`` call with prompt log-probs;
- ``vllm_pipeline``: the whole ``compute_rewards`` (checks, tokenising, scoring in shards,
  rewards, ``save_to_disk``) on the same dataset with the same engine.

Throughput counts every token the model reads (prompt with instruction + response, the cost
driver) and, separately, the response tokens that get a reward. The transformers scorers run
first, before the in-process vLLM engine exists (its CPU thread binding would slow plain
PyTorch afterwards). Also reported: the largest |log-prob| difference between vLLM and the
reference (they must agree). By default each scorer gets one CPU core (``--threads``), so a
busy shared machine hurts neither more. The patient is a random-init Qwen2 built here (hidden
256, 4 layers; speed needs no trained weights), or any local HF model with ``--model``.

    python -m benchmarks.stage1_speed                           # CPU, a few minutes
    python -m benchmarks.stage1_speed --rows 8 --repeats 1 --warmup 1   # a quick look
    python -m benchmarks.stage1_speed --model /path/to/Qwen2.5-0.5B-Instruct --rows 256   # a real patient
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: starts in seconds

from benchmarks.common import RESULTS, save_figure  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stage1_speed.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--rows", type=int, default=128, help="preference rows; each is 4 scored sequences (128)")
    d.add_argument("--reply-parts", type=int, default=3,
                   help="toy replies (1-3 sentences each) joined into one response: longer responses (3)")
    d.add_argument("--seed", type=int, default=0, help="data seed (0)")
    m = p.add_argument_group("patient")
    m.add_argument("--model", help="a local HF causal-LM folder (default: a random-init patient built here)")
    m.add_argument("--hidden-size", type=int, default=256,
                   help="width of the built patient; heads of 64 (vLLM's CPU kernels need head_dim 64) (256)")
    m.add_argument("--layers", type=int, default=4, help="layers of the built patient (4)")
    m.add_argument("--workdir", help="where to build the patient and write pipeline outputs (default: temp dir)")
    r = p.add_argument_group("run")
    r.add_argument("--repeats", type=int, default=5, help="timed rounds per scorer; medians are reported (5)")
    r.add_argument("--warmup", type=int, default=2,
                   help="untimed rounds first (vLLM on CPU takes a few calls to reach its speed) (2)")
    r.add_argument("--hf-batch-size", type=int, default=16, help="batch of the hf_batched scorer; 0 skips it (16)")
    r.add_argument("--threads", type=int, default=1,
                   help="CPU cores for each scorer: torch threads for transformers, and vLLM's OpenMP threads "
                        "bound to cores 0..N-1 (VLLM_CPU_OMP_THREADS_BIND, unless set); 0 leaves both to their "
                        "defaults. 1 keeps timings steady on a small shared CPU (1)")
    r.add_argument("--max-model-len", type=int, default=1024, help="vLLM context length (1024)")
    r.add_argument("--max-num-seqs", type=int, default=128, help="vLLM max_num_seqs (128)")
    r.add_argument("--kv-cache-mb", type=int, default=256, help="vLLM kv_cache_memory_bytes in MiB (256)")
    r.add_argument("--shard-size", type=int, default=500, help="rows per shard in the pipeline (500)")
    p.add_argument("--output-dir", default=str(RESULTS), help="where stage1_speed.json/.png go (benchmarks/results)")
    p.add_argument("--name", default="stage1_speed", help="file name stem of the results (stage1_speed)")
    return p.parse_args(argv)


def build_patient(path: Path, hidden_size: int, layers: int) -> str:
    """A random-init Qwen2 patient on a BPE trained on the toy world's text (instructions included)."""
    from llmdoctor_train.toy.models import build_tiny_lm, build_tokenizer, save_lm
    from llmdoctor_train.toy.world import toy_world_corpus

    if hidden_size % 64:
        raise SystemExit(f"--hidden-size {hidden_size}: use a multiple of 64 (heads of 64)")
    tok = build_tokenizer([r["text"] for r in toy_world_corpus(3000, seed=0)], vocab_size=1024)
    heads = hidden_size // 64
    model = build_tiny_lm(tok, hidden_size=hidden_size, num_layers=layers, num_heads=heads,
                          num_kv_heads=max(1, heads // 2), vocab_pad_to=64, seed=0)
    return save_lm(model, tok, path)


def toy_preferences(n: int, parts: int, seed: int):
    """``n`` rows of toy-world text: a user request, a positive-mix reply (chosen), a negative-mix one."""
    import random

    from datasets import Dataset

    from llmdoctor_train.toy import world as tw

    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        prompt, subj = tw.sample_prompt(rng)
        rows["prompt"].append(prompt)
        for col, cond in (("chosen", "pos"), ("rejected", "neg")):  # " ": the reply follows "Assistant:"
            rows[col].append(" " + " ".join(tw.sample_reply(rng, subj, cond) for _ in range(parts)))
    return Dataset.from_dict(rows)


def stage1_pairs(ds, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The (prompt ids, response ids) pairs Stage 1 scores, in ``score_shard``'s order."""
    from llmdoctor_train.stage1.rewards import Dimension, unique_instructions
    from llmdoctor_train.stage1.data import PromptFormatter

    f = PromptFormatter(tokenizer)
    resp = {side: f.response_ids(ds[side], side) for side in ("chosen", "rejected")}
    pairs = []
    for ins in unique_instructions([Dimension("default")]):
        p_ids = f.prompt_ids(ds["prompt"], ins)
        for side in ("chosen", "rejected"):
            pairs += zip(p_ids, resp[side])
    return pairs


def score_hf_batched(model, pairs, batch_size: int):
    """Teacher-forced response log-probs with transformers, padded batches of similar length."""
    import numpy as np
    import torch

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [None] * len(pairs)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            seqs = [[*pairs[i][0], *pairs[i][1]] for i in idx]
            T = max(map(len, seqs))
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            att = torch.zeros(len(seqs), T, dtype=torch.long)
            for j, x in enumerate(seqs):  # right padding: positions of real tokens are unchanged
                ids[j, :len(x)] = torch.tensor(x)
                att[j, :len(x)] = 1
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0].double().numpy()
            for j, i in enumerate(idx):
                n_p, n_r = len(pairs[i][0]), len(pairs[i][1])
                out[i] = lp[j, n_p - 1:n_p - 1 + n_r]
    return [np.asarray(x) for x in out]


def _timed(fn, repeats: int, warmup: int) -> tuple[list[float], object]:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns the timings and the last result."""
    for _ in range(warmup):
        fn()
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t)
    return times, res


def time_hf(patient: str, pairs, args) -> tuple[dict, list]:
    """Times the transformers scorers (before any vLLM engine exists in this process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmdoctor_train.stage1.scoring import score_with_hf

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(patient, dtype=torch.float32).eval()
    times = {}
    times["hf_reference"], ref = _timed(lambda: score_with_hf(model, pairs), args.repeats, args.warmup)
    print(f"hf_reference: {statistics.median(times['hf_reference']):.2f} s", flush=True)
    if args.hf_batch_size:
        times["hf_batched"], _ = _timed(lambda: score_hf_batched(model, pairs, args.hf_batch_size), args.repeats,
                                        args.warmup)
        print(f"hf_batched: {statistics.median(times['hf_batched']):.2f} s", flush=True)
    return times, ref


def time_vllm(patient: str, ds, pairs, work: Path, args) -> tuple[dict, list]:
    """Times ``score_with_vllm`` and the whole ``compute_rewards`` with one in-process engine."""
    from vllm import LLM

    from llmdoctor_train.stage1.pipeline import RewardsConfig, compute_rewards
    from llmdoctor_train.stage1.scoring import score_with_vllm
    from llmdoctor_train.toy.pipeline import engine_kwargs

    llm = LLM(model=patient, **engine_kwargs(kv_cache_memory_bytes=args.kv_cache_mb << 20,
                                             max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs))
    times = {}
    times["vllm"], got = _timed(lambda: score_with_vllm(llm, pairs), args.repeats, args.warmup)
    print(f"vllm: {statistics.median(times['vllm']):.2f} s", flush=True)
    runs = iter(range(args.repeats + args.warmup))
    config = RewardsConfig(shard_size=args.shard_size)
    times["vllm_pipeline"], summary = _timed(
        lambda: compute_rewards(ds, patient, work / f"rewards_{next(runs)}", config, llm=llm, progress=False),
        args.repeats, args.warmup)
    print(f"vllm_pipeline: {statistics.median(times['vllm_pipeline']):.2f} s", flush=True)
    if summary["rows"] != len(ds):
        raise RuntimeError(f"the pipeline kept {summary['rows']} of {len(ds)} rows: {summary['skipped'][:3]}")
    return times, got


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    names = [r["scorer"] for r in rows]
    bars = ax.bar(names, [r["tokens_per_s"] for r in rows], color=["#888", "#aaa", "#2a7", "#4b9"][:len(rows)])
    for b, r in zip(bars, rows):
        ax.annotate(f"{r['tokens_per_s']:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                    va="bottom", fontsize=9)
    ax.set_ylabel("tokens/s read (prompt + response)")
    s = result["data"]
    cores = result["settings"]["threads"]
    ax.set_title(f"Stage 1 scoring, {s['sequences']} sequences, {result['patient']['params'] / 1e6:.0f}M patient, "
                 f"{result['machine']['device']}" + (f", {cores} core(s) each" if cores else ""), fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    """Runs the benchmark; writes ``<output-dir>/<name>.json`` and ``.png``; returns the result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoTokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-stage1-"))
    work.mkdir(parents=True, exist_ok=True)
    patient = args.model or build_patient(work / "patient", args.hidden_size, args.layers)
    tok = AutoTokenizer.from_pretrained(patient)
    ds = toy_preferences(args.rows, args.reply_parts, args.seed)
    pairs = stage1_pairs(ds, tok)
    n_tokens = sum(len(p) + len(r) for p, r in pairs)
    n_resp = sum(len(r) for _, r in pairs)
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.threads and not torch.cuda.is_available():  # the same cores for both scorers
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")

    times, ref = time_hf(patient, pairs, args)
    hf_threads = torch.get_num_threads()
    vtimes, got = time_vllm(patient, ds, pairs, work, args)
    times.update(vtimes)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, ref))

    rows, ratios = _speeds(times, n_tokens, n_resp, len(pairs))
    cfg = AutoConfig.from_pretrained(patient)
    result = {
        "machine": _machine(hf_threads, load0),
        "patient": {"source": args.model or "random-init Qwen2 built here (BPE trained on toy-world text)",
                    "params": _n_params(cfg), "hidden_size": cfg.hidden_size,
                    "layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size, "dtype": "float32"},
        "data": {"rows": len(ds), "sequences": len(pairs), "tokens": n_tokens, "response_tokens": n_resp,
                 "mean_prompt_tokens": (n_tokens - n_resp) / len(pairs), "mean_response_tokens": n_resp / len(pairs),
                 "source": "toy world prompts; chosen = positive-mix replies, rejected = negative-mix replies"},
        "settings": {k: getattr(args, k) for k in ("threads", "repeats", "warmup", "hf_batch_size", "max_model_len", "max_num_seqs",
                                                   "kv_cache_mb", "shard_size")},
        "rows": rows, "ratios": ratios, "max_abs_logprob_diff_vllm_vs_hf": diff,
        "caveats": ["CPU machine shared with other jobs: absolute numbers are noisy; the scorers run one after "
                    "another (transformers first, then vLLM), medians of the repeats",
                    "vllm_pipeline includes the pipeline's own work (row checks, tokenising, rewards, "
                    "save_to_disk), not only scoring"],
    }
    from benchmarks.common import command_line, write_results

    path = write_results(args.name, result, args.output_dir, command_line(__file__, argv))
    plot(result, path.with_suffix(".png"))
    for r in rows:
        print(f"{r['scorer']:>14}: {r['tokens_per_s']:9.0f} tokens/s ({r['response_tokens_per_s']:8.0f} response "
              f"tokens/s), {r['seconds']:.2f} s")
    print({k: round(v, 2) for k, v in ratios.items()}, f"max |logp diff| {diff:.1e}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return result


def _speeds(times: dict, n_tokens: int, n_resp: int, n_seq: int) -> tuple[list[dict], dict]:
    """One row per scorer (median seconds, tokens/s, ...) and the vLLM-over-transformers ratios."""
    rows = []
    for name, ts in times.items():
        sec = statistics.median(ts)
        rows.append({"scorer": name, "seconds": sec, "seconds_all": ts, "tokens_per_s": n_tokens / sec,
                     "response_tokens_per_s": n_resp / sec, "sequences_per_s": n_seq / sec})
    tps = {r["scorer"]: r["tokens_per_s"] for r in rows}
    ratios = {f"{a}_over_{b}": tps[a] / tps[b] for a in ("vllm", "vllm_pipeline")
              for b in ("hf_reference", "hf_batched") if b in tps}
    return rows, ratios


def _machine(hf_threads: int, load0) -> dict:
    """Where it ran: device, platform, threads, and the load average at the start and now."""
    import torch

    from benchmarks.common import device_name

    return {"device": device_name(), "platform": platform.platform(), "torch": torch.__version__,
            "hf_torch_threads": hf_threads,
            "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
            "cpu_count": os.cpu_count(), "load_average_at_start": load0,
            "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _n_params(cfg) -> int:
    """Parameter count of a causal LM from its config, without loading weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


if __name__ == "__main__":
    main()
