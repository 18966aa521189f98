"""Preference pairs for the positive-sentiment task, sampled from the patient itself.

For every training prompt the patient (in vLLM, through its chat template) samples several short
replies at temperature 1; VADER ranks them, and the best and the worst become a pair when their
scores differ by at least ``--min-gap``. Replies that ended on their own are preferred over replies
cut at the token limit. The output is TRL's conversational preference format, one JSON line per pair:
``{"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}``,
which ``llmdoctor rewards --data`` reads as it is. Statistics go to ``OUTPUT.summary.json``.

    python -m llmdoctor_train.real.pairs --output pairs.jsonl          # the patient: `llmdoctor smollm2`
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from llmdoctor_train.real import engine
from llmdoctor_train.real.sentiment import POSITIVE, vader

SEED = 0


def sample_replies(llm, prompts: list[str], n: int, max_tokens: int = engine.MAX_TOKENS,
                   seed: int = SEED) -> tuple[list[list[str]], list[list[bool]]]:
    """``n`` replies per prompt at temperature 1 through the chat template, and whether each ended on its own.

    Prompt ``i`` samples with seed ``seed + 1000 i`` (vLLM seeds its ``n`` samples from there)."""
    from vllm import SamplingParams

    params = [SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=seed + 1000 * i)
              for i in range(len(prompts))]
    outs = llm.chat([engine.conversation(p) for p in prompts], params, use_tqdm=True)
    texts = [[c.text.strip() for c in o.outputs] for o in outs]
    done = [[c.finish_reason == "stop" for c in o.outputs] for o in outs]
    return texts, done


def make_pairs(prompts: list[str], replies: list[list[str]], done: list[list[bool]],
               min_gap: float) -> tuple[list[dict], dict]:
    """Best vs worst reply by VADER per prompt (among the replies that ended, when two or more did), kept
    when their gap is at least ``min_gap``; returns the pairs and their statistics."""
    pairs, chosen, rejected, all_scores = [], [], [], []
    for prompt, texts, ended in zip(prompts, replies, done):
        scores = vader(texts)
        all_scores.append(scores)
        keep = np.flatnonzero(ended) if sum(ended) >= 2 else np.arange(len(texts))
        keep = keep[[bool(texts[k]) for k in keep]]
        if len(keep) < 2:
            continue
        best, worst = keep[np.argmax(scores[keep])], keep[np.argmin(scores[keep])]
        if scores[best] - scores[worst] < min_gap:
            continue
        pairs.append({"prompt": engine.conversation(prompt),
                      "chosen": [{"role": "assistant", "content": texts[best]}],
                      "rejected": [{"role": "assistant", "content": texts[worst]}]})
        chosen.append(scores[best])
        rejected.append(scores[worst])
    flat = np.concatenate(all_scores) if all_scores else np.zeros(0)
    stats = {"prompts": len(prompts), "samples_per_prompt": len(replies[0]) if replies else 0, "pairs": len(pairs),
             "min_gap": min_gap, "replies_ended": float(np.mean([e for d in done for e in d])) if done else 0.0,
             "sample_vader_mean": float(flat.mean()) if flat.size else 0.0,
             "sample_share_positive": float((flat >= POSITIVE).mean()) if flat.size else 0.0,
             "chosen_vader_mean": float(np.mean(chosen)) if chosen else 0.0,
             "rejected_vader_mean": float(np.mean(rejected)) if rejected else 0.0}
    return pairs, stats


def build_pairs(patient: str, output: str | Path, *, samples: int = 8, min_gap: float = 0.5,
                max_tokens: int = engine.MAX_TOKENS, n_prompts: int | None = None, llm=None) -> dict:
    """Samples, ranks and writes the pairs of the training prompts to ``output`` (JSON lines) and their
    statistics to ``output.summary.json``; returns the statistics."""
    from llmdoctor_train.real.prompts import train_prompts

    prompts = train_prompts()[:n_prompts]
    t0 = time.perf_counter()
    if llm is None:
        from vllm import LLM

        engine.in_process()
        llm = LLM(model=str(patient), **engine.engine_kwargs())
    replies, done = sample_replies(llm, prompts, samples, max_tokens)
    pairs, stats = make_pairs(prompts, replies, done, min_gap)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    stats |= {"max_tokens": max_tokens, "seconds": round(time.perf_counter() - t0, 1)}
    Path(f"{output}.summary.json").write_text(json.dumps(stats, indent=1))
    return stats


def main(argv=None) -> None:
    """``python -m llmdoctor_train.real.pairs`` (also ``llmdoctor pairs``)."""
    p = argparse.ArgumentParser(prog="llmdoctor pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="the pairs file to write (JSON lines)")
    p.add_argument("--patient", help="the patient model folder (default: SmolLM2-135M-Instruct from `llmdoctor smollm2`)")
    p.add_argument("--samples", type=int, default=8, help="replies sampled per prompt (default: 8)")
    p.add_argument("--min-gap", type=float, default=0.5, help="least VADER gap between chosen and rejected (default: 0.5)")
    p.add_argument("--max-tokens", type=int, default=engine.MAX_TOKENS,
                   help=f"longest reply in tokens (default: {engine.MAX_TOKENS})")
    p.add_argument("--prompts", type=int, help="use only the first N training prompts (default: all 300)")
    args = p.parse_args(argv)
    patient = args.patient
    if patient is None:
        from llmdoctor_train.real.smollm2 import MissingModelError, smollm2_path

        try:
            patient = str(smollm2_path())
        except MissingModelError as e:
            raise SystemExit(str(e)) from None
    stats = build_pairs(patient, args.output, samples=args.samples, min_gap=args.min_gap,
                        max_tokens=args.max_tokens, n_prompts=args.prompts)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
