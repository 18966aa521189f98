"""The doctor's attention on CPU through vLLM's own paged-attention kernel.

On a CPU, vLLM runs the patient's attention with its ``cpu_attention_with_kv_cache`` kernel over a
paged cache (``cpu_attn_reshape_and_cache`` writes a step's keys and values into it). The doctor
runner uses the same two kernels where the build has them: each stream's keys are read in place
through its block table, with no per-step gather of keys into a padded batch, no mask tensor and
no tile groups; a pass is described by where each stream's queries start, how many keys each
stream has, and their block tables. On the real model this brought a LoRA doctor's decode step at
batch 32 down to the patient's own (``benchmarks/results/throughput_real.json``).

The kernel reads a whole block for the keys at its end, so a block is zeroed when a stream takes
it (:meth:`DoctorRunner._reserve`): what its last owner left (NaN included) never enters another
stream's attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

@dataclass
class PassLayout:
    """The streams of one pass as the kernel reads them (int32 tensors, built once per pass)."""

    query_start_loc: torch.Tensor  # [S + 1] where each stream's queries start in the pass
    seq_lens: torch.Tensor  # [S] keys each stream attends to (its cached tokens and this pass's)
    block_table: torch.Tensor  # [S, blocks] its block table
    scheduler: torch.Tensor  # vLLM's work split for these lengths (shared by every layer)


class CpuPagedAttention:
    """vLLM's CPU paged attention over the doctor's own block pool.

    The pool is ``[layers, blocks, kv_heads, 2 * block_size, head_dim]``: per block and head, the
    keys then the values, in the kernel's own layout (:meth:`pool_shape`).
    """

    def __init__(self, ops, isa: str, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype):
        self.ops, self.isa = ops, isa
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.dtype = block_size, dtype

    @classmethod
    def for_decoder(cls, dec, dtype, block_size: int, device: torch.device) -> "CpuPagedAttention | None":
        """The kernel for this decoder on ``device``, or ``None`` where it cannot run it (not a CPU,
        a build without the kernels, a head size or dtype it does not take)."""
        from llmdoctor_vllm.vllm_internals import cpu_attention_isa

        ops = dec.cpu_ops  # vLLM's CPU ops, where the doctor already runs on them
        if device.type != "cpu" or ops is None or not all(
                hasattr(torch.ops._C, n) for n in ("cpu_attention_with_kv_cache", "cpu_attn_reshape_and_cache")):
            return None
        isa = cpu_attention_isa(dtype, block_size, dec.head_dim)
        return None if isa is None else cls(ops, isa, dec.num_heads, dec.num_kv_heads, dec.head_dim, block_size, dtype)

    def pool_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        return (num_layers, num_blocks, self.num_kv_heads, 2 * self.block_size, self.head_dim)

    def layout(self, stream: np.ndarray, pos: np.ndarray, tables: np.ndarray) -> PassLayout:
        """The layout of a pass whose packed tokens belong to ``stream`` (one run per stream) at
        positions ``pos``; ``tables[s]`` is the block table of stream ``s``."""
        first = np.ones(len(stream), dtype=bool)
        first[1:] = stream[1:] != stream[:-1]
        starts = np.flatnonzero(first)
        bounds = np.append(starts, len(stream)).astype(np.int32)
        qsl = torch.from_numpy(bounds)
        seq = torch.from_numpy((pos[bounds[1:] - 1] + 1).astype(np.int32))
        table = torch.from_numpy(np.ascontiguousarray(tables[stream[starts]], dtype=np.int32))
        scheduler = self.ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(starts), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            seq_lens=seq, dtype=self.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=True)
        return PassLayout(qsl, seq, table, scheduler)

    def __call__(self, pool: torch.Tensor, layout: PassLayout, q: torch.Tensor, kv_new: torch.Tensor,
                 write: torch.Tensor, scale: float) -> torch.Tensor:
        """Writes the pass's keys and values (``kv_new`` ``[T, 2, kv_heads, head_dim]``) to their slots
        ``write`` in one layer's ``pool`` and returns the attention of ``q`` ``[T, heads, head_dim]``
        as ``[T, heads * head_dim]``."""
        bs = self.block_size
        keys, values = pool[:, :, :bs], pool[:, :, bs:]
        self.ops.cpu_attn_reshape_and_cache(kv_new[:, 0], kv_new[:, 1], keys, values, write, self.isa)
        out = q.new_empty((q.shape[0], self.num_heads, self.head_dim))
        self.ops.cpu_attention_with_kv_cache(
            query=q, key_cache=keys, value_cache=values, output=out, query_start_loc=layout.query_start_loc,
            seq_lens=layout.seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=layout.block_table, softcap=0.0, scheduler_metadata=layout.scheduler, s_aux=None)
        return out.view(q.shape[0], -1)
