"""Every place the plugin reaches past vLLM's public logits-processor interface, in one module.

A vLLM upgrade has one file to check. Each function degrades to ``None`` (or does nothing) when
the private structure it reads is not there, and its caller says in the log what it then cannot do.
``tests/test_frontend.py`` and ``tests/test_v2_replay.py`` pin them against the installed vLLM.

- :func:`engine_config_of_caller`: ``validate_params`` is a classmethod given only the sampling
  params; the engine's config is found on vLLM's ``InputProcessor`` up the call stack.
- :func:`finished_slot_source`: Model Runner V2 has no removal hook; the runner's
  ``RequestState.free_indices`` (its free list of slots) is found through the token table it
  shares with the processor's view (``gc.get_referrers``).
- :func:`join_output_thread`: the multi-process client's ``engine_core.output_queue_thread``.
- :func:`is_last_pipeline_stage`: vLLM's pipeline-parallel group.
- :func:`tensor_parallel_agreement`: vLLM's tensor-parallel group and its CPU process group.
- :func:`cpu_attention_isa`: the CPU attention backend's choice of kernel variant.
"""

from __future__ import annotations

import gc
import sys
from typing import Callable

import numpy as np


def engine_config_of_caller(max_depth: int = 32):
    """The ``VllmConfig`` of the ``InputProcessor`` up the call stack, or ``None``.

    vLLM's ``InputProcessor`` runs ``validate_params`` for both model runners (V1:
    ``validate_logits_processors_parameters``; V2: the closure of
    ``build_custom_logits_processors_params_validator``).
    """
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:  # pragma: no cover - a vLLM without it
        return None
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, InputProcessor):
            return owner.vllm_config
        frame = frame.f_back
    return None


def _owner_of(table) -> object | None:
    """The object (other than the processor's view) whose attributes hold ``table`` and a free list.

    CPython reports an instance as the referrer of its attribute values, or its ``__dict__``
    once that dict has been materialised; both are looked at.
    """
    if table is None:
        return None
    for ref in gc.get_referrers(table):
        owners = gc.get_referrers(ref) if isinstance(ref, dict) else [ref]
        for owner in owners:
            free = getattr(owner, "free_indices", None)
            if getattr(owner, "all_token_ids", None) is table and isinstance(free, list):
                return owner
    return None


def finished_slot_source(req_states) -> Callable[[], np.ndarray] | None:
    """A function returning the slots Model Runner V2 holds free now, or ``None`` if they cannot be seen.

    MRV2 tells a processor when a request enters a slot (``add_request``) but not when it leaves:
    a finished or preempted request's slot just drops out of the batch until it is reused, like a
    request left out of one step. The runner's ``RequestState`` knows (its ``free_indices``); the
    processor is given only a view of it, so it is found once, at start, as the object that owns
    the same token table.
    """
    state = _owner_of(getattr(req_states, "all_token_ids", None))
    if state is None:
        return None

    def free_slots() -> np.ndarray:
        free = state.free_indices
        return np.fromiter(free, dtype=np.int64, count=len(free))

    return free_slots


def join_output_thread(engine_core, timeout: float = 30) -> None:
    """Waits for the multi-process client's output thread (absent in-process: nothing to wait for)."""
    thread = getattr(engine_core, "output_queue_thread", None)
    if thread is not None:
        thread.join(timeout=timeout)


def is_last_pipeline_stage() -> bool:
    """Whether this worker is the last pipeline stage (the one that samples); true without
    distributed state (a bare harness)."""
    try:
        from vllm.distributed import get_pp_group

        return get_pp_group().is_last_rank
    except (AssertionError, ImportError, AttributeError):
        return True


def tensor_parallel_agreement() -> Callable[[np.ndarray], np.ndarray] | None:
    """A function that ANDs a vector of per-row flags over this worker's tensor-parallel ranks, or
    ``None`` without tensor parallelism. It all-reduces over vLLM's CPU (gloo) group of the tensor-
    parallel ranks, so it waits for the other ranks but never for the device."""
    try:
        import torch.distributed as dist
        from vllm.distributed import get_tp_group

        group = get_tp_group()
    except (AssertionError, ImportError, AttributeError):
        return None
    cpu_group = getattr(group, "cpu_group", None)
    if getattr(group, "world_size", 1) <= 1 or cpu_group is None:
        return None

    def agree(flags: np.ndarray) -> np.ndarray:
        import torch

        out = torch.from_numpy(np.ascontiguousarray(flags, dtype=np.uint8))
        dist.all_reduce(out, op=dist.ReduceOp.MIN, group=cpu_group)
        return out.numpy().astype(bool)

    return agree


def pipeline_stages(vllm_config) -> int:
    """How many pipeline stages the engine runs (how many micro-batches take turns at the sampler)."""
    return max(1, int(getattr(getattr(vllm_config, "parallel_config", None), "pipeline_parallel_size", 1) or 1))


def cpu_attention_isa(dtype, block_size: int, head_dim: int) -> str | None:
    """The instruction set vLLM's CPU attention backend picks for this cache (its ``_get_attn_isa``),
    or ``None`` where this vLLM has no such backend or it takes no such head size or dtype."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa
    except ImportError:
        return None
    if head_dim not in CPUAttentionBackend.get_supported_head_sizes() or \
            dtype not in CPUAttentionBackend.supported_dtypes:
        return None
    try:
        return _get_attn_isa(dtype, block_size, head_dim)
    except (NotImplementedError, ValueError):
        return None
