"""Which request slots Model Runner V2 has freed: the removal hook its interface lacks.

MRV2 tells a logits processor about a request when it enters a slot (``add_request``) but not
when it leaves: a finished or preempted request's slot just drops out of the batch until it is
reused, exactly like a request the scheduler left out of one step (or that sits in another
pipeline micro-batch). Freeing doctor caches on absence would rebuild them needlessly; keeping
them until reuse would hold memory and count finished requests as guided. The runner's
``RequestState`` knows (its ``free_indices``); the processor is given only a view of it, so it
is found once, at start, as the object that owns the same token table.
"""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np


def _owner_of(table) -> object | None:
    """The object (other than the processor's view) whose attributes hold ``table``.

    CPython reports an instance as the referrer of its attribute values, or its ``__dict__``
    once that dict has been materialised; both are looked at.
    """
    for ref in gc.get_referrers(table):
        owners = gc.get_referrers(ref) if isinstance(ref, dict) else [ref]
        for owner in owners:
            if getattr(owner, "all_token_ids", None) is table and isinstance(getattr(owner, "free_indices", None), list):
                return owner
    return None


def finished_slot_source(req_states) -> Callable[[], np.ndarray] | None:
    """A function returning the slots free in the runner now, or ``None`` if they cannot be seen."""
    state = _owner_of(getattr(req_states, "all_token_ids", None))
    if state is None:
        return None

    def free_slots() -> np.ndarray:
        free = state.free_indices
        return np.fromiter(free, dtype=np.int64, count=len(free))

    return free_slots
