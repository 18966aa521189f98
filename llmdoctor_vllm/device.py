"""Host arrays onto the doctor's device without a host sync."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without a host sync: on CUDA through (cached) pinned memory and a
    non-blocking copy, as vLLM's own per-step index tensors go."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def to_device_many(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Several integer host arrays on ``device`` as int64 tensors of their shapes, in one transfer
    (one pinned buffer, one copy) on CUDA: a step's index tensors cost one upload, not one each."""
    arrays = [np.asarray(a, dtype=np.int64) for a in arrays]
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    flat = to_device(np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.int64), device)
    out, start = [], 0
    for a in arrays:
        out.append(flat[start:start + a.size].view(a.shape))
        start += a.size
    return out
