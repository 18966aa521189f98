"""The doctor runner: the doctor LM with its own paged KV cache, stepped once per engine step.

Each guided request owns one *stream* per doctor (two for a LoRA doctor under the delta
rule: adapter on and adapter off). A step feeds every stream only the tokens it gained since
its last step, and returns each stream's next-token log-probabilities. The new tokens of all
streams are packed end to end (no padding: a long prompt chunk next to many decodes costs the
sum of their tokens) and run in passes of bounded size (see :mod:`llmdoctor_vllm.packing`).
Keys and values live in a block pool sized by a token budget, so memory follows the tokens
actually cached, and a finished request's blocks go back to the pool.

A step waits for nothing on the device: its index tensors are laid out on the host and uploaded
once, token ids are checked against the doctor's embedding (on the host when they come from
there, on the device otherwise; a stream fed an id the doctor cannot embed gets rows of NaN until
it is freed, and no other stream is affected), and the
keys a stream reads past its own end (its group's longer tiles, rounded key lengths) come from a
row of zeros, so nothing another stream left in the pool, NaN included, enters its attention. The
layer math is :mod:`llmdoctor_vllm.layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmdoctor_vllm.cpu_attention import CpuPagedAttention
from llmdoctor_vllm.device import to_device, to_device_many
from llmdoctor_vllm.layers import (Decoder, additive_mask, forward_layers, kernel_rotation, rms_norm, rotary_cache,
                                   signed_sin, table_rotation, unwrap_decoder)
from llmdoctor_vllm.packing import plan_step


class DoctorCacheFull(RuntimeError):
    """The doctor's KV budget cannot hold these streams; they are listed in ``streams``."""

    def __init__(self, streams: list[int], budget_tokens: int):
        super().__init__(f"llmdoctor: doctor KV cache full ({budget_tokens} tokens) for {len(streams)} stream(s)")
        self.streams = streams


# Keys are read in lengths rounded up to this many tokens on CUDA: SDPA's cuDNN backend plans per
# shape, and an exact key length grows by one every step (measured on an H100: 1.4 ms of host
# time per layer per step, re-planning). Rounded, a plan serves this many steps.
_CUDA_KEY_BUCKET = 256


def _as_ids(tokens) -> tuple[np.ndarray, np.ndarray | torch.Tensor]:
    """``(counts, flat ids)`` from a list of token sequences, or a ``(counts, ids)`` pair as given."""
    if isinstance(tokens, tuple):
        counts, ids = tokens
        return np.asarray(counts, dtype=np.int64), ids
    counts = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    return counts, np.fromiter((t for row in tokens for t in row), dtype=np.int64, count=int(counts.sum()))


@dataclass
class _Group:
    """A tile group of a pass on the device (see :class:`llmdoctor_vllm.packing.TileGroup`)."""

    shape: tuple[int, int, int]  # G tiles, Q queries, L keys
    q_index: torch.Tensor  # [G * Q] token of each query in the pass
    read: torch.Tensor  # [G * L] pool row of each key
    mask: torch.Tensor  # [G, 1, Q, L] 0 where a query sees a key (positions up to its own), -inf elsewhere
    valid: torch.Tensor  # [queries] which of the G * Q queries are real ...
    scatter_to: torch.Tensor  # ... and the pass token each one is
    identity: bool  # the G * Q queries are the pass's tokens in order


class DoctorRunner:
    """Steps one doctor LM over many streams with an incremental, paged KV cache.

    ``cache_tokens`` is the KV budget (in tokens, over all streams); ``max_streams`` the most
    streams alive at once; ``max_len`` the longest stream. ``prefill_chunk_tokens`` bounds the
    tokens of one forward (a longer feed, such as a long prompt, runs as several passes), and
    ``score_budget`` the attention scores held at once, so the step's activation memory does not
    grow with the prompt length. ``attention``: ``"auto"`` runs vLLM's CPU paged-attention kernel
    where it can (:mod:`llmdoctor_vllm.cpu_attention`), SDPA over gathered keys elsewhere;
    ``"sdpa"`` always the latter.
    """

    def __init__(self, model, *, device, dtype, cache_tokens: int, max_streams: int, max_len: int,
                 block_size: int = 16, prefill_chunk_tokens: int = 2048, q_tile: int = 256,
                 score_budget: int = 1 << 25, attention: str = "auto"):
        self.model = model
        self.device = torch.device(device)
        self.dec: Decoder = unwrap_decoder(model, cpu_kernels=self.device.type == "cpu")
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = max(1, cache_tokens // block_size)
        self.budget_tokens = self.num_blocks * block_size
        self.prefill_chunk_tokens, self.q_tile, self.score_budget = prefill_chunk_tokens, q_tile, score_budget
        d = self.dec
        if attention not in ("auto", "sdpa"):
            raise ValueError(f"llmdoctor: attention must be 'auto' or 'sdpa', not {attention!r}")
        self.paged = CpuPagedAttention.for_decoder(d, dtype, block_size, self.device) if attention == "auto" else None
        if self.paged is not None:  # vLLM's CPU kernel over the pool in its own block layout
            self.kv = torch.zeros(self.paged.pool_shape(len(d.layers), self.num_blocks), device=self.device,
                                  dtype=dtype)
        else:
            # Per layer, rows of (key, value) for every cached token, and two rows past the budget: a
            # sink that the padded rows of a static step write to, and a zero row that masked reads hit.
            self.kv = torch.zeros((len(d.layers), self.budget_tokens + 2, 2, d.num_kv_heads, d.head_dim),
                                  device=self.device, dtype=dtype)
        self.sink_row, self.zero_row = self.budget_tokens, self.budget_tokens + 1
        self.max_blocks_per_stream = -(-max_len // block_size)
        self.block_table = np.zeros((max_streams, self.max_blocks_per_stream), dtype=np.int64)
        self.num_stream_blocks = np.zeros(max_streams, dtype=np.int64)
        self.lengths = np.zeros(max_streams, dtype=np.int64)  # tokens cached per stream
        self.table_dev: torch.Tensor | None = None  # a device copy of block_table, for static steps
        hidden = d.embed.weight.shape[1]
        # each stream's last hidden state: a stream with no new tokens in a step reuses it
        self.last_hidden = torch.zeros((max_streams, hidden), device=self.device, dtype=dtype)
        # per stream, how many ids it was fed that the doctor cannot embed (its rows are NaN)
        self.poisoned = torch.zeros(max_streams, device=self.device, dtype=torch.int32)
        # per stream, on the host: whether it may be poisoned (fed ids screened on the device, or an
        # id the host saw out of range); a step with none of these skips the NaN marking
        self.maybe_poisoned = np.zeros(max_streams, dtype=bool)
        self.free_streams = list(range(max_streams - 1, -1, -1))
        self.free_blocks = np.arange(self.num_blocks - 1, -1, -1, dtype=np.int64)  # a stack: the top is used next
        self.num_free_blocks = self.num_blocks
        self.vocab_width = d.lm_head.weight.shape[0] if d.lm_head.weight is not None \
            else d.lm_head.modules[0].weight.shape[0]
        with torch.inference_mode():  # rotary tables for every position, looked up per step
            probe = torch.zeros(1, device=self.device, dtype=dtype)
            cos, sin = d.rotary(probe, torch.arange(max_len, device=self.device)[None])
            self.arange = torch.arange(max(max_len, 1) + _CUDA_KEY_BUCKET, device=self.device)
        self.cos, self.sin_signed = cos[0], signed_sin(sin[0])
        # vLLM's rotary kernel's table, where the doctor runs on vLLM's CPU kernels
        self.rotary = rotary_cache(cos[0], sin[0]) if d.cpu_ops is not None else None
        self.key_bucket = _CUDA_KEY_BUCKET if self.device.type == "cuda" else 1
        self.static = None  # decode-only steps in static buckets (see enable_static_decode)

    def enable_static_decode(self, *, max_batch: int, capture: bool, key_start: int = 256,
                             max_bucket_keys: int = 1 << 16) -> None:
        """Runs decode-only steps over static padded buffers (captured as CUDA graphs if ``capture``
        and on CUDA); other steps, and steps whose bucket holds more than ``max_bucket_keys``
        keys (batch x keys), stay on the packed path. See :mod:`llmdoctor_vllm.decode_graphs`."""
        from llmdoctor_vllm.decode_graphs import StaticDecode

        self.table_dev = torch.tensor(self.block_table, device=self.device)
        self.static = StaticDecode(self, max_batch=max_batch, capture=capture, key_start=key_start,
                                   max_bucket_keys=max_bucket_keys)

    def warm_up(self) -> None:
        """Captures the static decode step of every bucket now (with ``cuda_graphs`` on CUDA), so
        the graphs' memory is taken at start-up rather than mid-serving; otherwise nothing."""
        if self.static is not None:
            self.static.capture_all()

    @property
    def kv_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def occupancy(self) -> tuple[int, int]:
        """``(live streams, blocks in use)``: both return to zero when no request is guided."""
        return (len(self.block_table) - len(self.free_streams), self.num_blocks - self.num_free_blocks)

    def new_stream(self) -> int:
        """An empty stream id (its cache starts clean)."""
        if not self.free_streams:
            raise DoctorCacheFull([], self.budget_tokens)
        sid = self.free_streams.pop()
        self.lengths[sid] = 0
        self.num_stream_blocks[sid] = 0
        self.poisoned[sid] = 0
        self.maybe_poisoned[sid] = False
        return sid

    def free_stream(self, sid: int) -> None:
        """Gives the stream's blocks back to the pool."""
        nb = int(self.num_stream_blocks[sid])
        self.free_blocks[self.num_free_blocks:self.num_free_blocks + nb] = self.block_table[sid, :nb][::-1]
        self.num_free_blocks += nb
        self.num_stream_blocks[sid] = 0
        self.lengths[sid] = 0
        self.free_streams.append(sid)

    def _reserve(self, sids: np.ndarray, totals: np.ndarray) -> None:
        """Gives each stream the blocks its new total needs (a block keeps what its last owner left:
        no read reaches a row past its own stream's end, see :mod:`llmdoctor_vllm.packing`)."""
        need = -(-totals // self.block_size) - self.num_stream_blocks[sids]
        grow = need > 0
        short = sids[grow & (totals > self.max_blocks_per_stream * self.block_size)]
        if len(short) or need[grow].sum() > self.num_free_blocks:
            # Say which streams would not fit; the caller drops their guidance.
            over = short if len(short) else sids[grow]
            raise DoctorCacheFull(over.tolist(), self.budget_tokens)
        if not grow.any():
            return
        k = need[grow]
        n = int(k.sum())
        top = self.num_free_blocks
        blocks = self.free_blocks[top - n:top][::-1].copy()
        self.num_free_blocks -= n
        owner = np.repeat(sids[grow], k)
        cols = self.num_stream_blocks[owner] + np.arange(n) - np.repeat(np.cumsum(k) - k, k)
        self.block_table[owner, cols] = blocks
        self.num_stream_blocks[sids[grow]] += k
        if self.paged is not None:  # the kernel reads whole blocks: nothing a last owner left may remain
            self.kv.index_fill_(1, torch.from_numpy(blocks), 0)
        if self.table_dev is not None:
            flat_t, blocks_t = to_device_many([owner * self.max_blocks_per_stream + cols, blocks], self.device)
            self.table_dev.view(-1).index_copy_(0, flat_t, blocks_t)

    def screen_ids(self, ids: torch.Tensor, stream_rows: torch.Tensor) -> torch.Tensor:
        """``ids`` clamped into the doctor's embedding; each stream (``stream_rows``: one per id)
        that was fed an id outside it is marked poisoned. All on the device."""
        top = self.dec.vocab_rows - 1
        self.poisoned.index_add_(0, stream_rows, ((ids < 0) | (ids > top)).to(torch.int32))
        return ids.clamp(0, top)

    def _nan_if_poisoned(self, sids_t: torch.Tensor, dtype) -> torch.Tensor:
        """Per stream, NaN if it is poisoned and 0 otherwise: added to a row, it makes the row NaN (the
        caller cannot guide it) without a ``where`` over ``[rows, vocab]``."""
        return torch.where(self.poisoned.index_select(0, sids_t) > 0, float("nan"), 0.0).to(dtype)[:, None]

    @torch.inference_mode()
    def step(self, sids: np.ndarray, tokens, adapter_off: np.ndarray | None = None) -> torch.Tensor:
        """Feeds each stream its new tokens; returns ``[len(sids), vocab]`` float32 log-probs.

        ``tokens`` is either a list (one sequence of new token ids per stream) or a pair
        ``(counts, ids)``: ``counts[i]`` new tokens for stream ``sids[i]``, ``ids`` all of them
        end to end (a host array or a tensor on the doctor's device). A stream may gain no token
        (its last distribution is returned again). ``adapter_off[i]`` runs that stream with the
        LoRA adapter switched off. A stream fed an id outside the doctor's vocabulary gets a row
        of NaN, in this step and every later one until it is freed.
        """
        sids = np.asarray(sids, dtype=np.int64)
        counts, ids = _as_ids(tokens)
        cached = self.lengths[sids]
        totals = cached + counts
        self._reserve(sids, totals)
        lora_off = adapter_off if self.dec.lora and adapter_off is not None and adapter_off.any() else None
        if self.static is not None and len(sids) and (counts == 1).all():
            key = self.static.bucket(len(sids), int(totals.max()))
            if key is not None:
                out, sids_t = self.static.step(sids, ids, totals, lora_off, key)
                self.lengths[sids] = totals
                return out.add_(self._nan_if_poisoned(sids_t, out.dtype))
        out = self._packed_step(sids, counts, ids, cached, lora_off)
        self.lengths[sids] = totals
        return out

    def _packed_step(self, sids, counts, ids, cached, lora_off):
        """The packed forward of a step: each stream's log-probs (NaN for a poisoned stream)."""
        d, dev = self.dec, self.device
        tables = self.block_table[sids]
        plan = plan_step(counts, cached, tables, self.block_size,
                         prefill_chunk_tokens=self.prefill_chunk_tokens, q_tile=self.q_tile,
                         score_budget=self.score_budget, num_heads=d.num_heads, key_bucket=self.key_bucket,
                         pad_row=self.zero_row, tiles=self.paged is None)
        host_ids = not isinstance(ids, torch.Tensor)
        packed_ids = np.asarray(ids, dtype=np.int64)[plan.src] if host_ids else plan.src
        # ids on the host are checked here; ids on the device are screened there (no sync)
        screen = not host_ids or bool(len(packed_ids)) and bool(
            packed_ids.min() < 0 or packed_ids.max() >= d.vocab_rows)
        if screen:
            self.maybe_poisoned[sids[counts > 0]] = True
        # every index tensor of the step, laid out here and uploaded in one transfer
        arrays = [sids, plan.pos, plan.write, sids[plan.stream], packed_ids]
        if lora_off is not None:  # 1 where the adapter applies, per stream and per packed token
            arrays += [~lora_off, ~lora_off[plan.stream]]
        for p in plan.passes:
            if not plan.one_each:
                arrays += [p.last_token, sids[p.last_stream]]
            for g in p.groups:
                arrays += [g.q_index.ravel(), g.q_pos, g.read.ravel(), np.flatnonzero(g.q_valid),
                           g.q_index[g.q_valid]]
        up = iter(to_device_many(arrays, dev))
        sids_t, pos_t, write_t, tok_stream_t, src_t = (next(up) for _ in range(5))
        on_rows, tok_on = (next(up).to(self.dtype)[:, None] for _ in range(2)) if lora_off is not None else (None, None)
        if len(plan.src):
            tok_ids = src_t if host_ids else (ids if ids.device == dev else ids.to(dev)).index_select(0, src_t).long()
            tok_ids = self.screen_ids(tok_ids, tok_stream_t) if screen else tok_ids
        for p in plan.passes:
            last_t, last_sid_t = (None, sids_t) if plan.one_each else (next(up), next(up))
            tile_groups = []
            for g in p.groups:
                q_index, q_pos, read, valid, scatter_to = (next(up) for _ in range(5))
                G, Q = g.q_index.shape
                L = g.read.shape[1]
                mask = additive_mask((self.arange[:L] <= q_pos[:, :, None])[:, None], self.dtype)
                tile_groups.append(_Group((G, Q, L), q_index, read, mask, valid, scatter_to, g.identity))
            s = slice(p.start, p.end)
            layout = self.paged.layout(plan.stream[s], plan.pos[s], tables) if self.paged is not None else tile_groups
            h = self._forward_pass(layout, tok_ids[s], pos_t[s], write_t[s], None if tok_on is None else tok_on[s])
            self.last_hidden.index_copy_(0, last_sid_t, h if plan.one_each else h.index_select(0, last_t))
        # a poisoned stream's hidden state becomes NaN, and so its whole row, at the cost of [rows, hidden]
        last = h if plan.one_each else self.last_hidden.index_select(0, sids_t)
        if self.maybe_poisoned[sids].any():
            last.add_(self._nan_if_poisoned(sids_t, self.dtype))
        logits = d.lm_head(rms_norm(d.norm, last, d.cpu_ops), on_rows)
        return torch.log_softmax(logits.float(), dim=-1)

    def _forward_pass(self, layout, ids, pos, write, on):
        """The decoder over one pass's packed tokens; returns their last hidden states ``[P, hidden]``.
        ``layout``: the pass's tile groups (SDPA), or its :class:`~llmdoctor_vllm.cpu_attention.PassLayout`."""
        d = self.dec
        P, nq = ids.shape[0], d.num_heads * d.head_dim
        if self.rotary is not None:
            rotate = kernel_rotation(d, pos, self.rotary)
        else:
            rotate = table_rotation(d, self.cos.index_select(0, pos), self.sin_signed.index_select(0, pos))
        if self.paged is not None:
            def paged(li, q, kv_new):
                return self.paged(self.kv[li], layout, q, kv_new, write, d.layers[li].scaling)

            return forward_layers(d, d.embed(ids), rotate, on, paged)

        def attend(li, q, kv_new):
            pool = self.kv[li]
            pool.index_copy_(0, write, kv_new)
            scale = d.layers[li].scaling
            if len(layout) == 1 and layout[0].identity:
                return self._attend(layout[0], q, pool, scale)
            o = q.new_empty((P, nq))
            for g in layout:
                o.index_copy_(0, g.scatter_to, self._attend(g, q, pool, scale).index_select(0, g.valid))
            return o

        return forward_layers(d, d.embed(ids), rotate, on, attend)

    def _attend(self, g: _Group, q: torch.Tensor, pool: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one tile group over the pool: ``[G * Q, heads * head_dim]``."""
        d = self.dec
        G, Q, L = g.shape
        qg = q if g.identity else q.index_select(0, g.q_index)
        qg = qg.view(G, Q, d.num_heads, d.head_dim).transpose(1, 2)
        kv = pool.index_select(0, g.read).view(G, L, 2, d.num_kv_heads, d.head_dim)
        o = F.scaled_dot_product_attention(qg, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
                                           attn_mask=g.mask, scale=scale, enable_gqa=d.num_heads != d.num_kv_heads)
        return o.transpose(1, 2).reshape(G * Q, -1)
