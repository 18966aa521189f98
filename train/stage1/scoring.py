"""Stage 1 shards: rows ``[i·N, (i+1)·N)`` of the data, checked up front, scored in one engine call each.

A shard on disk holds the expensive part only, the patient's log-probs of each response under
each distinct instruction (columns ``chosen_logp_<k>``/``rejected_logp_<k>``, ``k`` indexing
``meta.json``'s ``instructions``), plus the token ids. It is written to a temporary folder and
renamed into place, so a folder with ``meta.json`` is complete; a restarted run reuses it when
its rows and settings are unchanged. Rewards are computed from it afterwards (θ, ε and the
dimension names can change without rescoring).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from train.rewards_data import FIELDS, BadRowError, row_problem
from train.rewards_prompts import PromptFormatter


@dataclass
class ShardPlan:
    """One shard: its row range, the rows it keeps, and a hash of its rows (for restarts)."""

    index: int
    start: int
    stop: int
    rows: list[int] = field(default_factory=list)
    rows_hash: str = ""


def _rows(ds, start: int, stop: int) -> dict:
    return ds.select_columns(list(FIELDS))[start:stop]


def plan_shards(ds, formatter: PromptFormatter, instructions: list[str], shard_size: int,
                max_len: int | None) -> tuple[list[ShardPlan], list[tuple[int, str]]]:
    """Checks every row (fields, empty responses, length under every instruction) and cuts shards.

    Returns the shards and the bad rows as ``(row_index, reason)``; nothing is scored here.
    """
    plans, bad = [], []
    for i, start in enumerate(range(0, len(ds), shard_size)):
        stop = min(start + shard_size, len(ds))
        cols = _rows(ds, start, stop)
        shard_bad = {}
        for j, row in enumerate(zip(*(cols[f] for f in FIELDS))):
            if (why := row_problem(*row)) is not None:
                shard_bad[start + j] = why
        keep = [j for j in range(stop - start) if start + j not in shard_bad]
        if keep and max_len is not None:
            prompts = [cols["prompt"][j] for j in keep]
            longest_prompt = np.max([[len(x) for x in formatter.prompt_ids(prompts, ins)] for ins in instructions], 0)
            longest_resp = np.maximum(*(np.array([len(x) for x in formatter.response_ids([cols[f][j] for j in keep])])
                                        for f in ("chosen", "rejected")))
            total = longest_prompt + longest_resp
            for j, n in zip(keep, total):
                if n > max_len - 1:
                    shard_bad[start + j] = (f"{int(n)} tokens (prompt with the longest instruction + response) do not "
                                            f"fit the engine's max_model_len {max_len} (one position is left free)")
        rows = [start + j for j in range(stop - start) if start + j not in shard_bad]
        digest = hashlib.sha256(json.dumps([cols[f] for f in FIELDS] + [rows, start], default=str).encode())
        plans.append(ShardPlan(i, start, stop, rows, digest.hexdigest()))
        bad += sorted(shard_bad.items())
    return plans, bad


def shard_is_done(path: Path, plan: ShardPlan, settings: dict) -> bool:
    """True when ``path`` holds a complete shard of the same rows scored with the same settings."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("rows_hash") == plan.rows_hash and meta.get("settings") == settings


def _list_array(arrays: list, dtype) -> pa.ListArray:
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int32)]).astype(np.int32)
    values = np.concatenate([np.asarray(a) for a in arrays]) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype)))


def score_shard(ds, plan: ShardPlan, formatter: PromptFormatter, instructions: list[str], score) -> pa.Table:
    """Tokenises the shard's rows and scores every response under every instruction in one ``score`` call."""
    cols = _rows(ds, plan.start, plan.stop)
    pick = [r - plan.start for r in plan.rows]
    prompts = [cols["prompt"][j] for j in pick]
    resp = {f: formatter.response_ids([cols[f][j] for j in pick], f) for f in ("chosen", "rejected")}
    pairs = []
    for ins in instructions:
        p_ids = formatter.prompt_ids(prompts, ins)
        for f in ("chosen", "rejected"):
            pairs += zip(p_ids, resp[f])
    logps = score(pairs) if pairs else []
    n = len(pick)
    table = {  # [D] prompt_ids: the bare prompt, no instruction (what the doctor sees when serving)
        "row_index": pa.array(plan.rows, pa.int64()),
        "prompt_ids": _list_array(formatter.prompt_ids(prompts, None), np.int32),
        "chosen_ids": _list_array(resp["chosen"], np.int32),
        "rejected_ids": _list_array(resp["rejected"], np.int32),
    }
    for k in range(len(instructions)):
        for s, f in enumerate(("chosen", "rejected")):
            at = (2 * k + s) * n
            table[f"{f}_logp_{k}"] = _list_array(logps[at:at + n], np.float32)
    return pa.table(table)


def write_shard(path: Path, table: pa.Table, plan: ShardPlan, settings: dict) -> None:
    """Saves the shard (``save_to_disk``) with its ``meta.json`` into a temp folder, then renames it in place."""
    from datasets import Dataset

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset(table).save_to_disk(str(tmp))
    meta = {"rows_hash": plan.rows_hash, "settings": settings, "start": plan.start, "stop": plan.stop,
            "rows": len(plan.rows)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def raise_or_skip(bad: list[tuple[int, str]], skip: bool) -> None:
    """Raises :class:`BadRowError` for bad rows unless skipping was asked for."""
    if bad and not skip:
        raise BadRowError(bad)
