"""``llmdoctor``: the logits processor registered with vLLM, for both model runners.

vLLM has two custom-processor interfaces: V1 (``update_state`` / ``apply(logits)``; CPU, and
GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) and Model Runner V2 (``add_request`` /
``apply(logits, ctx)``; the CUDA default), whose loader rejects any entry-point class that is
not a V2 subclass. This one class is both: two thin adapters over :class:`GuidanceCore`.
Unconfigured (no ``llmdoctor`` section in ``additional_config``) it loads nothing, declines
every request under V2 and returns the logits untouched under V1.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref

import numpy as np
import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from llmdoctor_vllm.config import EngineGuidance

logger = logging.getLogger("llmdoctor_vllm")

# One steering instance per engine config in a process: vLLM builds the class twice when it is
# both installed (entry point) and named in --logits-processors.
_OWNERS: "weakref.WeakValueDictionary[int, LLMDoctorLogitsProcessor]" = weakref.WeakValueDictionary()


@functools.lru_cache(maxsize=64)
def _has_reference(path: str) -> bool:
    """Whether the checkpoint at ``path`` can serve the delta rule (read from its manifest)."""
    from llmdoctor_vllm.checkpoint import DoctorManifest

    try:
        m = DoctorManifest.read(path)
    except ValueError:
        return False
    return m.kind == "lora" or bool(m.reference)


def _frontend_guidance() -> EngineGuidance | None | bool:
    """The serving engine's guidance settings, seen from ``validate_params``.

    ``validate_params`` is a classmethod that vLLM calls with the sampling params alone, from
    vLLM's ``InputProcessor``; the engine's ``additional_config`` (which doctors exist) is
    read from that caller. Returns ``False`` when no caller holds a config (then only the
    shape of the arguments is checked here, and the worker ignores what it cannot use).
    """
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        cfg = getattr(owner, "vllm_config", None)
        if cfg is not None and hasattr(cfg, "additional_config"):
            return EngineGuidance.from_additional_config(cfg.additional_config)
        frame = frame.f_back
    return False


def active_processors() -> list["LLMDoctorLogitsProcessor"]:
    """The steering instances alive in this process (the engine's, in in-process mode)."""
    return [p for p in _OWNERS.values() if p.core is not None]


class LLMDoctorLogitsProcessor(V2LogitsProcessor, V1LogitsProcessor):
    """Steers guided requests by ``alpha * log p_patient + sum_i beta_i * log p_doctor_i``.

    Per-request weights come from ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP);
    see :mod:`llmdoctor_vllm.config` for the keys.
    """

    def __init__(self, vllm_config, device_or_req_states, is_pin_memory: bool | None = None):
        self.v2 = not isinstance(device_or_req_states, (torch.device, str))
        self.req_states = device_or_req_states if self.v2 else None
        device = device_or_req_states.device if self.v2 else device_or_req_states
        self.core = None
        engine = EngineGuidance.from_additional_config(getattr(vllm_config, "additional_config", None))
        if engine is None:
            return
        owner = _OWNERS.get(id(vllm_config))
        if owner is not None and owner.vllm_config is vllm_config:
            logger.info("llmdoctor: already active for this engine; this second instance stays idle")
            return
        from llmdoctor_vllm.core import GuidanceCore

        self.vllm_config = vllm_config
        self.core = GuidanceCore(engine, vllm_config, device)
        _OWNERS[id(vllm_config)] = self
        self.prompts: list = [None] * self.core.max_slots  # V1: live token lists per batch index
        self.outputs: list = [None] * self.core.max_slots
        self._seen = np.zeros(self.core.max_slots, dtype=bool)  # V2: slots present last step

    # -- both interfaces ---------------------------------------------------------------
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Rejects a request with bad llmdoctor arguments (the server answers HTTP 400)."""
        extra = sampling_params.extra_args or {}
        if not any(k.startswith("llmdoctor_") for k in extra):
            return
        engine = _frontend_guidance()
        if engine is None:
            raise ValueError("llmdoctor_* arguments given, but this server has no llmdoctor doctors configured")
        if engine is False:
            engine = EngineGuidance(doctors={k[len("llmdoctor_beta_"):]: "" for k in extra
                                             if k.startswith("llmdoctor_beta_")} or {"doctor": ""})
            engine.request(extra)
            return
        guidance = engine.request(extra)
        if guidance is not None:
            engine.check_delta_references(guidance, {n: _has_reference(p) for n, p in engine.doctors.items()})

    def is_argmax_invariant(self) -> bool:
        """Guidance changes which token is most likely, so greedy requests are steered too."""
        return False

    # -- V1 ----------------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.core is None or batch_update is None:
            return
        core = self.core
        for index in batch_update.removed:
            core.remove(index)
            self.prompts[index] = self.outputs[index] = None
        for index, params, prompt, output in batch_update.added:
            if core.add(index, params.extra_args):
                self.prompts[index], self.outputs[index] = prompt or [], output
                core.resumed += bool(output)  # a preempted request comes back with its output so far
            else:
                self.prompts[index] = self.outputs[index] = None
        for a, b, direction in batch_update.moved:
            swap = direction == MoveDirectionality.SWAP
            core.move(a, b, swap)
            for lst in (self.prompts, self.outputs):
                lst[a], lst[b] = (lst[b] if swap else None), lst[a]
        core.write_stats()

    def _v1_tokens(self, slots: np.ndarray, cached: np.ndarray) -> list:
        out = []
        for s, c in zip(slots.tolist(), cached.tolist()):
            p, o = self.prompts[s], self.outputs[s]
            out.append(p[c:] + o if c < len(p) else o[c - len(p):])
        return out

    # -- V2 ----------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        if self.core is None:
            return False
        self._seen[req_idx] = False
        return self.core.add(req_idx, sampling_params.extra_args)

    def apply_staged_writes(self) -> None:
        pass

    def _v2_tokens(self, ctx, rows: np.ndarray):
        """Token source over the runner's committed token table plus this step's input token."""
        slots = ctx.idx_mapping_np[rows]
        row_of = dict(zip(slots.tolist(), rows.tolist()))
        ends = ctx.seq_lens_upper_bound_np
        all_ids = self.req_states.all_token_ids.gpu

        def tokens(sl: np.ndarray, cached: np.ndarray) -> list:
            r = np.array([row_of[s] for s in sl.tolist()], dtype=np.int64)
            end = ends[r].astype(np.int64)
            width = int((end - cached).max())
            cols = np.minimum(cached[:, None] + np.arange(width)[None, :], all_ids.shape[1] - 1)
            dev = all_ids.device
            block = all_ids[torch.from_numpy(sl).to(dev)[:, None], torch.from_numpy(cols).to(dev)]
            # the last position is the token fed this step: take it from the step's inputs
            last = torch.from_numpy(end - 1 - cached).to(dev)
            block[torch.arange(len(sl), device=dev), last] = ctx.input_ids[torch.from_numpy(r).to(dev)].to(block.dtype)
            block = block.cpu().numpy()
            return [row[: e - c].tolist() for row, e, c in zip(block, end, cached)]

        return tokens

    # -- apply: both ---------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        core = self.core
        if core is None or not core.num_guided:
            return logits
        if ctx is None:  # V1: logits row i is persistent-batch index i
            rows = np.nonzero(core.guided[: logits.shape[0]])[0]
            return core.apply(logits, rows, rows, self._v1_tokens) if len(rows) else logits
        slots_by_pos = ctx.idx_mapping_np
        present = np.zeros(core.max_slots, dtype=bool)
        present[slots_by_pos] = True
        # A slot missing from this step is finished or preempted: free its doctor cache; if it
        # comes back, its streams are rebuilt from the runner's token table.
        for s in np.nonzero(self._seen & ~present & core.guided)[0]:
            core.release_streams(int(s))
        self._seen = present
        rows = np.nonzero(core.guided[slots_by_pos])[0]
        if not len(rows):
            return logits
        if logits.shape[0] != len(slots_by_pos):  # speculative decoding: rows per draft token
            logger.warning("llmdoctor: speculative decoding is not supported; this step is unguided")
            return logits
        return core.apply(logits, rows, slots_by_pos[rows], self._v2_tokens(ctx, rows))
