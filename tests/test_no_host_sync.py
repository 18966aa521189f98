"""A steady-state doctor step makes the host wait for nothing: no op of a packed step (prefill
chunks beside decodes, idle streams, LoRA rows with the adapter off, ids on the device) or of a
decode-only step (packed or static) would block the CPU on a GPU (see :mod:`tests.host_sync`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from llmdoctor_vllm.runner import DoctorRunner
from tests.host_sync import HostSyncRecorder


@pytest.fixture(scope="module")
def lora_doctor():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=96, max_position_embeddings=512, tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules="all-linear")).eval()


def test_the_recorder_sees_what_waits():
    """The recorder flags a boolean mask, a scalar read and a copy of a computed tensor to the
    host, and nothing in plain index arithmetic."""
    x, rows = torch.arange(6.0), torch.tensor([0, 2])
    with HostSyncRecorder() as rec:
        y = x.index_select(0, rows) * 2
    assert not rec.syncs and rec.ops >= 2
    for wait in (lambda: x[x > 2], lambda: float(x.sum()), lambda: (x * 2).tolist(), lambda: (x + 1).numpy(),
                 lambda: torch.nonzero(x)):
        with HostSyncRecorder() as rec:
            wait()
        assert rec.syncs, wait
    assert y.tolist() == [0.0, 4.0]


@pytest.mark.parametrize("static", [False, True], ids=["packed", "static"])
def test_steady_state_steps_wait_for_nothing(lora_doctor, static):
    runner = DoctorRunner(lora_doctor, device="cpu", dtype=torch.float32, cache_tokens=1024, max_streams=8,
                          max_len=256, block_size=8)
    runner.prefill_chunk_tokens, runner.q_tile, runner.score_budget = 16, 4, 256  # several passes, tiles, groups
    if static:
        runner.enable_static_decode(max_batch=8, capture=False, key_start=8)
    rng = np.random.default_rng(0)
    off = np.array([False, True, False, True])
    sids = np.array([runner.new_stream() for _ in off])

    def feed(counts):
        ids = torch.as_tensor(rng.integers(0, 96, size=sum(counts)))
        return np.array(counts), ids

    for counts in [(5, 9, 3, 20), (1, 1, 1, 1), (2, 1, 0, 1)]:  # warm-up: every shape once
        runner.step(sids, feed(counts), adapter_off=off)
    for counts in [(1, 7, 0, 30), (1, 1, 1, 1), (1, 1, 1, 1)]:  # mixed, then decode-only steps
        step_input = feed(counts)
        with HostSyncRecorder() as rec:
            out = runner.step(sids, step_input, adapter_off=off)
        assert not rec.syncs, (counts, rec.syncs)
        assert rec.ops > 50 and torch.isfinite(out).all()
