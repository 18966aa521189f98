"""The guidance core shared by the V1 and Model Runner V2 adapters.

It holds per-slot request parameters in CPU arrays (as vLLM's built-in processors do), the
doctors' runners, and the step that runs every doctor once over all guided rows and combines
its log-probabilities with the patient's. The adapters only translate their interface's
batch bookkeeping into ``add`` / ``remove`` / ``move`` and ``apply(logits, rows, slots)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vllm.logger import init_logger

from llmdoctor_vllm.checkpoint import DoctorCheckpointError, load_doctor
from llmdoctor_vllm.combine import combine
from llmdoctor_vllm.config import EngineGuidance, GuidanceConfigError
from llmdoctor_vllm.runner import DoctorCacheFull, DoctorRunner, to_device

logger = init_logger("vllm.llmdoctor")  # under vLLM's logger tree, so INFO lines print where vLLM's do

PARK_STEPS = 64  # a request left out of the batch keeps its doctor caches this many steps

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# new_tokens(slots, cached) -> (counts, ids): for each slot, how many token ids it has after the
# first ``cached`` ones, and all of those ids end to end (a host array, or a tensor on the device)
TokenSource = Callable[[np.ndarray, np.ndarray], tuple]


@dataclass
class _Doctor:
    """One configured doctor: its runner, and where its delta-rule reference comes from."""

    name: str
    runner: DoctorRunner
    ref_runner: DoctorRunner | None  # a full doctor's reference weights
    lora: bool

    @property
    def has_reference(self) -> bool:
        return self.lora or self.ref_runner is not None


class _DoctorFault(RuntimeError):
    """Doctor ``doctor``'s forward raised ``error``."""

    def __init__(self, doctor: int, error: Exception):
        super().__init__(str(error))
        self.doctor, self.error = doctor, error


class UnservableRequests(RuntimeError):
    """A token source cannot give the doctor these requests' tokens; they continue unguided."""

    def __init__(self, slots: np.ndarray, reason: str):
        super().__init__(reason)
        self.slots, self.reason = slots, reason


class GuidanceCore:
    """Slot state, doctor runners and the combine step for one engine worker."""

    def __init__(self, engine: EngineGuidance, vllm_config, device: torch.device):
        from transformers import AutoTokenizer

        mc = vllm_config.model_config
        self.engine = engine
        self.device = torch.device(device)
        self.max_slots = vllm_config.scheduler_config.max_num_seqs
        dtype = _DTYPES[engine.dtype] if engine.dtype else mc.dtype
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code)
        self.valid_vocab = len(tok)
        max_len = mc.max_model_len
        # more than every slot's whole context (plus parked requests) could never be used
        budget = min(engine.cache_tokens or min(self.max_slots * max_len, 131072), 2 * self.max_slots * max_len)
        self.doctors: list[_Doctor] = []
        for name, path in engine.doctors.items():
            loaded = load_doctor(path, device=self.device, dtype=dtype, patient_tokenizer=tok)
            if engine.rule == "delta" and not (loaded.is_lora or loaded.reference_model is not None):
                raise DoctorCheckpointError(path, "the delta rule needs a reference, and this full doctor's "
                                                  "manifest names none (set 'reference' or use rule 'product')")

            # stream ids for every slot, twice: a request the scheduler left out of a step keeps its
            # cache (parked) while its slot is reused
            streams = 2 * self.max_slots
            try:
                ref = self._runner(loaded.reference_model, budget, streams, max_len, dtype) \
                    if loaded.reference_model is not None else None
                main = self._runner(loaded.model, budget, 2 * streams if loaded.is_lora else streams, max_len, dtype)
            except GuidanceConfigError:
                raise
            except ValueError as e:  # an architecture the runner cannot drive
                raise DoctorCheckpointError(path, str(e).removeprefix("llmdoctor: ")) from None
            self.doctors.append(_Doctor(name, main, ref, loaded.is_lora))
            logger.info("llmdoctor: doctor %r from %s (%s, KV pool %.1f MiB)", name, path, loaded.manifest.kind,
                        main.kv_bytes / 2**20)
        n = len(self.doctors)
        self.guided = np.zeros(self.max_slots, dtype=bool)
        self.alpha = np.ones(self.max_slots, dtype=np.float32)
        self.betas = np.zeros((self.max_slots, n), dtype=np.float32)
        self.delta = np.zeros(self.max_slots, dtype=bool)
        self.patient_min_p = np.zeros(self.max_slots, dtype=np.float32)  # 0: the full vocabulary
        self.streams = np.full((self.max_slots, n), -1, dtype=np.int64)
        self.ref_streams = np.full((self.max_slots, n), -1, dtype=np.int64)
        self.num_guided = 0
        self.resumed = 0  # guided requests re-added after preemption
        # which request holds a slot: a number no other request had, 0 when none
        self.generation = np.zeros(self.max_slots, dtype=np.int64)
        self._next_generation = 0
        # alpha and log(patient_min_p) per slot on the device, refreshed from the host arrays when a
        # request comes or goes
        self.alpha_dev = torch.ones(self.max_slots, device=self.device)
        self.log_min_p_dev = torch.full((self.max_slots,), float("-inf"), device=self.device)
        self._weights_dirty = False
        self._pending_nan: list = []  # (flags on the host, slots, generations, event): read a step later
        self.parked: dict = {}  # key -> (caches, step parked): requests left out of a step
        self.steps = 0
        # For operators and the soak test: occupancy written to this file when the batch changes.
        self.stats_path = os.environ.get("LLMDOCTOR_STATS_FILE")

    def _runner(self, model, budget: int, streams: int, max_len: int, dtype) -> DoctorRunner:
        e = self.engine
        try:
            runner = DoctorRunner(model, device=self.device, dtype=dtype, cache_tokens=budget, max_streams=streams,
                                  max_len=max_len, block_size=e.block_size, max_pass_tokens=e.prefill_chunk_tokens)
            if e.cuda_graphs and self.device.type == "cuda":
                runner.enable_static_decode(max_batch=streams, capture=True)
            elif e.cuda_graphs:
                logger.warning_once("llmdoctor: cuda_graphs is set but the doctor runs on %s; it runs eagerly",
                                    self.device)
            return runner
        except (RuntimeError, MemoryError) as err:  # torch's OutOfMemoryError is a RuntimeError
            raise GuidanceConfigError(f"llmdoctor cache_tokens={budget}: cannot allocate the doctor's KV pool on "
                                      f"{self.device} ({err}); lower cache_tokens") from None

    # -- batch bookkeeping -------------------------------------------------------------
    def add(self, slot: int, extra_args: dict | None) -> bool:
        """(Re)initialises ``slot`` for a new request; returns whether it is guided."""
        self.remove(slot)
        try:
            g = self.engine.request(extra_args)
            if g is not None:
                self.engine.check_delta_references(g, {d.name: d.has_reference for d in self.doctors})
        except ValueError as e:  # validate_params let it through (e.g. no front-end check)
            logger.warning("llmdoctor: request not guided: %s", e)
            g = None
        if g is None:
            return False
        self.guided[slot] = True
        self.alpha[slot], self.betas[slot], self.delta[slot] = g.alpha, g.betas, g.delta
        self.patient_min_p[slot] = g.patient_min_p
        self._weights_dirty = True
        self._next_generation += 1
        self.generation[slot] = self._next_generation
        self.num_guided += 1
        return True

    def remove(self, slot: int) -> None:
        """Forgets the slot's request and frees its doctor caches."""
        if not self.guided[slot]:
            return
        self.release_streams(slot)
        self.guided[slot] = False
        self.generation[slot] = 0
        self.num_guided -= 1

    def park(self, slot: int, key, keepalive=None) -> None:
        """Unguides ``slot`` but keeps its doctor caches under ``key`` for :meth:`adopt`.

        For a request the scheduler left out of a step: its caches hold its tokens so far, so
        when it comes back (even after preemption: the same tokens) nothing is recomputed. Parked
        caches are freed under memory pressure, after ``PARK_STEPS`` steps, or when no guided
        request is left. ``keepalive`` is held while parked (the object ``key`` is the id of, so
        the id cannot be reused by another request meanwhile).
        """
        held = self.streams[slot].copy(), self.ref_streams[slot].copy()
        self.streams[slot] = self.ref_streams[slot] = -1
        self.remove(slot)
        if (held[0] >= 0).any() or (held[1] >= 0).any():
            self.parked[key] = (held, self.steps, keepalive)

    def adopt(self, slot: int, key) -> bool:
        """Gives the guided ``slot`` the caches parked under ``key``; whether there were any."""
        entry = self.parked.pop(key, None)
        if entry is None:
            return False
        self.streams[slot], self.ref_streams[slot] = entry[0]
        return True

    def expire_parked(self) -> None:
        """Frees parked caches older than ``PARK_STEPS`` steps, or all once no request is guided."""
        old = [k for k, (_, step, _) in self.parked.items() if not self.num_guided or self.steps - step > PARK_STEPS]
        for key in old:
            self.free(self.parked.pop(key)[0])

    def evict_parked(self) -> bool:
        """Frees every parked cache (memory pressure); whether there were any."""
        keys = list(self.parked)
        for key in keys:
            self.free(self.parked.pop(key)[0])
        return bool(keys)

    def free(self, held: tuple[np.ndarray, np.ndarray]) -> None:
        """Frees caches that :meth:`park` kept."""
        for d, doc in enumerate(self.doctors):
            if held[0][d] >= 0:
                doc.runner.free_stream(int(held[0][d]))
            if held[1][d] >= 0:
                (doc.runner if doc.lora else doc.ref_runner).free_stream(int(held[1][d]))

    def release_streams(self, slot: int) -> None:
        """Frees the slot's doctor caches; a still-guided slot rebuilds them at its next step."""
        self.free((self.streams[slot], self.ref_streams[slot]))
        self.streams[slot] = -1
        self.ref_streams[slot] = -1

    def move(self, a: int, b: int, swap: bool) -> None:
        """Request at ``a`` moves to ``b`` (and ``b``'s to ``a`` if ``swap``).

        A one-way move replaces ``b``'s occupant, which vLLM reports removed this way only.
        """
        if not swap:
            self.remove(b)
        self._weights_dirty = True
        arrays = (self.guided, self.alpha, self.betas, self.delta, self.patient_min_p, self.streams, self.ref_streams,
                  self.generation)
        for arr in arrays:
            tmp = arr[b].copy()
            arr[b] = arr[a]
            if swap:
                arr[a] = tmp
        if not swap:
            self.guided[a] = False
            self.streams[a] = -1
            self.ref_streams[a] = -1
            self.generation[a] = 0

    def write_stats(self) -> None:
        """Writes :meth:`occupancy` to ``$LLMDOCTOR_STATS_FILE`` (atomically), if it is set."""
        if not self.stats_path:
            return
        tmp = f"{self.stats_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**self.occupancy(), "resumed": self.resumed, "pid": os.getpid()}, f)
        os.replace(tmp, self.stats_path)

    def occupancy(self) -> dict:
        """Live guided slots and the doctors' cache use; all zero once no request is guided."""
        out = {"guided_requests": int(self.num_guided)}
        for doc in self.doctors:
            streams, blocks = doc.runner.occupancy()
            if doc.ref_runner is not None:
                s2, b2 = doc.ref_runner.occupancy()
                streams, blocks = streams + s2, blocks + b2
            out[doc.name] = {"streams": streams, "blocks": blocks}
        return out

    # -- the step ----------------------------------------------------------------------
    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, rows: np.ndarray, slots: np.ndarray, new_tokens: TokenSource) -> torch.Tensor:
        """Reshapes ``logits[rows]`` (the guided requests at ``slots``) in place.

        vLLM gives a logits processor no way to fail one request, so a request whose doctor
        cannot serve it (cache full, a failing or non-finite doctor forward) goes on unguided,
        and the reason is logged; the engine and the other requests are not affected. The step
        stays on the device: a row whose doctor returned NaN is sampled from the patient alone in
        that step and unguided once the flags reach the host (next step on a GPU).
        """
        self.steps += 1
        if self._unguide_nan_rows():
            keep = self.guided[slots]
            rows, slots = rows[keep], slots[keep]
            if not len(rows):
                return logits
        done: dict = {}  # doctor -> (slots, weighted log-probs) already computed in this step
        for _ in range(len(self.doctors) + 2):  # drop what cannot be served, then retry the rest
            try:
                terms = self._doctor_terms(slots, new_tokens, done)
                break
            except DoctorCacheFull as full:
                self._drop_streams(full, slots)
            except UnservableRequests as e:
                self._unguide(e.slots, e.reason)
            except _DoctorFault as fault:  # a doctor fault must not take the engine down
                hit = slots[self.betas[slots, fault.doctor] > 0]
                self._unguide(hit, f"doctor {self.doctors[fault.doctor].name!r} failed ({fault.error!r})")
            keep = self.guided[slots]
            rows, slots = rows[keep], slots[keep]
            if not len(rows):
                return logits
        else:
            return logits
        if terms is None:
            return logits
        dev = logits.device
        if self._weights_dirty:
            self.alpha_dev.copy_(to_device(self.alpha, dev), non_blocking=True)
            with np.errstate(divide="ignore"):
                self.log_min_p_dev.copy_(to_device(np.log(self.patient_min_p), dev), non_blocking=True)
            self._weights_dirty = False
        bad = torch.isnan(terms).any(dim=1)
        self._watch_nan(bad, slots)
        slots_t = to_device(slots, dev)
        alpha = self.alpha_dev[slots_t]
        log_min_p = self.log_min_p_dev[slots_t] if self.patient_min_p[slots].any() else None
        rows_t = to_device(rows, dev)
        patient = logits[rows_t]
        guided = combine(patient, alpha, terms, self.valid_vocab, log_min_p).to(logits.dtype)
        logits[rows_t] = torch.where(bad[:, None], patient, guided)  # a NaN row stays the patient's
        return logits

    def _watch_nan(self, bad: torch.Tensor, slots: np.ndarray) -> None:
        """Queues this step's NaN flags for the host without waiting for them."""
        if bad.device.type == "cpu":
            self._pending_nan.append((bad.numpy().copy(), slots, self.generation[slots].copy(), None))
            return
        flags = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
        flags.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_nan.append((flags, slots, self.generation[slots].copy(), event))

    def _unguide_nan_rows(self) -> bool:
        """Unguides the requests whose doctor returned NaN in an earlier step, once that is known;
        whether any was."""
        found = False
        while self._pending_nan:
            flags, slots, gens, event = self._pending_nan[0]
            if event is not None and not event.query():
                break
            self._pending_nan.pop(0)
            flags = flags if isinstance(flags, np.ndarray) else flags.numpy()
            hit = slots[flags & (self.generation[slots] == gens)]
            if len(hit):
                self._unguide(hit, "doctor returned NaN log-probabilities")
                found = True
        return found

    def _unguide(self, slots: np.ndarray, reason: str) -> None:
        for slot in slots.tolist():
            logger.error("llmdoctor: %s; the request in slot %d continues unguided", reason, slot)
            self.remove(int(slot))

    def _doctor_terms(self, slots: np.ndarray, new_tokens: TokenSource, done: dict) -> torch.Tensor | None:
        """``sum_i beta_i * (log p_i [- log p_i_ref])`` for the guided ``slots``; feeds every stream.

        A doctor's result is kept in ``done``, so a retry after dropping some requests does not
        feed the same tokens twice.
        """
        total = None
        for d, doc in enumerate(self.doctors):
            beta = self.betas[slots, d]
            use = np.nonzero(beta > 0)[0]
            if not len(use):
                continue
            sl = slots[use]
            if d in done:
                prev_slots, prev_lp = done[d]
                where = {s: i for i, s in enumerate(prev_slots.tolist())}
                lp = prev_lp[torch.tensor([where[s] for s in sl.tolist()], device=prev_lp.device)]
            else:
                lp = self._doctor_step(d, doc, sl, new_tokens)
                lp.mul_(to_device(beta[use], lp.device)[:, None])
                done[d] = (sl, lp)
            if total is None:
                total = torch.zeros((len(slots), lp.shape[1]), device=lp.device, dtype=torch.float32)
            total[to_device(use, lp.device)] += lp
        return total

    def _doctor_step(self, d: int, doc: _Doctor, sl: np.ndarray, new_tokens: TokenSource) -> torch.Tensor:
        """One doctor's log-probs (minus its reference's, for delta-rule rows) for ``sl``."""
        self._open_streams(sl, d, doc)
        main_ids = self.streams[sl, d]
        ref_rows = np.nonzero(self.delta[sl])[0]
        ref_ids = self.ref_streams[sl[ref_rows], d]
        ref_runner = doc.runner if doc.lora else doc.ref_runner
        try:
            toks = new_tokens(sl, doc.runner.lengths[main_ids])
            ref_toks = new_tokens(sl[ref_rows], ref_runner.lengths[ref_ids]) if len(ref_rows) else None
            if doc.lora and len(ref_rows):
                # one forward: the rows with the adapter on, then the delta rows with it off
                off = np.concatenate([np.zeros(len(sl), bool), np.ones(len(ref_rows), bool)])
                lp_all = doc.runner.step(np.concatenate([main_ids, ref_ids]), _cat_tokens(toks, ref_toks),
                                         adapter_off=off)
                lp, ref_lp = lp_all[: len(sl)], lp_all[len(sl):]
            else:
                lp = doc.runner.step(main_ids, toks)
                ref_lp = ref_runner.step(ref_ids, ref_toks) if len(ref_rows) else None
        except (DoctorCacheFull, UnservableRequests):
            raise
        except Exception as e:  # noqa: BLE001
            raise _DoctorFault(d, e) from e
        if ref_lp is not None:
            lp[to_device(ref_rows, lp.device)] -= ref_lp
        return lp

    def _open_streams(self, slots: np.ndarray, d: int, doc: _Doctor) -> None:
        for s in slots[self.streams[slots, d] < 0]:
            self.streams[s, d] = doc.runner.new_stream()
        if doc.has_reference:
            ref_runner = doc.runner if doc.lora else doc.ref_runner
            for s in slots[(self.ref_streams[slots, d] < 0) & self.delta[slots]]:
                self.ref_streams[s, d] = ref_runner.new_stream()

    def _drop_streams(self, full: DoctorCacheFull, present: np.ndarray) -> None:
        """Makes room: first frees the caches of guided requests absent from this step (they are
        rebuilt if they come back), and only then unguides the requests that did not fit."""
        idle = self.guided.copy()
        idle[present] = False
        held = (self.streams >= 0).any(1) | (self.ref_streams >= 0).any(1)
        if self.evict_parked() or (idle & held).any():
            for slot in np.nonzero(idle & held)[0]:
                self.release_streams(int(slot))
            return
        hit = np.isin(self.streams, full.streams).any(1) | np.isin(self.ref_streams, full.streams).any(1)
        hit &= self.guided
        if not full.streams:  # out of stream ids: drop the requests that have none yet
            hit = self.guided & (self.streams < 0).all(1)
        for slot in np.nonzero(hit)[0]:
            logger.warning("llmdoctor: %s; the request in slot %d continues unguided", full, slot)
            self.remove(int(slot))


def _cat_tokens(a: tuple, b: tuple) -> tuple:
    """Two ``(counts, ids)`` token batches as one."""
    ids = (torch.cat([torch.as_tensor(a[1]), torch.as_tensor(b[1]).to(torch.as_tensor(a[1]).device)])
           if isinstance(a[1], torch.Tensor) or isinstance(b[1], torch.Tensor) else np.concatenate([a[1], b[1]]))
    return np.concatenate([a[0], b[0]]), ids
