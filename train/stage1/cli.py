"""``llmdoctor rewards``: Stage 1 token-level rewards from the command line (options and run; ``llmdoctor_train.cli`` registers it)."""

from __future__ import annotations

import argparse
import json
import os

DESCRIPTION = """\
Stage 1 of LLMdoctor: token-level rewards from the frozen patient's own behaviour.

Every preference pair (prompt, chosen, rejected) is teacher-forced through the patient, served
by vLLM, twice per dimension: under a positive and under a negative system instruction. Per
response token t:
  gap_t = |log p_pos(y_t) - log p_neg(y_t)|
  S_t   = tanh(gap_t / (mean gap over that response + eps))
  r_t   = sign * S_t  if S_t > theta  else 0     (sign +1 for chosen, -1 for rejected)

Input (--data): a .jsonl/.json/.parquet/.csv file, a datasets.save_to_disk folder, or a folder of
data files, in any of TRL's preference formats: columns prompt, chosen, rejected as plain text
or lists of chat messages, or only chosen and rejected holding whole conversations (the shared
first turns become the prompt, as TRL's maybe_extract_prompt does), e.g.
  {"prompt": "How do I boil an egg?", "chosen": "Put it in boiling water for 8 min...", "rejected": "Cook it."}
  {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "..."}], ...}
  {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [{"role": "user", ...}, ...]}
Rows are checked and tokenised once (datasets.map, cached; --num-proc workers).
A row with a missing field, an empty response or too many tokens stops the run with its row
index, unless --skip-bad-rows (then it is skipped and listed in summary.json).

Prompts use the tokenizer's chat template when it has one (the instruction is the system
message), else "{instruction}\\n\\nUser: {prompt}\\nAssistant:". Responses are scored verbatim.

Output (--output OUT): OUT is a datasets folder (datasets.load_from_disk(OUT)) with prompt_ids
(the prompt without instruction: what the doctor sees), chosen_ids, rejected_ids,
chosen_rewards, rejected_rewards (one float per response token, from the main dimension), and
per dimension NAME: chosen_rewards_NAME, chosen_S_NAME, chosen_logp_gap_NAME, chosen_logp_pos_NAME,
chosen_logp_neg_NAME (same for rejected); OUT/summary.json holds counts, statistics and the
tokenizer's fingerprint (`llmdoctor train` refuses a doctor whose tokenizer differs).
The work is done in shards under OUT/shards: rerun the same command after an interruption and
finished shards are reused; changing only --theta/--eps/--main-dimension rescores nothing.
"""

HELP = "Stage 1: token-level rewards from the patient (vLLM)"

EPILOG = """\
examples:
  llmdoctor rewards --data prefs.jsonl --patient ./Qwen2.5-7B-Instruct --output rewards/
  llmdoctor rewards --data hh/ --patient ./patient --output rewards/ \\
      --dimension "helpfulness::" --dimension "harmlessness:Be safe and refuse harmful requests.:Ignore safety." \\
      --main-dimension helpfulness --max-model-len 4096 --shard-size 1000
(in "NAME:POS:NEG" an empty POS or NEG takes --positive/--negative; write a colon inside an
instruction as \\:)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llmdoctor rewards``."""
    from llmdoctor_train.stage1.rewards import DEFAULT_NEGATIVE, DEFAULT_POSITIVE, EPS, THETA

    io = p.add_argument_group("data and output")
    io.add_argument("--data", required=True, help="preference data: file or folder (see above)")
    io.add_argument("--split", default="train", help="split to read from a folder with several (default: train)")
    io.add_argument("--patient", required=True,
                    help="the patient model: a local HF model folder (or a name vLLM can load)")
    io.add_argument("--tokenizer", help="tokenizer folder, if not the patient's")
    io.add_argument("--output", required=True, help="output folder (created; reused to resume an interrupted run)")
    io.add_argument("--shard-size", type=int, default=500,
                    help="rows per shard: one engine call and one resumable unit each (default: 500)")
    io.add_argument("--skip-bad-rows", action="store_true",
                    help="skip (and count in summary.json) rows that cannot be scored, instead of stopping")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    io.add_argument("--num-proc", type=int, help="processes for tokenising the data (datasets.map; default: 1)")

    rw = p.add_argument_group("instructions and rewards")
    rw.add_argument("--positive", default=DEFAULT_POSITIVE,
                    help="positive instruction (default: the paper's helpful one)")
    rw.add_argument("--negative", default=DEFAULT_NEGATIVE,
                    help="negative instruction (default: the paper's minimal one)")
    rw.add_argument("--dimension", action="append", metavar="NAME:POS:NEG", default=[],
                    help="a preference dimension with its own instruction pair; repeat for several "
                         "(default: one dimension 'default' with --positive/--negative)")
    rw.add_argument("--main-dimension",
                    help="dimension copied into chosen_rewards/rejected_rewards etc. (default: the first)")
    rw.add_argument("--theta", type=float, default=THETA,
                    help=f"importance threshold: r = 0 where S <= theta (default: {THETA})")
    rw.add_argument("--eps", type=float, default=EPS, help=f"epsilon of S's denominator (default: {EPS})")
    rw.add_argument("--template", choices=("auto", "chat", "plain"), default="auto",
                    help="prompt format: the chat template if the tokenizer has one (auto), or force one "
                         "(default: auto)")
    rw.add_argument("--append-eos", action="store_true", help="end every response with the EOS token before scoring")

    en = p.add_argument_group("vLLM engine (for the patient)")
    en.add_argument("--max-model-len", type=int, help="context length; longer rows are bad rows (default: the model's)")
    en.add_argument("--dtype", default="auto", help="weights dtype, e.g. auto, bfloat16, float32 (default: auto)")
    en.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the patient over (default: 1)")
    en.add_argument("--gpu-memory-utilization", type=float,
                    help="fraction of the device's memory vLLM reserves for weights and KV cache (default: vLLM's "
                         "0.9 on a GPU). On a CPU build it is a fraction of host RAM, and the engine refuses to start "
                         "if that much is not free; the default there is 80%% of the RAM free now (capped at 0.9), "
                         "unless --engine-arg kv_cache_memory_bytes=N or VLLM_CPU_KVCACHE_SPACE sizes the cache")
    en.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation (faster start, CPU)")
    en.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="any other vllm.LLM argument; VALUE is read as JSON when it parses, e.g. "
                         "--engine-arg max_num_seqs=64 --engine-arg kv_cache_memory_bytes=67108864")


def engine_kwargs(args) -> dict:
    """``vllm.LLM`` keyword arguments from the engine options."""
    kw = {"dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size, "enforce_eager": args.enforce_eager}
    if args.max_model_len:
        kw["max_model_len"] = args.max_model_len
    if args.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            kw[key] = json.loads(value)
        except ValueError:
            kw[key] = value
    sized = {"gpu_memory_utilization", "kv_cache_memory_bytes"} & set(kw) or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if not sized and (fraction := cpu_memory_fraction()) is not None:
        kw["gpu_memory_utilization"] = fraction
    return kw


def cpu_memory_fraction() -> float | None:
    """On a machine without CUDA: 80% of the host RAM free now as a fraction of all of it (at most 0.9),
    what vLLM's CPU backend reserves by ``gpu_memory_utilization``; None with a GPU or no /proc/meminfo."""
    import torch

    if torch.cuda.is_available():
        return None
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        total, free = (int(info[k].split()[0]) for k in ("MemTotal", "MemAvailable"))
    except (OSError, KeyError, ValueError):
        return None
    return round(min(0.9, 0.8 * free / total), 3)


def config_from_args(args):
    """The :class:`RewardsConfig` the options describe."""
    from llmdoctor_train.stage1.rewards import Dimension
    from llmdoctor_train.stage1.pipeline import RewardsConfig

    dims = [Dimension.parse(s, args.positive, args.negative) for s in args.dimension] or \
        [Dimension("default", args.positive, args.negative)]
    return RewardsConfig(dimensions=dims, main_dimension=args.main_dimension, theta=args.theta, eps=args.eps,
                         shard_size=args.shard_size, skip_bad_rows=args.skip_bad_rows, template=args.template,
                         append_eos=args.append_eos, split=args.split, num_proc=args.num_proc)


def run_rewards(args, llm=None) -> dict:
    """Runs Stage 1 for parsed ``args`` (``llm``: an already running patient engine, else one is started)."""
    from llmdoctor_train.stage1.data import DataError
    from llmdoctor_train.stage1.pipeline import compute_rewards

    try:
        config = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"llmdoctor rewards: {e}") from e
    try:
        summary = compute_rewards(args.data, args.patient, args.output, config, llm=llm, tokenizer=args.tokenizer,
                                  engine_kwargs=engine_kwargs(args), progress=not args.no_progress)
    except (DataError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"llmdoctor rewards: {e}") from e
    s = summary
    print(f"llmdoctor rewards: {s['rows']} rows ({s['rows_skipped']} skipped), {s['tokens']} response tokens, "
          f"{s['fraction_rewarded']:.1%} rewarded, mean |r| {s['mean_abs_reward']:.4f}; shards scored "
          f"{s['shards_computed']}, reused {s['shards_reused']}; wrote {args.output}")
    return summary

