"""Stage 1 scoring: teacher-forced log-probs of responses under the patient, and the shards they are kept in.

The scorers take ``pairs`` of ``(prompt_ids, response_ids)`` and return, per pair, a float64
array ``log π(response_t | prompt, response_<t)`` with one entry per response token: vLLM (the
pipeline) and transformers (the reference).

Shards are rows ``[i·N, (i+1)·N)`` of the data, tokenised and checked up front
(``stage1.tokens``), scored in one engine call each. A shard on disk holds the expensive part only, the patient's log-probs of each response
under each distinct instruction (columns ``chosen_logp_<k>``/``rejected_logp_<k>``, ``k``
indexing ``meta.json``'s ``instructions``), plus the token ids. It is written to a temporary
folder and renamed into place, so a folder with ``meta.json`` is complete; a restarted run
reuses it when its rows and settings are unchanged. Rewards are computed from it afterwards
(θ, ε and the dimension names can change without rescoring).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmdoctor_train.stage1.data import BadRowError


Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


def build_engine(patient: str, **engine_kwargs):
    """An offline ``vllm.LLM`` serving the patient (``engine_kwargs`` go to ``LLM`` as given)."""
    from vllm import LLM

    return LLM(model=patient, **engine_kwargs)


def engine_max_len(llm) -> int:
    """The engine's context length (prompt + response must fit)."""
    return int(llm.llm_engine.model_config.max_model_len)


def score_with_vllm(llm, pairs: Pairs, *, use_tqdm: bool = False) -> list[np.ndarray]:
    """Scores all ``pairs`` in one ``generate`` call from the engine's prompt log-probs.

    ``SamplingParams(max_tokens=1, prompt_logprobs=0)`` returns, for every prompt position but
    the first, the log-prob of the actual prompt token; the response's are the last
    ``len(response)`` of them. Prompt log-probs are log-softmax of the raw logits whatever the
    engine's ``logprobs_mode`` (unless it asks for logits, refused here), and requests asking
    for them skip reading the prefix cache, so every position is computed.
    """
    from vllm import SamplingParams, TokensPrompt

    mode = getattr(llm.llm_engine.model_config, "logprobs_mode", "raw_logprobs")
    if "logits" in str(mode):
        raise ValueError(f"engine logprobs_mode={mode!r} returns logits; Stage 1 needs log-probs")
    if not pairs:
        return []
    if any(len(p) == 0 or len(r) == 0 for p, r in pairs):
        raise ValueError("every pair needs prompt and response tokens (an empty prompt leaves y_1 unscored)")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=[*p, *r]) for p, r in pairs]
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    return [_response_logprobs(o.prompt_logprobs, p, r) for (p, r), o in zip(pairs, outs)]


def _response_logprobs(plp, prompt, response) -> np.ndarray:
    """The response tokens' entries of one request's prompt log-probs (flat or list-of-dicts form)."""
    n_p, n_r = len(prompt), len(response)
    if hasattr(plp, "start_indices"):  # FlatLogprobs: one entry per position after the first
        if len(plp.logprobs) != n_p + n_r - 1:
            raise RuntimeError(f"vLLM returned {len(plp.logprobs)} prompt log-probs for {n_p + n_r} tokens")
        ids = np.asarray(plp.token_ids[n_p - 1:])
        out = np.asarray(plp.logprobs[n_p - 1:], dtype=np.float64)
    else:  # list: None for the first position, then {token_id: Logprob}
        ids = np.asarray(list(response))
        out = np.asarray([d[t].logprob for d, t in zip(plp[n_p:], response)], dtype=np.float64)
    if ids.shape != (n_r,) or (ids != np.asarray(response)).any():
        raise RuntimeError("vLLM's prompt log-probs are not for the response tokens sent")
    return out


def score_with_hf(model, pairs: Pairs, *, device=None) -> list[np.ndarray]:
    """Reference scorer with a transformers causal LM, one sequence per forward pass (tests, small runs)."""
    import torch

    device = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for p, r in pairs:
            ids = torch.tensor([[*p, *r]], device=device)
            logits = model(ids).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None])[:, 0]
            out.append(lp.double().cpu().numpy())
    return out


@dataclass
class ShardPlan:
    """One shard: its row range, the rows it keeps, and a hash of its rows (for restarts)."""

    index: int
    start: int
    stop: int
    rows: list[int] = field(default_factory=list)
    rows_hash: str = ""


def _lengths(cols: dict, name: str) -> np.ndarray:
    return np.array([len(x) for x in cols[name]], dtype=np.int64)


def plan_shards(tokens, n_instructions: int, shard_size: int,
                max_len: int | None) -> tuple[list[ShardPlan], list[tuple[int, str]]]:
    """Cuts shards of the tokenised rows (``stage1.tokens``) and lists the bad ones: a problem found
    while tokenising, or too many tokens under some instruction for ``max_len``.

    Returns the shards and the bad rows as ``(row_index, reason)``; nothing is scored here.
    """
    plans, bad = [], []
    id_cols = [f"prompt_ids_{k}" for k in range(n_instructions)] + ["chosen_ids", "rejected_ids"]
    for i, start in enumerate(range(0, len(tokens), shard_size)):
        stop = min(start + shard_size, len(tokens))
        cols = tokens.select_columns(["problem", *id_cols])[start:stop]
        shard_bad = {start + j: why for j, why in enumerate(cols["problem"]) if why}
        if max_len is not None:
            longest_prompt = np.max([_lengths(cols, c) for c in id_cols[:-2]], axis=0)
            total = longest_prompt + np.maximum(_lengths(cols, "chosen_ids"), _lengths(cols, "rejected_ids"))
            for j, n in enumerate(total):
                if start + j not in shard_bad and n > max_len - 1:
                    shard_bad[start + j] = (f"{int(n)} tokens (prompt with the longest instruction + response) do not "
                                            f"fit the engine's max_model_len {max_len} (one position is left free)")
        rows = [start + j for j in range(stop - start) if start + j not in shard_bad]
        digest = hashlib.sha256(json.dumps([cols[c] for c in id_cols] + [rows, start]).encode())
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


def score_shard(tokens, plan: ShardPlan, n_instructions: int, score) -> pa.Table:
    """Scores the shard's kept rows (token ids from ``stage1.tokens``) under every instruction in one ``score`` call."""
    sel = tokens.select(plan.rows)
    resp = {f: sel[f"{f}_ids"] for f in ("chosen", "rejected")}
    pairs = []
    for k in range(n_instructions):
        p_ids = sel[f"prompt_ids_{k}"]
        for f in ("chosen", "rejected"):
            pairs += zip(p_ids, resp[f])
    logps = score(pairs) if pairs else []
    n = len(plan.rows)
    table = {  # prompt_ids: the bare prompt, no instruction (what the doctor sees when serving)
        "row_index": pa.array(plan.rows, pa.int64()),
        "prompt_ids": _list_array(sel["prompt_ids"], np.int32),
        "chosen_ids": _list_array(resp["chosen"], np.int32),
        "rejected_ids": _list_array(resp["rejected"], np.int32),
    }
    for k in range(n_instructions):
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
