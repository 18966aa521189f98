"""The Model Runner V2 adapter, driven on CPU through the V2 interface's own dataclasses.

MRV2 only runs on CUDA, and its buffers need pinned memory; here the runner's per-slot token
table is a plain tensor in the real ``LogitsProcRequestState``, and every step passes a real
``LogitsContext``, as the V2 sampler does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import PROMPTS, run, sp, V2_MAX_LEN, V2_MAX_REQS, v2_context, v2_processor

MAX_REQS, MAX_LEN = V2_MAX_REQS, V2_MAX_LEN


@pytest.fixture()
def v2(tiny):
    proc, table = v2_processor(tiny)
    assert proc.v2 and proc.core is not None
    return proc, table


def test_v2_adapter_steers_like_the_v1_engine(v2, tiny, engine, hf_models):
    """Greedy decoding through the V2 interface gives the tokens of the real V1 engine."""
    from vllm import SamplingParams

    proc, table = v2
    patient, _ = hf_models
    guide = {"beta_doctor0": 0.7, "beta_lora": 0.6, "rule": "delta"}
    params = sp(guide=guide, max_tokens=10)
    want = run(engine, PROMPTS[:3], params)[0]

    assert proc.add_request(3, SamplingParams(max_tokens=4)) is False  # unguided: declined
    slots = [2, 0, 1]
    seqs = [tiny["tokenizer"](p)["input_ids"] for p in PROMPTS[:3]]
    for s, ids in zip(slots, seqs):
        assert proc.add_request(s, params) is True
        table.gpu[s, : len(ids)] = torch.tensor(ids)
    prompt_lens = [len(x) for x in seqs]
    for step in range(10):
        # slot 1 sits out step 4 (as when the scheduler skips it); its doctor cache is kept
        active = [i for i in range(3) if not (step == 4 and slots[i] == 1)]
        lens = [len(seqs[i]) for i in active]
        with torch.no_grad():
            logits = torch.stack([patient(torch.tensor([seqs[i]])).logits[0, -1] for i in active]).float()
        logits = torch.cat([logits, torch.randn(1, logits.shape[1])])  # a row of the declined request
        ctx_slots = [slots[i] for i in active] + [3]
        table.gpu[3, :2] = torch.tensor([5, 6])
        out = proc.apply(logits.clone(), v2_context(ctx_slots, lens + [2], table))
        assert torch.equal(out[-1], logits[-1])  # declined rows untouched
        for row, i in enumerate(active):
            tok = int(out[row].argmax())
            table.gpu[slots[i], len(seqs[i])] = tok
            seqs[i].append(tok)
    # the engine stops at EOS, this loop does not: compare what the engine produced
    got = [s[p:p + len(w)] for s, p, w in zip(seqs, prompt_lens, want)]
    assert got[0] == want[0] and got[1] == want[1]
    assert got[2] == want[2][:9]  # slot 1 skipped one step (its doctor cache kept), then went on

    # a recycled slot starts clean: same prompt, same tokens as a fresh request
    proc.add_request(2, params)
    ids = list(seqs[0][: prompt_lens[0]])
    table.gpu[2, : len(ids)] = torch.tensor(ids)
    for _ in range(len(want[0])):
        with torch.no_grad():
            logits = patient(torch.tensor([ids])).logits[0, -1:].float()
        tok = int(proc.apply(logits, v2_context([2], [len(ids)], table))[0].argmax())
        table.gpu[2, len(ids)] = tok
        ids.append(tok)
    assert ids[prompt_lens[0]:] == want[0]


def test_v2_unconfigured_declines_everything(tiny):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    assert issubclass(GuidanceLogitsProcessor, LogitsProcessor)  # the V2 loader's check
    vllm_config = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=MAX_LEN,
                             max_num_seqs=MAX_REQS).create_engine_config()
    state = SimpleNamespace(device=torch.device("cpu"))
    proc = GuidanceLogitsProcessor(vllm_config, state)
    assert proc.add_request(0, SamplingParams(extra_args={"llmdoctor_beta": 1.0})) is False
    logits = torch.randn(1, 384)
    assert proc.apply(logits, None) is logits
