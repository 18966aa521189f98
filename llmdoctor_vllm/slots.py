"""Per-slot request state, kept as vLLM's ``MinPLogitsProcessor`` keeps its own.

One record per batch slot in one pinned host array (a numpy structured view, one view per
field), changed only when the batch changes; the fields the device step reads (``alpha`` and
``log(patient_min_p)``) mirrored to the device when they changed; one :meth:`SlotState.move`
for vLLM's moves and swaps. The flags that only the device knows (a row whose doctor could not
guide it) live on the device and move with their slot there.
"""

from __future__ import annotations

import numpy as np
import torch


def _record(num_doctors: int) -> np.dtype:
    n = max(1, num_doctors)
    return np.dtype([
        ("guided", np.bool_),
        ("delta", np.bool_),  # the delta rule: doctor minus its reference
        ("alpha", np.float32),
        ("patient_min_p", np.float32),  # 0: the full vocabulary
        ("betas", np.float32, (n,)),
        ("streams", np.int64, (n,)),  # each doctor's stream id, -1 when none
        ("ref_streams", np.int64, (n,)),  # each doctor's reference stream id (delta rule), -1 when none
        ("generation", np.int64),  # which request holds the slot: a number no other request had, 0 when none
        ("last_used", np.int64),  # the step that last fed its doctor caches
    ])


class SlotState:
    """The per-slot state of one engine worker's guided requests (see the module docstring)."""

    def __init__(self, max_slots: int, num_doctors: int, device: torch.device):
        self.device = torch.device(device)
        dtype = _record(num_doctors)
        pin = self.device.type == "cuda"
        self._buffer = torch.zeros(max_slots * dtype.itemsize, dtype=torch.uint8, pin_memory=pin)
        self.table = self._buffer.numpy().view(dtype)
        # the fields as numpy views of the table: state.streams[slot, d], state.guided[slots]
        self.guided, self.delta, self.alpha = self.table["guided"], self.table["delta"], self.table["alpha"]
        self.patient_min_p, self.betas = self.table["patient_min_p"], self.table["betas"]
        self.streams, self.ref_streams = self.table["streams"], self.table["ref_streams"]
        self.generation, self.last_used = self.table["generation"], self.table["last_used"]
        self.clear(np.arange(max_slots))
        # alpha and log(patient_min_p) per slot, on the device
        self.weights = torch.zeros((max_slots, 2), device=self.device)
        self.blocked = torch.zeros(max_slots, dtype=torch.bool, device=self.device)  # no guidance possible
        self._dirty = True
        self.version = 0  # changes whenever a slot's request or weights change (per-batch caches key on it)

    def clear(self, slots) -> None:
        """Empties ``slots`` (host only)."""
        rec = self.table[slots]
        rec["guided"], rec["delta"], rec["alpha"], rec["patient_min_p"], rec["betas"] = False, False, 1.0, 0.0, 0.0
        rec["streams"], rec["ref_streams"], rec["generation"], rec["last_used"] = -1, -1, 0, 0
        self.table[slots] = rec
        self.version = getattr(self, "version", 0) + 1

    def assign(self, slot: int, guidance, generation: int) -> None:
        """Gives ``slot`` to a new guided request."""
        t = self.table
        t["guided"][slot], t["delta"][slot], t["alpha"][slot] = True, guidance.delta, guidance.alpha
        t["patient_min_p"][slot], t["betas"][slot] = guidance.patient_min_p, guidance.betas
        t["streams"][slot] = t["ref_streams"][slot] = -1
        t["generation"][slot] = generation
        self.blocked[slot] = False
        self._dirty = True
        self.version += 1

    def move(self, a: int, b: int, swap: bool) -> None:
        """The request at ``a`` moves to ``b``; with ``swap``, ``b``'s moves to ``a``, else ``a`` empties."""
        t = self.table
        t[[a, b]] = t[[b, a]]
        held = self.blocked[b].clone()
        self.blocked[b] = self.blocked[a]
        self.blocked[a] = held
        if not swap:
            self.clear([a])
            self.blocked[a] = False
        self._dirty = True
        self.version += 1

    def device_weights(self) -> torch.Tensor:
        """``[max_slots, 2]`` alpha and log(patient_min_p) on the device, refreshed if they changed."""
        if self._dirty:
            host = np.empty(self.weights.shape, dtype=np.float32)
            host[:, 0] = self.table["alpha"]
            with np.errstate(divide="ignore"):
                host[:, 1] = np.log(self.table["patient_min_p"])
            from llmdoctor_vllm.device import to_device

            self.weights.copy_(to_device(host, self.device), non_blocking=True)
            self._dirty = False
        return self.weights
