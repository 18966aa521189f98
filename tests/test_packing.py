"""The packed doctor step: mixed prefill chunks, decodes and idle streams equal a full forward,
and a long prompt next to many decodes runs in bounded shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from llmdoctor_vllm.packing import plan_step
from llmdoctor_vllm.runner import DoctorRunner


@pytest.fixture(scope="module")
def doctor():
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=96, max_position_embeddings=512, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _full(model, seqs):
    with torch.inference_mode():
        return torch.stack([torch.log_softmax(model(torch.tensor([s])).logits[0, -1].float(), -1) for s in seqs])


@pytest.mark.parametrize("limits", [dict(), dict(max_pass_tokens=7, q_tile=3, score_budget=64)])
def test_mixed_step_equals_full_forward(doctor, limits):
    """Streams that prefill in chunks of different sizes, decode, or gain nothing (a patient still
    prefilling a prompt the doctor has read) in the same steps give a full forward's log-probs;
    with tiny limits the same steps run as many passes, tiles and sub-batches."""
    runner = DoctorRunner(doctor, device="cpu", dtype=torch.float32, cache_tokens=1024, max_streams=6, max_len=300,
                          block_size=8, **limits)
    rng = np.random.default_rng(0)
    sids = np.array([runner.new_stream() for _ in range(4)])
    history = [[] for _ in sids]
    # per step, tokens per stream: 0 = nothing new (its previous distribution again)
    schedule = [(5, 40, 1, 17), (1, 0, 1, 9), (1, 0, 23, 1), (0, 33, 1, 1), (1, 1, 0, 1), (2, 1, 1, 0)]
    for counts in schedule:
        new = [rng.integers(0, 96, size=c).tolist() for c in counts]
        got = runner.step(sids, new)
        history = [h + t for h, t in zip(history, new)]
        torch.testing.assert_close(got, _full(doctor, history), atol=3e-5, rtol=0)
    assert runner.lengths[sids].tolist() == [len(h) for h in history]


def test_device_ids_and_lora_rows(doctor):
    """The ``(counts, ids)`` form with ids as a tensor, and LoRA rows with the adapter off, in a
    step that mixes a prefill with decodes."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(doctor), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules="all-linear")).eval()
    runner = DoctorRunner(lora, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4, max_len=128,
                          max_pass_tokens=16, q_tile=4)
    rng = np.random.default_rng(2)
    off = np.array([False, True, False])
    sids = np.array([runner.new_stream() for _ in off])
    history = [[] for _ in off]
    for counts in [(3, 3, 30), (1, 1, 1), (25, 1, 0)]:
        new = [rng.integers(0, 96, size=c).tolist() for c in counts]
        flat = torch.tensor([t for s in new for t in s], dtype=torch.int32)
        got = runner.step(sids, (np.array(counts), flat), adapter_off=off)
        history = [h + t for h, t in zip(history, new)]
        with lora.disable_adapter():
            base = _full(lora, history)
        want = torch.where(torch.from_numpy(off)[:, None], base, _full(lora, history))
        torch.testing.assert_close(got, want, atol=3e-5, rtol=0)


def test_long_prompt_next_to_decodes_runs_in_bounded_shapes():
    """A 32k-token prompt arriving beside 32 decoding streams: no pass holds more than the pass
    budget, no decode is padded to the prompt's length, and every attention group's scores stay
    within the budget (or are one tile); the packed tokens are exactly the new ones."""
    bs, max_len = 16, 40_000
    n = np.array([1] * 32 + [32_768])
    cached = np.array([2048] * 32 + [0])
    tables = np.arange(33 * (max_len // bs)).reshape(33, -1)
    heads, budget, max_pass, q_tile = 12, 1 << 25, 2048, 256
    plan = plan_step(n, cached, tables, bs, max_pass_tokens=max_pass, q_tile=q_tile, score_budget=budget,
                     num_heads=heads)
    assert len(plan.src) == n.sum()
    assert sorted(plan.src.tolist()) == list(range(n.sum()))
    assert all(p.end - p.start <= max_pass for p in plan.passes)
    for p in plan.passes:
        for g in p.groups:
            G, Q = g.q_index.shape
            L = g.read.shape[1]
            assert G == 1 or G * Q * L * heads <= budget
            assert Q <= q_tile and g.q_valid.sum() == len(set(g.q_index[g.q_valid].tolist()))
    first = plan.passes[0]
    decode = [g for g in first.groups if g.q_index.shape[1] == 1]
    assert sum(len(g.q_index) for g in decode) == 32 and max(g.read.shape[1] for g in decode) == 2049
