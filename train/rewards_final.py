"""Stage 1 finish: shards of log-probs → the token-reward dataset (``save_to_disk``) and ``summary.json``.

Columns of the output dataset, one row per kept input row, lists are per response token:

- ``row_index`` (the input row), ``prompt_ids`` (the bare prompt, no instruction: what the
  doctor sees), ``chosen_ids``, ``rejected_ids``;
- per dimension ``<d>``, for ``chosen`` and ``rejected``: ``{side}_rewards_<d>``, ``{side}_S_<d>``,
  ``{side}_delta_<d>``, ``{side}_logp_pos_<d>``, ``{side}_logp_neg_<d>``;
- ``chosen_rewards``, ``rejected_rewards``, ``chosen_S``, ``rejected_S``, ``chosen_delta``,
  ``rejected_delta``: copies of the main dimension's columns (the first unless chosen).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from train.rewards import ragged_token_rewards, unique_instructions

SIDES = (("chosen", 1.0), ("rejected", -1.0))


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.float32)))


def reward_columns(table: pa.Table, config) -> pa.Table:
    """Adds the reward columns of every dimension to a shard table of log-probs (vectorised per column)."""
    index = {ins: k for k, ins in enumerate(unique_instructions(config.dimensions))}
    cols = {c: table.column(c) for c in ("row_index", "prompt_ids", "chosen_ids", "rejected_ids")}
    per_dim = {}
    for d in config.dimensions:
        for side, sign in SIDES:
            pos = table.column(f"{side}_logp_{index[d.positive]}").combine_chunks()
            neg = table.column(f"{side}_logp_{index[d.negative]}").combine_chunks()
            offsets = pos.offsets.to_numpy().astype(np.int64)
            offsets = offsets - offsets[0]
            lp, ln = pos.flatten().to_numpy(), neg.flatten().to_numpy()
            tr = ragged_token_rewards(lp, ln, offsets, np.full(len(pos), sign), config.theta, config.eps)
            per_dim[f"{side}_rewards_{d.name}"] = _list(offsets, tr.rewards)
            per_dim[f"{side}_S_{d.name}"] = _list(offsets, tr.S)
            per_dim[f"{side}_delta_{d.name}"] = _list(offsets, tr.delta)
            per_dim[f"{side}_logp_pos_{d.name}"] = _list(offsets, lp)
            per_dim[f"{side}_logp_neg_{d.name}"] = _list(offsets, ln)
    for kind in ("rewards", "S", "delta"):
        for side, _ in SIDES:
            cols[f"{side}_{kind}"] = per_dim[f"{side}_{kind}_{config.main_dimension}"]
    return pa.table(cols | per_dim)


def _sums(ds, column: str) -> np.ndarray:
    """[tokens, rewarded tokens, Σ|r|, Σr] of a reward column, one arrow chunk at a time."""
    total = np.zeros(4)
    for chunk in ds.data.column(column).chunks:
        r = chunk.flatten().to_numpy().astype(np.float64)
        total += [r.size, np.count_nonzero(r), np.abs(r).sum(), r.sum()]
    return total


def _ratios(sums: np.ndarray) -> dict:
    n = max(sums[0], 1)
    return {"tokens": int(sums[0]), "fraction_rewarded": sums[1] / n, "mean_abs_reward": sums[2] / n,
            "mean_reward": sums[3] / n}


def _stats(ds, dims) -> dict:
    """Token counts, fraction of rewarded tokens and mean |r| (and mean r) per dimension and side."""
    out = {}
    for d in dims:
        by_side = {side: _sums(ds, f"{side}_rewards_{d.name}") for side, _ in SIDES}
        out[d.name] = {"positive": d.positive, "negative": d.negative, **_ratios(sum(by_side.values())),
                       **{side: _ratios(v) for side, v in by_side.items()}}
    return out


def finalise(out: Path, shard_paths: list[Path], config, run: dict, rows_in: int, bad: list) -> dict:
    """Writes the dataset into ``out`` and ``out/summary.json``; returns the summary."""
    from datasets import concatenate_datasets, load_from_disk

    shards = [load_from_disk(str(p)) for p in shard_paths]
    ds = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    cache = out / "shards" / "final.arrow"
    final = ds.with_format("arrow").map(
        reward_columns, fn_kwargs={"config": config}, batched=True, batch_size=max(config.shard_size, 1),
        remove_columns=ds.column_names, cache_file_name=str(cache), load_from_cache_file=False,
        new_fingerprint=f"rewards-{run['shards']}-{len(ds)}", desc="rewards")
    final = final.with_format(None)
    final.save_to_disk(str(out))
    stats = _stats(final, config.dimensions)
    main = stats[config.main_dimension]
    summary = {
        "rows": len(final), "rows_in_data": rows_in, "rows_skipped": len(bad),
        "skipped": [{"row": i, "reason": why} for i, why in bad[:1000]],
        "tokens": main["tokens"], "tokens_chosen": main["chosen"]["tokens"],
        "tokens_rejected": main["rejected"]["tokens"], "fraction_rewarded": main["fraction_rewarded"],
        "mean_abs_reward": main["mean_abs_reward"], "main_dimension": config.main_dimension,
        "theta": config.theta, "eps": config.eps, "dimensions": stats, **run,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    del final, ds, shards
    cache.unlink(missing_ok=True)
    return summary
