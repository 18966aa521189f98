"""The doctor runner alone: incremental paged steps equal a full transformers forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from llmdoctor_vllm.runner import DoctorRunner


@pytest.fixture(scope="module")
def doctor():
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, vocab_size=96, max_position_embeddings=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("key_bucket", [1, 64])  # 64: keys read in rounded lengths, as on CUDA
def test_steps_equal_full_forward(doctor, key_bucket):
    """Three streams of different lengths, fed a prompt then one or two tokens per step, give the
    log-probs of a full forward over each stream's whole sequence at every step."""
    runner = DoctorRunner(doctor, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4, max_len=160,
                          block_size=16)
    runner.key_bucket = key_bucket
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 96, size=n).tolist() for n in (5, 33, 17)]
    sids = np.array([runner.new_stream() for _ in seqs])
    feeds = [seqs] + [[rng.integers(0, 96, size=1 + (i + j) % 2).tolist() for j in range(3)] for i in range(6)]
    history = [[] for _ in seqs]
    for new in feeds:
        got = runner.step(sids, new)
        history = [h + t for h, t in zip(history, new)]
        with torch.inference_mode():
            want = [torch.log_softmax(doctor(torch.tensor([h])).logits[0, -1].float(), -1) for h in history]
        torch.testing.assert_close(got, torch.stack(want), atol=2e-5, rtol=0)
    assert runner.lengths[sids].tolist() == [len(h) for h in history]


def test_lora_rows_with_and_without_adapter(doctor):
    """A LoRA doctor stepped with some rows' adapter off (the delta rule's reference rows) gives
    those rows the base model's log-probs and the others the adapted model's, in one forward."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(doctor), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules="all-linear")).eval()
    runner = DoctorRunner(lora, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4, max_len=96)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 96, size=n).tolist() for n in (7, 12, 7, 3)]
    off = np.array([False, True, True, False])
    sids = np.array([runner.new_stream() for _ in seqs])
    history = [[] for _ in seqs]
    for new in [seqs, [[3], [4], [5], [6]], [[7, 8], [9], [10, 11], [12]]]:
        got = runner.step(sids, new, adapter_off=off)
        history = [h + t for h, t in zip(history, new)]
        with torch.inference_mode():
            adapted = [torch.log_softmax(lora(torch.tensor([h])).logits[0, -1], -1) for h in history]
            with lora.disable_adapter():
                base = [torch.log_softmax(lora(torch.tensor([h])).logits[0, -1], -1) for h in history]
        want = torch.stack([b if o else a for a, b, o in zip(adapted, base, off)])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        assert (got[0] - base[0]).abs().max() > 1e-3  # the adapter does change the adapted rows


def test_delta_rows_need_plain_lora(doctor):
    """A DoRA doctor cannot run its adapter on and off in one batch here: a clear error (the core
    turns it into 'these requests continue unguided'), not a wrong answer."""
    import copy

    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(copy.deepcopy(doctor), LoraConfig(r=4, use_dora=True, target_modules="all-linear")).eval()
    runner = DoctorRunner(dora, device="cpu", dtype=torch.float32, cache_tokens=256, max_streams=2, max_len=64)
    sids = np.array([runner.new_stream(), runner.new_stream()])
    runner.step(sids, [[1, 2], [3]])  # adapter on everywhere: peft's own forward, fine
    with pytest.raises(ValueError, match="plain LoRA"):
        runner.step(sids, [[4], [5]], adapter_off=np.array([False, True]))
