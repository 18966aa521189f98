"""The bookkeeping of a baseline processor: which slots are active, and vLLM's batch updates."""

from __future__ import annotations

import logging

import numpy as np
from vllm.v1.sample.logits_processor.interface import BatchUpdate, LogitsProcessor, MoveDirectionality

from benchmarks.quality.baselines import move_slot

logger = logging.getLogger("llmdoctor_vllm")


class SlotProcessor(LogitsProcessor):
    """A V1 processor whose requests live in per-slot arrays: ``active``, a ``count`` of active
    slots (zero: ``apply`` returns at once), and the arrays that move with a request.

    Subclasses set ``name``, implement ``parse_request`` (None: not theirs; ValueError: malformed,
    which ``validate_params`` turns into HTTP 400) and ``_add``; ``_slot_arrays`` lists what moves.
    """

    name = "baseline"

    def __init__(self, slots: int):
        self.active = np.zeros(slots, dtype=bool)
        self.count = 0

    @classmethod
    def parse_request(cls, extra: dict | None):
        raise NotImplementedError

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Rejects malformed arguments (ValueError: HTTP 400)."""
        cls.parse_request(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        """The baselines change which token wins, so greedy requests are steered too."""
        return False

    def _slot_arrays(self) -> tuple:
        return (self.active,)

    def _add(self, slot: int, req, output: list) -> None:
        raise NotImplementedError

    def _remove(self, slot: int) -> None:
        if self.active[slot]:
            self.active[slot] = False
            self.count -= 1

    def _parse_added(self, params):
        try:
            return self.parse_request(params.extra_args)
        except ValueError as e:  # only reachable without the front end's validate_params
            logger.warning("%s: request not handled: %s", self.name, e)
            return None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for slot in batch_update.removed:
            self._remove(slot)
        for slot, params, _, output in batch_update.added:
            self._remove(slot)
            req = self._parse_added(params)
            if req is not None:
                self._add(slot, req, output)
        for a, b, direction in batch_update.moved:
            self._move(a, b, direction == MoveDirectionality.SWAP)

    def _move(self, a: int, b: int, swap: bool) -> None:
        """``a`` -> ``b``; a one-way move drops ``b``'s occupant and leaves ``a`` empty."""
        if not swap:
            self._remove(b)
        move_slot(self._slot_arrays(), a, b, swap)
        if not swap:
            self.active[a] = False
