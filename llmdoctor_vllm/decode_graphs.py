"""Decode-only doctor steps over static, padded buffers: the shape a CUDA graph can capture.

At real sizes the doctor's step is host-bound: an eager forward launches about a thousand small
kernels for a few milliseconds of GPU work. When every stream of a step gains exactly one token
(a decode-only step, the common case), this path runs the step over fixed buffers: the batch
padded to a size from a ladder, keys read over a fixed length from a ladder of key buckets
(positions past a stream's end are masked; padded rows write to a spare pool row and read one
key), and the LoRA adapter switched on or off per row by a 0/1 factor instead of a row subset.
Every shape depends on the bucket only, so on CUDA the step can be captured once per
``(batch, keys)`` bucket and replayed; on CPU (and with capture off) the same static step runs
eagerly, which is how the tests check it against the packed eager step.

Capture stays off by default until a GPU run has shown replay equal to eager.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from vllm.logger import init_logger

logger = init_logger("vllm.llmdoctor")


def _ladder(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` up to the first one at or above ``limit``."""
    out = [start]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return out


@dataclass
class _Buffers:
    """The static inputs and outputs of one ``(batch, keys)`` bucket."""

    ids: torch.Tensor  # [B]
    pos: torch.Tensor  # [B]
    write: torch.Tensor  # [B] pool row of each row's new key (padding: the spare row)
    read: torch.Tensor  # [B, L] pool rows of each row's keys
    mask: torch.Tensor  # [B, 1, 1, L] keys a row may see
    on: torch.Tensor  # [B] 1 where the LoRA adapter applies, 0 where it is off
    hidden: torch.Tensor | None = None  # [B, hidden] outputs
    logprobs: torch.Tensor | None = None  # [B, V]
    graph: object = None


class StaticDecode:
    """Runs a :class:`~llmdoctor_vllm.runner.DoctorRunner`'s decode-only steps in static buckets."""

    def __init__(self, runner, *, max_batch: int, capture: bool, key_start: int = 256):
        self.runner = runner
        self.batch_sizes = _ladder(max_batch)
        self.key_sizes = _ladder(runner.max_blocks_per_stream * runner.block_size, max(1, key_start))
        self.capture = capture and runner.device.type == "cuda"
        self.buffers: dict[tuple[int, int], _Buffers] = {}
        self.graph_bytes = 0
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket(self, num_streams: int, longest: int) -> tuple[int, int] | None:
        """The ``(batch, keys)`` bucket for a step, or ``None`` if it falls off the ladders."""
        if num_streams > self.batch_sizes[-1] or longest > self.key_sizes[-1]:
            return None
        b = next(x for x in self.batch_sizes if x >= num_streams)
        return b, next(x for x in self.key_sizes if x >= longest)

    def step(self, sids: np.ndarray, ids, totals: np.ndarray, adapter_off: np.ndarray | None,
             key: tuple[int, int]) -> torch.Tensor:
        """Log-probs ``[len(sids), V]`` for streams gaining one token each (already reserved)."""
        from llmdoctor_vllm.runner import to_device

        r, S = self.runner, len(sids)
        B, L = key
        buf = self.buffers.get(key) or self._allocate(key)
        bs, pos = r.block_size, totals - 1
        tables = r.block_table[sids]
        kpos = np.arange(L)
        read = np.full((B, L), r.spare_row, dtype=np.int64)
        read[:S] = np.take(tables, np.minimum(kpos // bs, tables.shape[1] - 1), axis=1) * bs + kpos % bs
        mask = np.zeros((B, L), dtype=bool)
        mask[:, 0] = True  # a padded row sees one (spare) key: no row is fully masked
        mask[:S] = kpos[None, :] <= pos[:, None]
        write = np.full(B, r.spare_row, dtype=np.int64)
        write[:S] = tables[np.arange(S), pos // bs] * bs + pos % bs
        on = np.ones(B, dtype=np.float32)
        if adapter_off is not None:
            on[:S] = ~adapter_off
        padded_pos = np.zeros(B, dtype=np.int64)
        padded_pos[:S] = pos
        dev = r.device
        buf.ids.zero_()
        buf.ids[:S].copy_(torch.as_tensor(ids).to(dev, non_blocking=True).view(-1))
        for dst, src in ((buf.pos, padded_pos), (buf.write, write), (buf.read, read), (buf.mask, mask[:, None, None]),
                         (buf.on, on)):
            dst.copy_(to_device(src, dev), non_blocking=True)
        if buf.graph is not None:
            buf.graph.replay()
        else:
            self._forward(buf)
            if self.capture:
                self._capture(buf, key)
        r.last_hidden.index_copy_(0, to_device(sids, dev), buf.hidden[:S])
        return buf.logprobs[:S].clone()

    def _allocate(self, key: tuple[int, int]) -> _Buffers:
        B, L = key
        dev = self.runner.device
        buf = _Buffers(ids=torch.zeros(B, dtype=torch.long, device=dev), pos=torch.zeros(B, dtype=torch.long, device=dev),
                       write=torch.zeros(B, dtype=torch.long, device=dev),
                       read=torch.zeros((B, L), dtype=torch.long, device=dev),
                       mask=torch.zeros((B, 1, 1, L), dtype=torch.bool, device=dev),
                       on=torch.ones(B, dtype=torch.float32, device=dev))
        self.buffers[key] = buf
        return buf

    def _capture(self, buf: _Buffers, key: tuple[int, int]) -> None:
        """Captures the bucket's step in a CUDA graph (after the eager run that warmed it up)."""
        t0, before = time.perf_counter(), torch.cuda.memory_allocated()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(buf)  # a warm-up on the side stream, as torch's capture requires
            torch.cuda.current_stream().synchronize()
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(buf)
        torch.cuda.current_stream().wait_stream(stream)
        buf.graph = graph
        self.graph_bytes += torch.cuda.memory_allocated() - before
        logger.info("llmdoctor: captured the doctor's decode step for batch %d, %d keys in %.2f s "
                    "(graphs hold %.1f MiB)", key[0], key[1], time.perf_counter() - t0, self.graph_bytes / 2**20)

    @torch.inference_mode()
    def _forward(self, buf: _Buffers) -> None:
        """The decoder over the bucket's static buffers; writes ``buf.hidden`` and ``buf.logprobs``."""
        from llmdoctor_vllm.runner import _norm, layer_mlp, layer_queries

        r = self.runner
        d = r.dec
        B, L = buf.read.shape
        h = d.embed(buf.ids)
        cos, sin = r.cos[buf.pos][None], r.sin[buf.pos][None]
        on = buf.on.to(h.dtype)[:, None]
        nq = d.num_heads * d.head_dim

        def lin(module, x):
            return _masked_linear(module, x, on)

        for li, layer in enumerate(d.layers):
            attn = layer.self_attn
            q = layer_queries(d, li, layer, h, cos, sin, r.kv[li], buf.write, lin)  # [B, heads, hd]
            rows = buf.read.view(-1)
            keys = r.kv[li, 0].index_select(0, rows).view(B, L, d.num_kv_heads, d.head_dim).transpose(1, 2)
            vals = r.kv[li, 1].index_select(0, rows).view(B, L, d.num_kv_heads, d.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:, :, None], keys, vals, attn_mask=buf.mask,
                                               scale=attn.scaling, enable_gqa=d.num_heads != d.num_kv_heads)
            h = h + lin(attn.o_proj, o.reshape(B, nq))
            h = h + layer_mlp(d, li, layer, h, lin)
        logits = _masked_linear(d.lm_head, _norm(d.norm, h), on)
        if buf.hidden is None:
            buf.hidden, buf.logprobs = torch.empty_like(h), torch.empty(logits.shape, device=h.device)
        buf.hidden.copy_(h)
        buf.logprobs.copy_(torch.log_softmax(logits.float(), dim=-1))


def _masked_linear(module, x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """A (possibly LoRA-wrapped) linear layer whose low-rank term is scaled by ``on`` per row:
    the adapter on (1) or off (0) without selecting rows, so every shape stays fixed."""
    if not hasattr(module, "lora_A"):
        return module(x)
    from llmdoctor_vllm.runner import _lora_name

    name = _lora_name(module)
    out = module.base_layer(x)
    lora_a = module.lora_A[name]
    delta = module.lora_B[name](lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype))))
    return out + (delta * module.scaling[name] * on).to(out.dtype)
