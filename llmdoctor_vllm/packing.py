"""The layout of one doctor step: every stream's new tokens packed end to end, cut into passes.

A step may mix streams that decode (one new token), streams that prefill a long prompt (many),
and streams with nothing new (a request whose patient is still prefilling a chunk the doctor has
already read). The tokens are packed without padding, so the doctor's linear layers cost
O(sum of new tokens); they run in *passes* of at most ``prefill_chunk_tokens`` tokens (the doctor's
own chunked prefill), so peak activation memory is bounded whatever the prompt length. Within a
pass, attention runs over *tiles* (a run of one stream's tokens, at most ``q_tile`` long); tiles
of one token (decodes) and longer tiles (prefill) form separate groups, so a decode is never
padded to a prefill's length, and a group is split so that its score matrix stays under
``score_budget`` elements. A tile reads keys up to the longest tile of its group; past its own
end it reads ``pad_row`` (a row that holds zeros), never another stream's rows. Everything here
is host-side index arithmetic in NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TileGroup:
    """Attention for ``G`` tiles of at most ``Q`` queries each, reading ``L`` keys each."""

    q_index: np.ndarray  # [G, Q] token index within the pass (padding repeats the tile's last token)
    q_valid: np.ndarray  # [G, Q] which queries are real
    q_pos: np.ndarray  # [G, Q] position of each query in its stream
    read: np.ndarray  # [G, L] pool rows holding the tile's stream keys at positions 0..L-1
    identity: bool  # the group is the whole pass, q_index.ravel() is arange(P): no gather or scatter


@dataclass
class StepPass:
    """One forward over ``tokens`` (indices into the step's packed token arrays)."""

    start: int
    end: int
    groups: list[TileGroup]
    last_token: np.ndarray  # token indices within the pass that end a stream's new tokens
    last_stream: np.ndarray  # ... and which stream (index into the step's ``sids``) each one ends


@dataclass
class StepPlan:
    """The packed tokens of a step and the passes that feed them."""

    src: np.ndarray  # [N] index into the caller's flat token ids, in packed order
    stream: np.ndarray  # [N] index into ``sids`` of each packed token
    pos: np.ndarray  # [N] position of each token in its stream
    write: np.ndarray  # [N] pool row each token's key and value go to
    passes: list[StepPass]
    one_each: bool = False  # one pass, one token per stream, in the streams' order (a decode step)


def _runs(starts: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of the runs that begin where ``starts`` is true (``starts[0]`` must be)."""
    first = np.flatnonzero(starts)
    return first, np.diff(np.append(first, total))


def plan_step(n: np.ndarray, cached: np.ndarray, tables: np.ndarray, block_size: int, *, prefill_chunk_tokens: int,
              q_tile: int, score_budget: int, num_heads: int, key_bucket: int = 1, pad_row: int = 0,
              tiles: bool = True) -> StepPlan:
    """Lays out a step that feeds ``n[i]`` new tokens to stream ``i`` (which holds ``cached[i]``).

    ``tables[i]`` is stream ``i``'s block table. Streams with fewer new tokens go first, so the
    decodes of a step share its first pass. ``tiles=False`` leaves the passes without tile groups
    (an attention kernel that reads the block tables itself needs none).
    """
    n = np.asarray(n, dtype=np.int64)
    if not tiles and len(n) <= prefill_chunk_tokens and (n == 1).all():
        return _decode_plan(cached, tables, block_size)
    offsets = np.concatenate([[0], np.cumsum(n)])  # where each stream's ids start in the caller's flat ids
    order = np.argsort(n, kind="stable")
    n_o = n[order]
    total = int(n.sum())
    stream = np.repeat(order, n_o)
    j = np.arange(total) - np.repeat(np.concatenate([[0], np.cumsum(n_o)])[:-1], n_o)  # index within the stream's run
    src = offsets[stream] + j
    pos = cached[stream] + j
    write = _pool_rows(tables, stream, pos, block_size)
    is_last = j == n[stream] - 1
    passes = []
    for a in range(0, total, prefill_chunk_tokens):
        b = min(total, a + prefill_chunk_tokens)
        st, jj = stream[a:b], j[a:b]
        new_tile = np.ones(b - a, dtype=bool)
        new_tile[1:] = (st[1:] != st[:-1]) | (jj[1:] % q_tile == 0)
        t_start, t_len = _runs(new_tile, b - a)
        groups = []
        for sel in (t_len == 1, t_len > 1) if tiles else ():
            if sel.any():
                groups += _groups(t_start[sel], t_len[sel], st, pos[a:b], tables, block_size, score_budget,
                                  num_heads, key_bucket, b - a, pad_row)
        last = np.flatnonzero(is_last[a:b])
        passes.append(StepPass(a, b, groups, last, st[last]))
    return StepPlan(src=src, stream=stream, pos=pos, write=write, passes=passes)


def _pool_rows(tables: np.ndarray, stream: np.ndarray, pos: np.ndarray, block_size: int) -> np.ndarray:
    """The pool row of each token: position ``pos`` of stream ``stream`` (a position past the last
    block of the table is clamped into it; the runner refuses such a stream before it writes)."""
    pos_c = np.minimum(pos, tables.shape[1] * block_size - 1)
    return tables[stream, pos_c // block_size] * block_size + pos_c % block_size


def _decode_plan(cached: np.ndarray, tables: np.ndarray, block_size: int) -> StepPlan:
    """The plan of a step that feeds every stream one token, in one pass (no tiles): what
    :func:`plan_step` would lay out, without its general bookkeeping (a decode step's common case)."""
    every = np.arange(len(cached))
    pos = np.asarray(cached, dtype=np.int64)
    return StepPlan(src=every, stream=every, pos=pos, write=_pool_rows(tables, every, pos, block_size),
                    passes=[StepPass(0, len(every), [], every, every)], one_each=True)


def _groups(t_start, t_len, stream, pos, tables, block_size, score_budget, num_heads, key_bucket, pass_len, pad_row):
    """Tile groups for tiles of similar query length, split to bound their attention scores."""
    Q = int(t_len.max())
    q_index = np.minimum(t_start[:, None] + np.arange(Q)[None, :], (t_start + t_len - 1)[:, None])
    q_valid = np.arange(Q)[None, :] < t_len[:, None]
    q_pos = pos[t_start][:, None] + np.arange(Q)[None, :]
    ends = pos[t_start] + t_len  # keys each tile reads
    L = -(-int(ends.max()) // key_bucket) * key_bucket
    kpos = np.arange(L)
    blocks = np.minimum(kpos // block_size, tables.shape[1] - 1)
    per_tile = max(1, score_budget // (Q * L * num_heads))
    identity = (per_tile >= len(t_start) and len(t_start) * Q == pass_len and bool(q_valid.all())
                and bool((q_index.ravel() == np.arange(pass_len)).all()))
    out = []
    for g in range(0, len(t_start), per_tile):
        s = slice(g, g + per_tile)
        L_s = -(-int(ends[s].max()) // key_bucket) * key_bucket
        read = tables[stream[t_start[s]]][:, blocks[:L_s]] * block_size + kpos[:L_s] % block_size
        read[kpos[:L_s][None, :] >= ends[s][:, None]] = pad_row
        out.append(TileGroup(q_index[s], q_valid[s], q_pos[s], read, identity))
    return out
