"""The guidance logits processor registered with vLLM, for both model runners.

Public name: ``llmdoctor_vllm:GuidanceProcessor`` (class :class:`GuidanceLogitsProcessor`), the
entry point ``llmdoctor`` of the ``vllm.logits_processors`` group.

vLLM has two custom-processor interfaces: V1 (``update_state`` / ``apply(logits)``; CPU, and
GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) and Model Runner V2 (``add_request`` /
``apply(logits, ctx)``; the CUDA default), whose loader rejects any entry-point class that is
not a V2 subclass. This one class is both: two thin adapters over :class:`GuidanceCore`.
Unconfigured (no ``llmdoctor`` section in ``additional_config``) it loads nothing, declines
every request under V2 and returns the logits untouched under V1. vLLM imports this module in
its API-server process too (for ``validate_params``): the doctor runner and its model code are
imported only where a processor is built.
"""

from __future__ import annotations

import functools
import weakref

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from llmdoctor_vllm.config import GuidanceConfigError, engine_guidance
from llmdoctor_vllm.device import to_device
from llmdoctor_vllm.frontend import check_request
from llmdoctor_vllm.vllm_internals import engine_config_of_caller, finished_slot_source, is_last_pipeline_stage

PUBLIC_NAME = "llmdoctor_vllm:GuidanceProcessor"  # what --logits-processors takes

logger = init_logger("vllm.llmdoctor")

# One steering instance per engine config in a process: vLLM builds the class twice when it is
# both installed (entry point) and named in --logits-processors.
_OWNERS: "weakref.WeakValueDictionary[int, GuidanceLogitsProcessor]" = weakref.WeakValueDictionary()


def active_processors() -> list["GuidanceLogitsProcessor"]:
    """The steering instances alive in this process (the engine's, in in-process mode)."""
    return [p for p in _OWNERS.values() if p.core is not None]


@functools.lru_cache(maxsize=None)
def _resolve(name: str):
    import importlib

    module, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # noqa: BLE001 - a name vLLM resolves itself, or fails on, at start
        return None


def _named(processors) -> bool:
    """Whether ``--logits-processors`` names this class (then vLLM fills in async placeholders)."""
    for p in processors or ():
        cls = p if isinstance(p, type) else _resolve(str(p))
        if isinstance(cls, type) and issubclass(cls, GuidanceLogitsProcessor):
            return True
    return False


def check_engine(vllm_config, v2: bool) -> None:
    """Refuses, at engine start, the engine features under which guidance cannot be trusted.

    (V1 with speculative decoding never builds the processor, so never reaches this: there the
    front end refuses every request that would be guided, see :func:`~llmdoctor_vllm.frontend.check_request`.)
    """
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise GuidanceConfigError("llmdoctor: guidance does not support speculative decoding (the doctor would "
                                  "have to score every draft token); start the server without a speculative config, "
                                  "or without llmdoctor doctors")
    sched = vllm_config.scheduler_config
    if not v2 and getattr(sched, "async_scheduling", False) and not _named(vllm_config.model_config.logits_processors):
        raise GuidanceConfigError(
            "llmdoctor: vLLM's V1 model runner with async scheduling hands logits processors placeholder (-1) "
            f"tokens unless the processor is named on the command line; add `--logits-processors {PUBLIC_NAME}` "
            f"(or LLM(logits_processors=['{PUBLIC_NAME}'])), or turn async scheduling off with "
            "--no-async-scheduling")


class GuidanceLogitsProcessor(V2LogitsProcessor, V1LogitsProcessor):
    """Steers guided requests by ``alpha * log p_patient + sum_i beta_i * log p_doctor_i``.

    Per-request weights come from ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP);
    see :mod:`llmdoctor_vllm.config` for the keys. Public name: ``llmdoctor_vllm:GuidanceProcessor``.
    """

    def __init__(self, vllm_config, device_or_req_states, is_pin_memory: bool | None = None):
        self.v2 = not isinstance(device_or_req_states, (torch.device, str))
        self.req_states = device_or_req_states if self.v2 else None
        device = device_or_req_states.device if self.v2 else device_or_req_states
        self.core = None
        engine = engine_guidance(vllm_config)
        if engine is None:
            return
        check_engine(vllm_config, self.v2)
        if not is_last_pipeline_stage():
            logger.info("llmdoctor: not the last pipeline stage; no doctor is loaded here")
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
        self.params: list = [None] * self.core.max_slots  # V1: each request's SamplingParams (its identity)
        self._finished = finished_slot_source(self.req_states) if self.v2 else None
        if self.v2 and self._finished is None:
            logger.warning("llmdoctor: cannot see which request slots this vLLM's model runner freed; a finished "
                           "request's doctor cache is freed when its slot is reused or memory runs short")

    # -- both interfaces ---------------------------------------------------------------
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Rejects a request this engine cannot serve as asked (the server answers HTTP 400)."""
        check_request(sampling_params.extra_args, engine_config_of_caller())

    def is_argmax_invariant(self) -> bool:
        """Guidance changes which token is most likely, so greedy requests are steered too."""
        return False

    # -- V1 ----------------------------------------------------------------------------
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.core is None or batch_update is None:
            return
        core = self.core
        for index in batch_update.removed:
            # finished, preempted or only left out of this step: keep its caches for a while, under
            # its SamplingParams (vLLM keeps that object across re-adds; the output list it replaces)
            if core.guided[index]:
                params = self.params[index]
                core.park(index, id(params), keepalive=params, tokens=self.prompts[index] + self.outputs[index])
            self.prompts[index] = self.outputs[index] = self.params[index] = None
        for index, params, prompt, output in batch_update.added:
            if core.add(index, params.extra_args):
                self.prompts[index], self.outputs[index], self.params[index] = prompt or [], output, params
                core.adopt(index, id(params), self.prompts[index] + output)  # its caches, if it sat out some steps
                core.resumed += bool(output)  # a preempted request comes back with its output so far
            else:
                self.prompts[index] = self.outputs[index] = self.params[index] = None
        for a, b, direction in batch_update.moved:
            swap = direction == MoveDirectionality.SWAP
            core.move(a, b, swap)
            for lst in (self.prompts, self.outputs, self.params):
                lst[a], lst[b] = (lst[b] if swap else None), lst[a]
        core.expire_parked()
        core.write_stats()

    def _v1_tokens(self, slots: np.ndarray, cached: np.ndarray) -> tuple:
        """Each slot's tokens past ``cached``, from vLLM's live prompt and output lists."""
        runs = []
        for s, c in zip(slots.tolist(), cached.tolist()):  # vLLM hands these over as Python lists
            p, o = self.prompts[s], self.outputs[s]
            runs.append(p[c:] + o if c < len(p) else o[c - len(p):])
        counts = np.fromiter(map(len, runs), dtype=np.int64, count=len(runs))
        ids = np.fromiter((t for r in runs for t in r), dtype=np.int64, count=int(counts.sum()))
        if (ids < 0).any():
            from llmdoctor_vllm.core import UnservableRequests

            bad = np.repeat(slots, counts)[ids < 0]
            raise UnservableRequests(np.unique(bad), "vLLM handed placeholder (-1) tokens to the doctor "
                                                     "(async scheduling without --logits-processors)")
        return counts, ids

    # -- V2 ----------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        if self.core is None:
            return False
        guided = self.core.add(req_idx, sampling_params.extra_args)
        if guided:
            rs = self.req_states
            prefill, prompt = getattr(rs, "prefill_len", None), getattr(rs, "prompt_len", None)
            if prefill is not None and prompt is not None:  # resumed after preemption: output so far is refed
                self.core.resumed += bool(prefill.np[req_idx] > prompt.np[req_idx])
        return guided

    def apply_staged_writes(self) -> None:
        """Every step: frees the doctor caches of the requests the runner finished or preempted."""
        if self.core is None or self._finished is None:
            return
        gone = self._finished()
        gone = gone[self.core.guided[gone]]
        if len(gone):
            for slot in gone.tolist():
                self.core.remove(slot)
            self.core.write_stats()

    def _v2_tokens(self, ctx, rows: np.ndarray):
        """Token source over the runner's committed token table, on the device (no host sync)."""
        row_of_slot = np.full(self.core.max_slots, -1, dtype=np.int64)
        row_of_slot[ctx.idx_mapping_np[rows]] = rows
        all_ids = self.req_states.all_token_ids.gpu

        def tokens(sl: np.ndarray, cached: np.ndarray) -> tuple:
            r = row_of_slot[sl]
            counts = np.maximum(ctx.seq_lens_upper_bound_np[r].astype(np.int64) - cached, 0)
            starts = np.repeat(np.cumsum(counts) - counts, counts)
            pos = np.repeat(cached, counts) + np.arange(int(counts.sum())) - starts
            dev = all_ids.device
            ids = all_ids[to_device(np.repeat(sl, counts), dev), to_device(pos, dev)]
            # the token fed this step (sampled last step) is certain in the step's inputs
            fed = counts > 0
            last = to_device((np.cumsum(counts) - 1)[fed], dev)
            ids[last] = ctx.input_ids[to_device(r[fed], dev)].to(ids.dtype)
            return counts, ids

        return tokens

    # -- apply: both ---------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        core = self.core
        if core is None or not core.num_guided:
            return logits
        if ctx is None:  # V1: logits row i is persistent-batch index i
            rows = np.nonzero(core.guided[: logits.shape[0]])[0]
            return core.apply(logits, rows, rows, self._v1_tokens) if len(rows) else logits
        if logits.shape[0] != len(ctx.idx_mapping_np):  # rows per draft token: refused at start
            logger.warning_once("llmdoctor: a step with speculative rows reached the plugin; left unguided")
            return logits
        rows = np.nonzero(core.guided[ctx.idx_mapping_np])[0]
        if not len(rows):
            return logits
        return core.apply(logits, rows, ctx.idx_mapping_np[rows], self._v2_tokens(ctx, rows))


GuidanceProcessor = GuidanceLogitsProcessor
