"""Decode-only doctor steps over static, padded buffers: the shape a CUDA graph can capture.

At real sizes the doctor's step is host-bound: an eager forward launches hundreds of small
kernels for a few milliseconds of GPU work. When every stream of a step gains exactly one token
(a decode-only step, the common case), this path runs the step over fixed buffers: the batch
padded to a size from a ladder, keys read over a fixed length from a ladder of key buckets, and
the LoRA adapter switched on or off per row by a 0/1 factor instead of a row subset. A step
uploads one small ``[4, batch]`` array (token id, stream, position, adapter on); the key rows
and masks are built from the runner's device copy of the block table inside the step (positions
past a stream's end read the pool's zero row; padded rows write to its sink row and read one
zero key). Every shape depends on the bucket only, so on CUDA the step is captured once per
``(batch, keys)`` bucket, at start-up (:meth:`StaticDecode.capture_all`), and replayed; on CPU
(and with capture off) the same static step runs eagerly, which is how the tests check it
against the packed step.

Buckets are bounded: one whose batch x keys exceeds ``max_bucket_keys`` is not used (that step
runs on the packed path), and a bucket whose capture failed is remembered and not tried again.
All buckets share one output buffer and one graph memory pool, whose size is logged.
Capture stays off by default until a GPU run has shown replay equal to eager.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from vllm.logger import init_logger

from llmdoctor_vllm.device import to_device
from llmdoctor_vllm.layers import additive_mask, forward_layers, rms_norm, table_rotation

logger = init_logger("vllm.llmdoctor")


def _ladder(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` up to the first one at or above ``limit``."""
    out = [start]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return out


class StaticDecode:
    """Runs a :class:`~llmdoctor_vllm.runner.DoctorRunner`'s decode-only steps in static buckets."""

    def __init__(self, runner, *, max_batch: int, capture: bool, key_start: int = 256, max_bucket_keys: int = 1 << 16):
        self.runner = runner
        self.batch_sizes = _ladder(max_batch)
        self.key_sizes = _ladder(runner.max_blocks_per_stream * runner.block_size, max(1, key_start))
        self.max_bucket_keys = max_bucket_keys
        self.capture = capture and runner.device.type == "cuda"
        self.buffers: dict[tuple[int, int], object] = {}  # buckets run so far -> their graph (None: eager)
        self.failed: set[tuple[int, int]] = set()  # buckets whose capture failed: the packed path runs them
        self.graph_bytes = 0
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        d, dev, B = runner.dec, runner.device, self.batch_sizes[-1]
        # rows: token id, stream, position (-1: a padded row), adapter on (1) or off (0)
        self.meta = torch.zeros((4, B), dtype=torch.long, device=dev)
        self.hidden = torch.zeros((B, d.embed.weight.shape[1]), dtype=runner.dtype, device=dev)
        self.logprobs = torch.zeros((B, runner.vocab_width), dtype=torch.float32, device=dev)
        kpos = torch.arange(self.key_sizes[-1], device=dev)
        self.kpos, self.kblock = kpos, (kpos // runner.block_size).clamp(max=runner.max_blocks_per_stream - 1)

    def bucket(self, num_streams: int, longest: int) -> tuple[int, int] | None:
        """The ``(batch, keys)`` bucket for a step, or ``None`` if it falls off the ladders, is over
        the key budget, or failed to capture."""
        if num_streams > self.batch_sizes[-1] or longest > self.key_sizes[-1]:
            return None
        key = next(x for x in self.batch_sizes if x >= num_streams), next(x for x in self.key_sizes if x >= longest)
        if key[0] * key[1] > self.max_bucket_keys or key in self.failed:
            return None
        return key

    def step(self, sids: np.ndarray, ids, totals: np.ndarray, adapter_off: np.ndarray | None,
             key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-probs [len(sids), V], sids on the device)`` for streams gaining one token each
        (already reserved)."""
        r, S = self.runner, len(sids)
        B = key[0]
        meta = np.zeros((4, B), dtype=np.int64)
        meta[2], meta[3] = -1, 1
        meta[1, :S], meta[2, :S] = sids, totals - 1
        if adapter_off is not None:
            meta[3, :S] = ~adapter_off
        host_ids = not isinstance(ids, torch.Tensor)
        if host_ids:
            meta[0, :S] = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.meta[:, :B].copy_(to_device(meta, r.device), non_blocking=True)
        if not host_ids:
            self.meta[0, :S].copy_(ids.reshape(-1))
        if key not in self.buffers:
            self._run_first(key)
        graph = self.buffers[key]
        if graph is not None:
            graph.replay()
        else:
            self._forward(key)
        sids_t = self.meta[1, :S]
        r.last_hidden.index_copy_(0, sids_t, self.hidden[:S])
        return self.logprobs[:S].clone(), sids_t.clone()

    def _run_first(self, key: tuple[int, int]) -> None:
        """A bucket's first run: eager, then captured if capture is on (a failure is remembered)."""
        self._forward(key)
        self.buffers[key] = None
        if self.capture:
            self._capture(key)

    def capture_all(self) -> None:
        """Captures every bucket within the key budget, largest first (so later, smaller graphs
        reuse the shared pool), over padded rows only: nothing is written to a stream's cache."""
        if not self.capture:
            return
        t0, before = time.perf_counter(), torch.cuda.memory_reserved()
        keys = [(b, k) for b in self.batch_sizes for k in self.key_sizes if b * k <= self.max_bucket_keys]
        for key in sorted(keys, key=lambda bk: -bk[0] * bk[1]):
            if key in self.buffers:
                continue
            self.meta.zero_()
            self.meta[2].fill_(-1)
            self._run_first(key)
        logger.info("llmdoctor: captured the doctor's decode step in %d buckets (%d failed) in %.1f s; "
                    "the graphs and their pool hold %.1f MiB", sum(g is not None for g in self.buffers.values()),
                    len(self.failed), time.perf_counter() - t0,
                    (torch.cuda.memory_reserved() - before) / 2**20)

    def _capture(self, key: tuple[int, int]) -> None:
        """Captures the bucket's step in a CUDA graph (after the eager run that warmed it up)."""
        t0, before = time.perf_counter(), torch.cuda.memory_reserved()
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward(key)  # a warm-up on the side stream, as torch's capture requires
                torch.cuda.current_stream().synchronize()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._forward(key)
            torch.cuda.current_stream().wait_stream(stream)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves this bucket to the packed path
            self.failed.add(key)
            logger.warning("llmdoctor: capturing the doctor's decode step for batch %d, %d keys failed (%s); "
                           "those steps run on the packed path", key[0], key[1], e)
            return
        self.buffers[key] = graph
        self.graph_bytes += torch.cuda.memory_reserved() - before
        logger.debug("llmdoctor: captured batch %d, %d keys in %.2f s", key[0], key[1], time.perf_counter() - t0)

    @torch.inference_mode()
    def _forward(self, key: tuple[int, int]) -> None:
        """The decoder over the bucket's static buffers; writes ``hidden`` and ``logprobs``."""
        r = self.runner
        d, bs = r.dec, r.block_size
        B, L = key
        ids, sid, pos, on = self.meta[:, :B]
        valid = pos >= 0
        pos = pos.clamp(min=0)
        ids = r.screen_ids(ids, sid)
        tables = r.table_dev.index_select(0, sid)  # [B, blocks]
        mask = self.kpos[:L] <= pos[:, None]  # [B, L]; a padded row sees one key
        read = tables.index_select(1, self.kblock[:L]) * bs + self.kpos[:L] % bs
        read = torch.where(mask & valid[:, None], read, r.zero_row).view(-1)
        write = torch.where(valid, tables.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs, r.sink_row)
        on = on.to(r.dtype)[:, None] if d.lora else None
        rotate = table_rotation(d, r.cos.index_select(0, pos), r.sin_signed.index_select(0, pos))
        mask = additive_mask(mask[:, None, None], r.dtype)

        def attend(li, q, kv_new):
            pool = r.kv[li]
            pool.index_copy_(0, write, kv_new)
            kv = pool.index_select(0, read).view(B, L, 2, d.num_kv_heads, d.head_dim)
            o = F.scaled_dot_product_attention(q[:, :, None], kv[:, :, 0].transpose(1, 2),
                                               kv[:, :, 1].transpose(1, 2), attn_mask=mask, scale=d.layers[li].scaling,
                                               enable_gqa=d.num_heads != d.num_kv_heads)
            return o.reshape(B, -1)

        h = forward_layers(d, d.embed(ids), rotate, on, attend)
        self.hidden[:B].copy_(h)
        self.logprobs[:B].copy_(torch.log_softmax(d.lm_head(rms_norm(d.norm, h, d.cpu_ops), on).float(), dim=-1))
