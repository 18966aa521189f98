"""The plugin's whole steady-state step makes the host wait for nothing on a GPU: the core's apply
(every doctor, the delta rule's references, the combine, the NaN guard), over Model Runner V2's
token path (ids read from the runner's token table on the device) and over V1's, and the retry
after a doctor fault. Recorded with :class:`tests.host_sync.HostSyncRecorder` on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import PROMPTS, sp, V2_MAX_LEN, V2_MAX_REQS, v2_context, v2_processor
from tests.host_sync import HostSyncRecorder

MAX_REQS, MAX_LEN = V2_MAX_REQS, V2_MAX_LEN


@pytest.fixture()
def v2(tiny):
    return v2_processor(tiny)


def _guides():
    return [{"beta_doctor0": 0.7, "beta_lora": 0.6, "rule": "delta"}, {"beta_doctor1": 1.0, "patient_min_p": 0.1},
            {"beta": 0.5, "rule": "delta"}]


def test_v2_step_waits_for_nothing(v2, tiny, monkeypatch):
    """Prefill, then decode steps over MRV2's token table: the recorded steps (a decode step, and a
    step where one doctor fails and the others' results are reused) hold no host sync."""
    from llmdoctor_vllm.runner import DoctorRunner

    proc, table = v2
    seqs = [tiny["tokenizer"](p)["input_ids"] for p in PROMPTS[:3]]
    for s, (ids, guide) in enumerate(zip(seqs, _guides())):
        assert proc.add_request(s, sp(guide=guide))
        table.gpu[s, : len(ids)] = torch.tensor(ids)
    slots = [0, 1, 2]

    def step(record: bool):
        logits = torch.randn(len(slots), 384)
        ctx = v2_context(slots, [len(seqs[s]) for s in slots], table)
        if not record:
            return proc.apply(logits, ctx), None
        with HostSyncRecorder() as rec:
            out = proc.apply(logits, ctx)
        return out, rec

    for k in range(4):
        out, rec = step(record=k >= 2)  # the first steps prefill and warm up
        if rec is not None:
            assert not rec.syncs, rec.syncs
            assert rec.ops > 100
        for s in slots:
            tok = int(out[s].argmax())
            table.gpu[s, len(seqs[s])] = tok
            seqs[s].append(tok)
    # a fault in the LoRA doctor: its requests are unguided, the others' terms are reused on retry
    lora = proc.core.doctors[2].runner
    real = DoctorRunner.step

    def faulty(self, *a, **k):
        if self is lora:
            raise RuntimeError("injected fault")
        return real(self, *a, **k)

    monkeypatch.setattr(DoctorRunner, "step", faulty)
    out, rec = step(record=True)
    assert not rec.syncs, rec.syncs
    assert proc.core.guided[:3].tolist() == [False, True, False]  # doctor0's request used the LoRA doctor too


def test_v1_step_waits_for_nothing(tiny):
    """The same under V1: tokens come from vLLM's host lists, the rest stays on the device."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    cfg = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True,
                     additional_config={"llmdoctor": {"doctors": tiny["doctors"], "beta": 0.0}}).create_engine_config()
    proc = GuidanceLogitsProcessor(cfg, torch.device("cpu"), False)
    outs = [[], [], []]
    added = [(i, sp(guide=g), tiny["tokenizer"](PROMPTS[i])["input_ids"], outs[i]) for i, g in enumerate(_guides())]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    for k in range(4):
        logits = torch.randn(3, 384)
        with HostSyncRecorder() as rec:
            out = proc.apply(logits)
        if k >= 2:
            assert not rec.syncs, rec.syncs
        for i in range(3):
            outs[i].append(int(out[i].argmax()))
