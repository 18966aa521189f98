"""vLLM settings for the real model on a small CPU, shared by the pair sampler, the demo and the tests."""

from __future__ import annotations

import os

# float32 as converted; eager (no compilation: the engine starts in seconds); a KV cache sized for
# short chat replies (SmolLM2 keeps about 46 KiB per token in float32); no chunked prefill, because a
# seeded request whose prompt is split over steps fails on the CPU build ("CPU Generator does not use offset")
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=1 << 30, seed=0,
              enable_chunked_prefill=False, max_num_batched_tokens=8192)
MAX_TOKENS = 64  # "two sentences" fit; longer replies are cut here


def engine_kwargs(**overrides) -> dict:
    """``vllm.LLM`` keyword arguments for the real model: :data:`ENGINE` with ``overrides``."""
    return {**ENGINE, **overrides}


def in_process() -> None:
    """Runs vLLM's engine core in this process (it starts in seconds instead of spawning a worker)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def conversation(prompt: str) -> list[dict]:
    """``prompt`` as the one user turn of a chat (the patient's chat template adds its own system message)."""
    return [{"role": "user", "content": prompt}]
