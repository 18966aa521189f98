"""The guidance core shared by the V1 and Model Runner V2 adapters.

It holds the per-slot request state (:class:`~llmdoctor_vllm.slots.SlotState`), the doctors'
runners, and the step that runs every doctor once over all guided rows and combines its
log-probabilities with the patient's. The adapters only translate their interface's batch
bookkeeping into ``add`` / ``remove`` / ``move`` and ``apply(logits, rows, slots)``.

Every per-row decision that changes what is sampled is a function of the batch's data, never of
timing, so tensor-parallel ranks (each samples its own token) decide alike: a row whose doctor
cannot guide it (a NaN row, e.g. a prompt id past the doctor's embedding) is replaced on the
device by ``torch.where``; the host reads those flags later, for the log only. A fault that can
strike one rank alone (an out-of-memory in its doctor forward) is agreed on: a request stays
guided only where every rank guided it.
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
from llmdoctor_vllm.device import to_device
from llmdoctor_vllm.runner import DoctorCacheFull, DoctorRunner
from llmdoctor_vllm.slots import SlotState
from llmdoctor_vllm.vllm_internals import pipeline_stages, tensor_parallel_agreement

logger = init_logger("vllm.llmdoctor")  # under vLLM's logger tree, so INFO lines print where vLLM's do

PARK_STEPS = 64  # a request left out of the batch keeps its doctor caches this many steps
FALLBACK_CACHE_TOKENS = 131072  # doctor KV budget when neither cache_tokens nor the patient's KV size is known

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

    @property
    def reference(self) -> DoctorRunner | None:
        """The runner that holds the reference streams (a LoRA doctor's own, adapter off)."""
        return self.runner if self.lora else self.ref_runner


@dataclass
class _Parked:
    """Doctor caches of a request left out of the batch, kept for its return."""

    streams: np.ndarray
    ref_streams: np.ndarray
    step: int  # when it was parked
    tokens: np.ndarray  # the tokens the caches hold (a returning request must start with them)
    keepalive: object  # the object whose id is the key, held so the id is not reused meanwhile


class _DoctorFault(RuntimeError):
    """Doctor ``doctor``'s forward raised ``error``."""

    def __init__(self, doctor: int, error: Exception):
        super().__init__(str(error))
        self.doctor, self.error = doctor, error


class UnservableRequests(RuntimeError):
    """A token source cannot give the doctor these requests' tokens, or the doctor's cache cannot
    hold them; they continue unguided."""

    def __init__(self, slots: np.ndarray, reason: str):
        super().__init__(reason)
        self.slots, self.reason = np.asarray(slots, dtype=np.int64), reason


class _NeedRoom(RuntimeError):
    """A doctor runner is ``short`` blocks (or stream ids) short for this step; freeing idle caches may help."""

    def __init__(self, runner: DoctorRunner, short: int, slots: np.ndarray, reason: str):
        super().__init__(reason)
        self.runner, self.short, self.slots, self.reason = runner, short, slots, reason


def patient_kv_tokens(vllm_config) -> tuple[int | None, str]:
    """How many tokens the patient's KV cache holds (per worker), if known when the processor is
    built, and where that number came from.

    vLLM builds logits processors before it sizes its KV cache (``num_gpu_blocks`` is set after
    the memory profile), so at that point the size is known only when the operator fixed it:
    ``num_gpu_blocks_override`` or ``kv_cache_memory_bytes``.
    """
    cc, mc = vllm_config.cache_config, vllm_config.model_config
    block = getattr(cc, "block_size", None) or 16
    for name in ("num_gpu_blocks", "num_gpu_blocks_override"):
        blocks = getattr(cc, name, None)
        if blocks:
            return int(blocks) * block, name
    budget = getattr(cc, "kv_cache_memory_bytes", None)
    if budget:
        try:
            pc = vllm_config.parallel_config
            per_token = (2 * mc.get_num_layers(pc) * mc.get_num_kv_heads(pc) * mc.get_head_size()
                         * torch.empty((), dtype=mc.dtype).element_size())
            return int(budget) // per_token, "kv_cache_memory_bytes"
        except Exception:  # noqa: BLE001 - a model config without these (not a decoder LM)
            return None, ""
    return None, ""


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
        # streams within the pipeline's reach: requests absent for fewer steps than there are
        # pipeline stages are in another micro-batch, not idle
        self.recent_steps = pipeline_stages(vllm_config)
        patient_tokens, source = patient_kv_tokens(vllm_config)
        self.doctors: list[_Doctor] = []
        for name, path in engine.doctors.items():
            loaded = load_doctor(path, device=self.device, dtype=dtype, patient_tokenizer=tok)
            if engine.rule == "delta" and not (loaded.is_lora or loaded.reference_model is not None):
                raise DoctorCheckpointError(path, "the delta rule needs a reference, and this full doctor's "
                                                  "manifest names none (set 'reference' or use rule 'product')")
            # stream ids for every slot, twice: a request the scheduler left out of a step keeps its
            # cache (parked) while its slot is reused
            streams = 2 * self.max_slots
            # a LoRA doctor's runner holds each delta-rule request twice (adapter on and off)
            per_request = 2 if loaded.is_lora else 1
            budget, why = self._budget(patient_tokens, source, per_request, max_len)
            try:
                ref = self._runner(loaded.reference_model, budget[0], streams, max_len, dtype) \
                    if loaded.reference_model is not None else None
                main = self._runner(loaded.model, budget[1], per_request * streams, max_len, dtype)
            except GuidanceConfigError:
                raise
            except ValueError as e:  # an architecture the runner cannot drive
                raise DoctorCheckpointError(path, str(e).removeprefix("llmdoctor: ")) from None
            self.doctors.append(_Doctor(name, main, ref, loaded.is_lora))
            pool = main.kv_bytes + (ref.kv_bytes if ref is not None else 0)
            logger.info("llmdoctor: doctor %r from %s (%s): KV pool %d tokens, %.1f MiB (%s)", name, path,
                        loaded.manifest.kind, budget[1], pool / 2**20, why)
        self._log_memory(vllm_config)
        self.state = SlotState(self.max_slots, len(self.doctors), self.device)
        self.num_guided = 0
        self.resumed = 0  # guided requests re-added after preemption
        self._next_generation = 0
        self._pending_nan: list = []  # (flags, slots, generations, event): this step's NaN rows, for the log
        self._logged_nan: set = set()  # generations already logged as unguidable
        self.parked: dict = {}  # key -> [_Parked]: requests left out of a step
        self.steps = 0
        self._batch_key, self._batch = None, None  # see _batch_tensors
        self._agree = tensor_parallel_agreement()  # None without tensor parallelism
        self.stats_path = os.environ.get("LLMDOCTOR_STATS_FILE")  # test hook, not an operator setting

    def _budget(self, patient_tokens: int | None, source: str, per_request: int, max_len: int):
        """KV tokens for a doctor's (reference runner, main runner), and why that many."""
        most = 2 * self.max_slots * max_len  # every slot's whole context, twice (parked requests)
        if self.engine.cache_tokens:
            tokens, why = self.engine.cache_tokens, "cache_tokens"
        elif patient_tokens:
            tokens, why = patient_tokens, f"the patient's KV cache, from {source}: the doctor never holds more"
        else:
            tokens = min(self.max_slots * max_len, FALLBACK_CACHE_TOKENS)
            why = ("the patient's KV size is not known when vLLM builds logits processors; set llmdoctor "
                   "cache_tokens, or vLLM's kv_cache_memory_bytes or num_gpu_blocks_override, to size it")
        tokens = max(self.engine.block_size, min(tokens, most))
        return (tokens, min(per_request * tokens, per_request * most)), why

    def _log_memory(self, vllm_config) -> None:
        """Says which of the doctor's memory vLLM's own budget sees."""
        if self.device.type != "cuda":
            return
        width = max(d.runner.vocab_width for d in self.doctors)
        working = 4 * self.max_slots * width * 4 * (len(self.doctors) + 1)  # [G, V] fp32 terms per step
        profiled = getattr(vllm_config.cache_config, "kv_cache_memory_bytes", None) is None
        logger.info("llmdoctor: the doctors' weights and KV pools are allocated %s; their per-step working memory "
                    "(about %.0f MiB of [rows, vocab] float32 terms, plus the forward's activations) is outside "
                    "vLLM's profile: leave that much GPU memory free (gpu_memory_utilization)",
                    "before vLLM's memory profile, so its KV cache is sized around them" if profiled else
                    "outside vLLM's budget (kv_cache_memory_bytes skips vLLM's memory profile)", working / 2**20)

    def _runner(self, model, budget: int, streams: int, max_len: int, dtype) -> DoctorRunner:
        e = self.engine
        try:
            runner = DoctorRunner(model, device=self.device, dtype=dtype, cache_tokens=budget, max_streams=streams,
                                  max_len=max_len, block_size=e.block_size,
                                  prefill_chunk_tokens=e.prefill_chunk_tokens)
            if e.cuda_graphs and self.device.type == "cuda":
                runner.enable_static_decode(max_batch=streams, capture=True)
                runner.warm_up()  # capture now, before vLLM profiles memory and sizes its KV cache
            elif e.cuda_graphs:
                logger.warning_once("llmdoctor: cuda_graphs is set but the doctor runs on %s; it runs eagerly",
                                    self.device)
            return runner
        except (RuntimeError, MemoryError) as err:  # torch's OutOfMemoryError is a RuntimeError
            raise GuidanceConfigError(f"llmdoctor cache_tokens={budget}: cannot allocate the doctor's KV pool on "
                                      f"{self.device} ({err}); lower cache_tokens") from None

    # -- per-slot views ------------------------------------------------------------------
    @property
    def guided(self) -> np.ndarray:
        return self.state.guided

    @property
    def streams(self) -> np.ndarray:
        return self.state.streams

    @property
    def ref_streams(self) -> np.ndarray:
        return self.state.ref_streams

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
        self._next_generation += 1
        self.state.assign(slot, g, self._next_generation)
        self.state.last_used[slot] = self.steps
        self.num_guided += 1
        return True

    def remove(self, slot: int) -> None:
        """Forgets the slot's request and frees its doctor caches."""
        if not self.state.guided[slot]:
            return
        self.release_streams(slot)
        self.state.clear([slot])
        self.num_guided -= 1

    def park(self, slot: int, key, keepalive=None, tokens=None) -> None:
        """Unguides ``slot`` but keeps its doctor caches under ``key`` for :meth:`adopt`.

        For a request the scheduler left out of a step: its caches hold its tokens so far, so
        when it comes back (even after preemption: the same tokens) nothing is recomputed.
        ``key`` identifies the request (V1: its ``SamplingParams``, which vLLM keeps across
        re-adds); ``keepalive`` is held while parked so the key cannot be reused; ``tokens`` are
        its tokens so far (a returning request is given the caches only if it starts with the
        tokens they hold). Parked caches are freed under memory pressure (least recently parked
        first), after ``PARK_STEPS`` steps, or when no guided request is left.
        """
        st = self.state
        streams, refs = st.streams[slot].copy(), st.ref_streams[slot].copy()
        held = max(self._cached(streams, refs), default=0)
        st.streams[slot] = st.ref_streams[slot] = -1
        self.remove(slot)
        if held and tokens is not None and len(tokens) >= held:
            entry = _Parked(streams, refs, self.steps, np.asarray(tokens[:held], dtype=np.int64), keepalive)
            self.parked.setdefault(key, []).append(entry)
        else:
            self.free(streams, refs)

    def _cached(self, streams: np.ndarray, refs: np.ndarray) -> list[int]:
        """Tokens each held stream has cached."""
        out = []
        for d, doc in enumerate(self.doctors):
            if streams[d] >= 0:
                out.append(int(doc.runner.lengths[streams[d]]))
            if refs[d] >= 0:
                out.append(int(doc.reference.lengths[refs[d]]))
        return out

    def adopt(self, slot: int, key, tokens) -> bool:
        """Gives the guided ``slot`` caches parked under ``key`` whose tokens ``tokens`` starts with;
        whether there were any."""
        entries = self.parked.get(key)
        if not entries:
            return False
        tokens = np.asarray(tokens, dtype=np.int64)
        for i, e in enumerate(entries):
            n = len(e.tokens)
            if len(tokens) >= n and np.array_equal(tokens[:n], e.tokens):
                del entries[i]
                if not entries:
                    del self.parked[key]
                self.state.streams[slot], self.state.ref_streams[slot] = e.streams, e.ref_streams
                return True
        return False

    def expire_parked(self) -> None:
        """Frees parked caches older than ``PARK_STEPS`` steps, or all once no request is guided."""
        for key in list(self.parked):
            keep = [e for e in self.parked[key] if self.num_guided and self.steps - e.step <= PARK_STEPS]
            for e in self.parked[key]:
                if not any(e is k for k in keep):
                    self.free(e.streams, e.ref_streams)
            if keep:
                self.parked[key] = keep
            else:
                del self.parked[key]

    def free(self, streams: np.ndarray, refs: np.ndarray) -> None:
        """Gives these doctor streams (one id or -1 per doctor) back to their runners."""
        for d, doc in enumerate(self.doctors):
            if streams[d] >= 0:
                doc.runner.free_stream(int(streams[d]))
            if refs[d] >= 0:
                doc.reference.free_stream(int(refs[d]))

    def release_streams(self, slot: int) -> None:
        """Frees the slot's doctor caches; a still-guided slot rebuilds them at its next step."""
        st = self.state
        self.free(st.streams[slot], st.ref_streams[slot])
        st.streams[slot] = -1
        st.ref_streams[slot] = -1

    def move(self, a: int, b: int, swap: bool) -> None:
        """Request at ``a`` moves to ``b`` (and ``b``'s to ``a`` if ``swap``).

        A one-way move replaces ``b``'s occupant, which vLLM reports removed this way only.
        """
        if not swap:
            self.remove(b)
        self.state.move(a, b, swap)

    def write_stats(self) -> None:
        """Writes :meth:`occupancy` to the test hook's file (atomically), if it is set."""
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
        cannot serve it (cache full, tokens it cannot read, a failing doctor forward) goes on
        unguided, and the reason is logged; the engine and the other requests are not affected.
        A row whose doctor returned NaN is sampled from the patient alone, decided on the device,
        in this step and every later one.
        """
        self.steps += 1
        self._log_nan_rows()
        asked = slots
        guided_rows, rows_t, bad, rows, slots = self._guide(logits, rows, slots, new_tokens)
        if self._agree is not None:  # tensor-parallel ranks sample alike only if they guide alike
            guided_rows, rows_t, bad, slots = self._agree_across_ranks(asked, guided_rows, rows_t, bad, rows, slots)
        if guided_rows is None:
            return logits
        # the one write into vLLM's logits, after everything that can fail
        if rows_t is None:  # every row, in order
            logits.copy_(guided_rows)
        else:
            logits[rows_t] = guided_rows
        self._watch_nan(bad, slots)
        return logits

    def _guide(self, logits: torch.Tensor, rows: np.ndarray, slots: np.ndarray, new_tokens: TokenSource) -> tuple:
        """This worker's guided rows for ``slots`` (``None``: none) with their row indices and blocked
        flags (see :meth:`_combine`), and the rows and slots still guided after this step's faults."""
        st = self.state
        done: dict = {}  # doctor -> (slots, weighted log-probs) already computed in this step
        nothing = None, None, None, rows[:0], slots[:0]
        # every retry frees something or unguides someone, so this ends
        for _ in range(len(self.doctors) + 2 * self.max_slots + sum(map(len, self.parked.values())) + 4):
            try:
                terms = self._doctor_terms(slots, new_tokens, done)
                break
            except _NeedRoom as need:
                if not self._make_room(need.runner, need.short, slots):
                    self._unguide(need.slots, need.reason, warn=True)
            except UnservableRequests as e:
                self._unguide(e.slots, e.reason)
            except _DoctorFault as fault:  # a doctor fault must not take the engine down
                hit = slots[st.betas[slots, fault.doctor] > 0]
                self._unguide(hit, f"doctor {self.doctors[fault.doctor].name!r} failed ({fault.error!r})")
            keep = st.guided[slots]
            rows, slots = rows[keep], slots[keep]
            if not len(rows):
                return nothing
        else:
            return nothing
        if terms is None:
            return nothing
        st.last_used[slots] = self.steps
        try:  # the [G, V] float32 tail: an OOM here must not reach vLLM's sampler
            guided_rows, rows_t, bad = self._combine(logits, rows, slots, terms)
        except Exception as e:  # noqa: BLE001
            self._unguide(slots, f"combining the doctors' terms failed ({e!r})")
            return nothing
        return guided_rows, rows_t, bad, rows, slots

    def _agree_across_ranks(self, asked: np.ndarray, guided_rows, rows_t, bad, rows: np.ndarray,
                            slots: np.ndarray) -> tuple:
        """Keeps a row guided only if every tensor-parallel rank guided it this step.

        Each rank samples its own token from its own copy of the logits, so a fault on one rank
        alone (an out-of-memory in its doctor forward) must unguide the request on all of them.
        One all-reduce of a flag per row over vLLM's CPU group; no device sync.
        """
        here = self.state.guided[asked]
        lost = asked[here & ~self._agree(here)]
        if not len(lost):
            return guided_rows, rows_t, bad, slots
        self._unguide(lost, "another tensor-parallel rank could not guide it this step")
        keep = np.flatnonzero(self.state.guided[slots])
        if not len(keep):
            return None, None, None, slots[:0]
        index = to_device(keep, guided_rows.device)
        return (guided_rows.index_select(0, index), to_device(rows[keep], guided_rows.device),
                bad.index_select(0, index), slots[keep])

    def _combine(self, logits: torch.Tensor, rows: np.ndarray, slots: np.ndarray, terms: torch.Tensor):
        """The guided rows (a NaN or blocked row: the patient's own), their row indices (``None``: every
        row of ``logits``, in order), and which rows are blocked."""
        st = self.state
        rows_t, slots_t, alpha, log_min_p, any_zero_alpha = self._batch_tensors(rows, slots, logits)
        # a NaN anywhere in a row makes its sum NaN: one reduction instead of a [G, V] mask
        blocked = st.blocked.index_select(0, slots_t) | torch.isnan(terms.sum(dim=1))
        st.blocked.index_copy_(0, slots_t, blocked)  # a row that could not be guided stays unguided
        patient = logits if rows_t is None else logits.index_select(0, rows_t)
        guided = combine(patient, alpha, terms, self.valid_vocab, log_min_p, any_zero_alpha).to(logits.dtype)
        return torch.where(blocked[:, None], patient, guided), rows_t, blocked

    def _batch_tensors(self, rows: np.ndarray, slots: np.ndarray, logits: torch.Tensor) -> tuple:
        """Built when the batch changes, reused while it does not: ``rows`` on the device (``None``
        when they are every row of ``logits`` in order), ``slots`` on the device, the slots' alpha
        (``None`` when every one is 1) and log(patient_min_p) (``None`` when no slot restricts the
        support), and whether some slot's alpha is 0."""
        key = (rows.tobytes(), slots.tobytes(), self.state.version, logits.shape[0])
        if self._batch_key != key:
            st = self.state
            rows_t, slots_t = to_device(np.stack([rows, slots]).astype(np.int64), logits.device)
            whole = len(rows) == logits.shape[0] and bool((rows == np.arange(len(rows))).all())
            weights = st.device_weights().index_select(0, slots_t)
            alphas = st.alpha[slots]
            log_min_p = weights[:, 1].contiguous() if st.patient_min_p[slots].any() else None
            alpha = None if (alphas == 1).all() else weights[:, 0].contiguous()
            self._batch = None if whole else rows_t, slots_t, alpha, log_min_p, bool((alphas == 0).any())
            self._batch_key = key
        return self._batch

    def _watch_nan(self, bad: torch.Tensor, slots: np.ndarray) -> None:
        """Queues this step's blocked-row flags for the log, without waiting for them: on a GPU a
        copy to pinned host memory, read at a later step once it has arrived; on the CPU the flags
        themselves."""
        flags, event = bad, None  # on the CPU: already host memory, written by now
        if bad.device.type == "cuda":
            flags = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
            flags.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending_nan.append((flags, slots, self.state.generation[slots].copy(), event))

    def _log_nan_rows(self) -> None:
        """Logs the requests whose doctor could not guide them, once their flags reached the host.
        For the log only: what is sampled was decided on the device."""
        while self._pending_nan:
            flags, slots, gens, event = self._pending_nan[0]
            if event is not None and not event.query():
                break
            self._pending_nan.pop(0)
            flags = flags.numpy()  # host memory, already written
            for slot, gen in zip(slots[flags].tolist(), gens[flags].tolist()):
                if gen not in self._logged_nan:
                    self._logged_nan.add(gen)
                    logger.warning("llmdoctor: the doctor cannot guide the request in slot %d (NaN log-probabilities, "
                                   "e.g. a prompt token outside the doctor's vocabulary); it continues unguided",
                                   slot)
        if len(self._logged_nan) > 4 * self.max_slots:
            live = set(self.state.generation.tolist())
            self._logged_nan &= live

    def _unguide(self, slots: np.ndarray, reason: str, warn: bool = False) -> None:
        log = logger.warning if warn else logger.error
        for slot in np.asarray(slots).tolist():
            if self.state.guided[slot]:
                log("llmdoctor: %s; the request in slot %d continues unguided", reason, slot)
                self.remove(int(slot))

    def _doctor_terms(self, slots: np.ndarray, new_tokens: TokenSource, done: dict) -> torch.Tensor | None:
        """``sum_i beta_i * (log p_i [- log p_i_ref])`` for the guided ``slots``; feeds every stream.

        A doctor's result is kept in ``done``, so a retry after dropping some requests does not
        feed the same tokens twice.
        """
        st = self.state
        total, shared = None, False  # shared: ``total`` is a doctor's own result, kept in ``done``
        for d, doc in enumerate(self.doctors):
            beta = st.betas[slots, d]
            use = np.flatnonzero(beta > 0)
            if not len(use):
                continue
            sl = slots[use]
            if d in done:
                prev_slots, prev_lp = done[d]
                lp = prev_lp.index_select(0, to_device(np.flatnonzero(np.isin(prev_slots, sl)), prev_lp.device))
            else:
                lp = self._doctor_step(d, doc, sl, new_tokens)
                b = beta[use]
                lp.mul_(float(b[0]) if (b == b[0]).all() else to_device(b, lp.device)[:, None])
                done[d] = (sl, lp)
            if total is None and len(use) == len(slots):
                total, shared = lp, True
                continue
            if total is None:
                total = torch.zeros((len(slots), lp.shape[1]), device=lp.device, dtype=torch.float32)
            elif shared:  # a second doctor adds to it: a copy of its own
                total, shared = total.clone(), False
            total.index_add_(0, to_device(use, lp.device), lp)
        return total

    def _doctor_step(self, d: int, doc: _Doctor, sl: np.ndarray, new_tokens: TokenSource) -> torch.Tensor:
        """One doctor's log-probs (minus its reference's, for delta-rule rows) for ``sl``."""
        st = self.state
        self._open_streams(sl, d, doc)
        main_ids = st.streams[sl, d]
        ref_rows = np.flatnonzero(st.delta[sl])
        ref_ids = st.ref_streams[sl[ref_rows], d]
        ref_runner = doc.reference
        try:
            toks = new_tokens(sl, doc.runner.lengths[main_ids])
            ref_toks = new_tokens(sl[ref_rows], ref_runner.lengths[ref_ids]) if len(ref_rows) else None
        except UnservableRequests:
            raise
        except Exception as e:  # noqa: BLE001 - a token source that cannot be read
            raise _DoctorFault(d, e) from e
        one_pass = doc.lora and len(ref_rows)
        if one_pass:  # one forward: the rows with the adapter on, then the delta rows with it off
            self._check_room(doc.runner, np.concatenate([sl, sl[ref_rows]]), np.concatenate([main_ids, ref_ids]),
                             np.concatenate([toks[0], ref_toks[0]]))
        else:
            self._check_room(doc.runner, sl, main_ids, toks[0])
            if len(ref_rows):
                self._check_room(ref_runner, sl[ref_rows], ref_ids, ref_toks[0])
        # which runner is stepping, its stream ids and their requests (to read a DoctorCacheFull)
        runner, ids, owners = doc.runner, main_ids, sl
        try:
            if one_pass:
                off = np.concatenate([np.zeros(len(sl), bool), np.ones(len(ref_rows), bool)])
                ids, owners = np.concatenate([main_ids, ref_ids]), np.concatenate([sl, sl[ref_rows]])
                lp_all = doc.runner.step(ids, _cat_tokens(toks, ref_toks), adapter_off=off)
                lp, ref_lp = lp_all[: len(sl)], lp_all[len(sl):]
            else:
                lp = doc.runner.step(main_ids, toks)
                ref_lp = None
                if len(ref_rows):
                    runner, ids, owners = ref_runner, ref_ids, sl[ref_rows]
                    ref_lp = ref_runner.step(ref_ids, ref_toks)
        except DoctorCacheFull as full:  # the runner's own check (the one above should have caught it)
            hit = owners[np.isin(ids, full.streams)] if len(full.streams) else owners
            raise UnservableRequests(np.unique(hit), str(full)) from None
        except Exception as e:  # noqa: BLE001
            raise _DoctorFault(d, e) from e
        if ref_lp is not None:
            lp.index_add_(0, to_device(ref_rows, lp.device), ref_lp, alpha=-1)
        return lp

    def _check_room(self, runner: DoctorRunner, owners: np.ndarray, sids: np.ndarray, counts: np.ndarray) -> None:
        """Raises :class:`_NeedRoom` naming only the requests that do not fit this runner's free blocks
        (the oldest requests are served first; a stream longer than any stream may be never fits)."""
        counts = np.asarray(counts, dtype=np.int64)
        bs = runner.block_size
        totals = runner.lengths[sids] + counts
        # the common case, decided without per-stream block counts: room for every stream's worst case
        if runner.num_free_blocks * bs >= counts.sum() + len(sids) * bs and \
                totals.max(initial=0) <= runner.max_blocks_per_stream * bs:
            return
        need = np.maximum(-(-totals // bs) - runner.num_stream_blocks[sids], 0)
        too_long = totals > runner.max_blocks_per_stream * bs
        free = runner.num_free_blocks
        if not too_long.any() and need.sum() <= free:
            return
        # per request: the blocks all its streams in this call need; serve the oldest first
        reqs, inverse = np.unique(owners, return_inverse=True)
        req_need = np.bincount(inverse, weights=need, minlength=len(reqs)).astype(np.int64)
        req_long = np.bincount(inverse, weights=too_long, minlength=len(reqs)) > 0
        if req_long.any():  # no room ever fits them
            raise UnservableRequests(reqs[req_long], "longer than the doctor's longest stream")
        order = np.argsort(self.state.generation[reqs], kind="stable")
        fits = np.zeros(len(reqs), dtype=bool)
        fits[order] = np.cumsum(req_need[order]) <= free
        short = int(need.sum() - free)
        raise _NeedRoom(runner, short, reqs[~fits], f"doctor KV cache full ({runner.budget_tokens} tokens)")

    def _make_room(self, runner: DoctorRunner, short: int, present: np.ndarray, ids: bool = False) -> bool:
        """Frees idle doctor caches, least recently used first, until ``runner`` has ``short`` more free
        blocks (stream ids if ``ids``); whether anything was freed. Parked caches go first, then
        those of guided requests that no step has fed for as many steps as there are pipeline
        stages (the others are in another micro-batch); they are rebuilt if their request returns."""
        if short <= 0:
            return False
        st = self.state

        def room() -> int:
            return len(runner.free_streams) if ids else runner.num_free_blocks

        before = room()
        for e, key in sorted(((e, k) for k, es in self.parked.items() for e in es), key=lambda x: x[0].step):
            if room() - before >= short:
                break
            self.parked[key].remove(e)
            if not self.parked[key]:
                del self.parked[key]
            self.free(e.streams, e.ref_streams)
        idle = st.guided.copy()
        idle[present] = False
        idle &= (st.streams >= 0).any(1) | (st.ref_streams >= 0).any(1)
        idle &= st.last_used <= self.steps - self.recent_steps
        candidates = np.flatnonzero(idle)
        for slot in candidates[np.argsort(st.last_used[candidates], kind="stable")].tolist():
            if room() - before >= short:
                break
            self.release_streams(slot)
        return room() > before

    def _open_streams(self, slots: np.ndarray, d: int, doc: _Doctor) -> None:
        """Gives each of ``slots`` its stream(s) on doctor ``d`` (making room when out of ids)."""
        st = self.state
        lack = slots[st.streams[slots, d] < 0]
        if len(lack):
            self._new_streams(doc.runner, st.streams, lack, d, slots)
        if doc.has_reference:
            lack = slots[(st.ref_streams[slots, d] < 0) & st.delta[slots]]
            if len(lack):
                self._new_streams(doc.reference, st.ref_streams, lack, d, slots)

    def _new_streams(self, runner: DoctorRunner, table: np.ndarray, lack: np.ndarray, d: int,
                     present: np.ndarray) -> None:
        if len(lack) > len(runner.free_streams):
            short = len(lack) - len(runner.free_streams)
            if not self._make_room(runner, short, present, ids=True) or len(lack) > len(runner.free_streams):
                raise _NeedRoom(runner, 0, lack[len(runner.free_streams):], "out of doctor stream ids")
        for s in lack.tolist():
            table[s, d] = runner.new_stream()


def _cat_tokens(a: tuple, b: tuple) -> tuple:
    """Two ``(counts, ids)`` token batches (from one token source: host arrays, or tensors on one device) as one."""
    if isinstance(a[1], torch.Tensor) or isinstance(b[1], torch.Tensor):
        ids = torch.cat([torch.as_tensor(a[1]), torch.as_tensor(b[1])])
    else:
        ids = np.concatenate([a[1], b[1]])
    return np.concatenate([a[0], b[0]]), ids
