"""One request the doctor cannot serve never costs the others their guidance, nor the engine its life.

Each case drives the real processor (a real vLLM engine, or the V1 interface's own ``BatchUpdate``
on a processor built from a real engine config) and checks who stays guided: a prompt token
outside the doctor's vocabulary, a NaN row (decided on the device, in this step and later ones,
whatever the host has read), a full doctor cache (only the requests that do not fit; each
doctor's stream ids are its own), eviction by least recent use (pipeline micro-batches are not
idle), and a failure in the combine step after the doctor forward.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tests.helpers import PROMPTS, run, sp


def _processor(tiny, *, pipeline: int = 1, **section):
    from vllm.engine.arg_utils import EngineArgs

    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    cfg = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True,
                     additional_config={"llmdoctor": {"doctors": tiny["doctors"], "beta": 0.0, **section}}
                     ).create_engine_config()
    cfg.parallel_config.pipeline_parallel_size = pipeline
    return GuidanceLogitsProcessor(cfg, torch.device("cpu"), False)


def _add(proc, slots_params, size=4):
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    proc.update_state(BatchUpdate(batch_size=size, removed=[], added=slots_params, moved=[]))


def _remove(proc, slots, size=4):
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    proc.update_state(BatchUpdate(batch_size=size, removed=slots, added=[], moved=[]))


def _ids(tiny, n: int) -> list[int]:
    """A prompt of ``n`` token ids."""
    ids = tiny["tokenizer"](" ".join(["The cat kindly helps the doctor."] * 8))["input_ids"]
    return ids[:n]


class _Log(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture()
def log():
    handler = _Log()
    logger = logging.getLogger("vllm.llmdoctor")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def test_prompt_token_outside_the_doctors_vocabulary_unguides_only_its_request(engine, tiny, log):
    """The patient's vocabulary is padded past the doctors' (as Qwen2.5-7B's is past a 1.5B doctor's):
    a prompt holding such an id is sampled from the patient alone, the six guided requests beside
    it keep their guidance, and the engine keeps serving."""
    from vllm import TokensPrompt

    patient_vocab = engine.llm_engine.vllm_config.model_config.get_vocab_size()
    tok = tiny["tokenizer"]
    assert len(tok) < patient_vocab  # the patient accepts ids the doctors (len(tok) rows) cannot embed
    prompts = [tok(p)["input_ids"] for p in PROMPTS] * 2
    odd = prompts[0][:2] + [patient_vocab - 1] + prompts[0][2:]
    guide = sp(guide={"beta_doctor0": 1.0, "beta_lora": 0.5, "rule": "delta"}, max_tokens=8)
    batch = [TokensPrompt(prompt_token_ids=p) for p in [odd] + prompts[:6]]
    together, _ = run(engine, batch, guide)
    alone, _ = run(engine, batch[1:], guide)
    plain_odd, _ = run(engine, batch[:1], sp(max_tokens=8))
    assert together[1:] == alone  # the others are still guided
    assert together[0] == plain_odd[0]  # the odd one: the patient alone
    assert alone != run(engine, batch[1:], sp(max_tokens=8))[0]
    assert any("cannot guide" in line for line in log)


def test_nan_row_is_decided_on_the_device_for_this_and_later_steps(tiny, monkeypatch):
    """A NaN row from the doctor is the patient's own from that step on, without the host having read
    anything (tensor-parallel ranks read flags at different times; what they sample must not
    differ); the other rows stay guided."""
    from llmdoctor_vllm.runner import DoctorRunner

    proc = _processor(tiny)
    ids = _ids(tiny, 6)
    params = [sp(guide={"beta": 1.0, "doctors": "doctor0"}) for _ in range(2)]
    _add(proc, [(i, params[i], ids, []) for i in range(2)])
    real = DoctorRunner.step
    poison = {"on": True}

    def step(self, sids, tokens, **kw):
        out = real(self, sids, tokens, **kw)
        if poison["on"]:
            out[0] = float("nan")  # the stream of slot 0
        return out

    monkeypatch.setattr(DoctorRunner, "step", step)
    for k in range(3):
        logits = torch.randn(2, 384)
        out = proc.apply(logits.clone())
        assert torch.equal(out[0], logits[0])  # slot 0: the patient's row
        assert not torch.equal(out[1], logits[1])  # slot 1: guided
        poison["on"] = False
        proc.core._pending_nan.clear()  # the host has read nothing (as when the flags are still in flight)


def test_full_cache_unguides_only_the_requests_that_do_not_fit(tiny):
    """Three requests of one block each and a two-block cache: the two oldest are served."""
    proc = _processor(tiny, cache_tokens=32, block_size=16)
    handler = _Log()
    logging.getLogger("vllm.llmdoctor").addHandler(handler)
    log = handler.lines
    params = [sp(guide={"beta": 1.0, "doctors": "doctor0"}) for _ in range(3)]
    _add(proc, [(i, params[i], _ids(tiny, 8 + i), []) for i in range(3)])
    proc.apply(torch.randn(3, 384))
    assert proc.core.guided[:3].tolist() == [True, True, False]
    logging.getLogger("vllm.llmdoctor").removeHandler(handler)
    assert sum("KV cache full" in line for line in log) == 1, log


def test_each_doctors_stream_ids_are_its_own(tiny):
    """A request too long for doctor1's cache is unguided; the request on doctor0 whose stream has
    the same id there keeps its guidance."""
    proc = _processor(tiny, cache_tokens=32, block_size=16)
    _add(proc, [(0, sp(guide={"beta": 1.0, "doctors": "doctor0"}), _ids(tiny, 5), []),
                (1, sp(guide={"beta": 1.0, "doctors": "doctor1"}), _ids(tiny, 40), [])])
    proc.apply(torch.randn(2, 384))
    assert proc.core.guided[:2].tolist() == [True, False]
    assert int(proc.core.streams[0, 0]) >= 0


def test_cache_pressure_evicts_the_least_recently_used(tiny):
    """Room for three one-block requests; a fourth comes. Only the request left out longest loses its
    cache (it rebuilds it when it returns), not every request absent from this step."""
    proc = _processor(tiny, cache_tokens=48, block_size=16)
    params = [sp(guide={"beta": 1.0, "doctors": "doctor0"}) for _ in range(4)]
    for i in range(3):  # A, B, C, each fed in its own step
        _add(proc, [(i, params[i], _ids(tiny, 6 + i), [])])
        proc.core.apply(torch.randn(4, 384), np.array([i]), np.array([i]), proc._v1_tokens)
    _add(proc, [(3, params[3], _ids(tiny, 9), [])])
    proc.core.apply(torch.randn(4, 384), np.array([2, 3]), np.array([2, 3]), proc._v1_tokens)
    streams = proc.core.streams[:, 0].tolist()
    assert streams[0] == -1 and min(streams[1:]) >= 0  # A (least recently used) evicted, B kept
    assert proc.core.guided.tolist() == [True] * 4


def test_pipeline_micro_batches_are_not_evicted(tiny, log):
    """With two pipeline stages the last stage sees two micro-batches in turn: a request of the other
    micro-batch is live, so a newcomer that does not fit goes unguided instead of evicting it."""
    proc = _processor(tiny, pipeline=2, cache_tokens=48, block_size=16)
    a, b, c = (sp(guide={"beta": 1.0, "doctors": "doctor0"}) for _ in range(3))
    _add(proc, [(0, a, _ids(tiny, 6), []), (1, b, _ids(tiny, 7), [])])
    core = proc.core
    core.apply(torch.randn(4, 384), np.array([0]), np.array([0]), proc._v1_tokens)  # micro-batch 1
    core.apply(torch.randn(4, 384), np.array([1]), np.array([1]), proc._v1_tokens)  # micro-batch 2
    _add(proc, [(2, c, _ids(tiny, 20), [])])  # joins micro-batch 1; needs two blocks, one is free
    held = core.streams[1, 0]
    core.apply(torch.randn(4, 384), np.array([0, 2]), np.array([0, 2]), proc._v1_tokens)
    assert core.streams[1, 0] == held and core.guided.tolist()[:3] == [True, True, False]


def test_failure_in_the_combine_step_leaves_the_logits_alone(tiny, monkeypatch, log):
    """An out-of-memory in the [rows, vocab] float32 tail after the doctor forward unguides that
    step's requests; nothing reaches vLLM's sampler."""
    import llmdoctor_vllm.core

    proc = _processor(tiny)
    _add(proc, [(0, sp(guide={"beta": 1.0}), _ids(tiny, 6), [])])

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(llmdoctor_vllm.core, "combine", oom)
    logits = torch.randn(1, 384)
    out = proc.apply(logits.clone())
    assert torch.equal(out, logits) and proc.core.num_guided == 0
    assert any("out of memory" in line for line in log)
