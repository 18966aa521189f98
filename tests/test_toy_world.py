"""The toy alignment world: reward, corpus format, an instruction-following patient, preference pairs."""

from __future__ import annotations

import numpy as np
import pytest

from llmdoctor_train.toy.patient import build_toy_patient, make_preference_dataset
from llmdoctor_train.toy.world import (
    NEGATIVE_INSTRUCTION,
    POSITIVE_INSTRUCTION,
    as_scored,
    format_example,
    format_prompt,
    toy_reward,
    toy_rewards,
    toy_wellformed,
    toy_world_corpus,
)


def test_reward_hand_computed():
    assert toy_reward("The cat kindly helps the doctor.") == 2.0
    assert toy_reward("The cat rudely ignores the doctor. A dog never helps.") == -2.0  # -1 -1, -1 +1
    assert toy_reward("KINDLY, Thanks! badly") == 1.0  # case-insensitive, punctuation-delimited
    assert toy_reward("unkindly helpsome neverland") == 0.0  # whole words only
    assert toy_reward("") == 0.0
    texts = ["The cat kindly helps the doctor.", "", "never never", "A dog quickly sees a song.", "warmly"]
    np.testing.assert_array_equal(toy_rewards(texts), [2.0, 0.0, -2.0, 0.0, 1.0])
    assert toy_rewards([]).shape == (0,)


def test_wellformed():
    assert toy_wellformed(["The cat kindly helps the doctor.", "The cat kindly helps the doctor. My friend rarely "
                           "reads a song.", "The cat kindly", "cat kindly helps the doctor.", ""]).tolist() == [
        True, True, False, False, False]


def test_corpus_format():
    rows = toy_world_corpus(300, seed=0)
    assert [r["condition"] for r in rows[:3]] == ["pos", "neg", "neutral"]
    for r in rows:
        instr = {"pos": POSITIVE_INSTRUCTION, "neg": NEGATIVE_INSTRUCTION, "neutral": None}[r["condition"]]
        assert r["instruction"] == instr
        if instr is None:
            assert r["text"] == f"User: {r['prompt']}\nAssistant: {r['response']}"
        else:
            assert r["text"] == f"{instr}\n\nUser: {r['prompt']}\nAssistant: {r['response']}"
        assert r["text"] == format_example(r["prompt"], r["response"], instr)
        assert r["text"].startswith(format_prompt(r["prompt"], instr))
    assert format_prompt("Hi.") == "User: Hi.\nAssistant:"
    assert format_prompt("Hi.", POSITIVE_INSTRUCTION) == POSITIVE_INSTRUCTION + "\n\nUser: Hi.\nAssistant:"
    assert toy_world_corpus(30, seed=0, eos="<e>")[0]["text"].endswith(".<e>")
    assert toy_world_corpus(30, seed=1) == toy_world_corpus(30, seed=1)
    assert toy_wellformed(r["response"] for r in rows).all()
    mean = {c: toy_rewards(r["response"] for r in rows if r["condition"] == c).mean()
            for c in ("pos", "neg", "neutral")}
    assert mean["pos"] > 2 and mean["neg"] < -2 and abs(mean["neutral"]) < 0.6


@pytest.fixture(scope="module")
def toy_patient(tmp_path_factory):
    """A quickly trained patient (fewer, smaller steps than the default; still follows instructions)."""
    return build_toy_patient(tmp_path_factory.mktemp("toy_world"), seed=0, steps=200, batch_size=8, measure=32)


def test_patient_follows_instructions(toy_patient):
    r = toy_patient["rewards"]
    assert r["pos"] > 1.0 > -1.0 > r["neg"], r
    assert r["neg"] < r["neutral"] < r["pos"], r
    assert min(toy_patient["wellformed"].values()) > 0.6, toy_patient["wellformed"]


def test_patient_loads_in_vllm(toy_patient, keep_alive):
    """The saved folder serves in vLLM: its prompt log-probs match transformers', and sampled
    replies follow the instructions there too."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from llmdoctor_train.toy.pipeline import engine_kwargs
    from llmdoctor_train.toy.world import toy_prompts

    path, tok = toy_patient["patient"], toy_patient["tokenizer"]
    llm = LLM(model=path, **engine_kwargs(kv_cache_memory_bytes=64 << 20))
    keep_alive(llm)
    text = format_example("Tell me about the cat.", "The cat kindly helps the doctor.", POSITIVE_INSTRUCTION)
    ids = tok(text)["input_ids"]
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    got = torch.tensor([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], ids[1:])])
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        lp = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    ref = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=0)

    prompts = toy_prompts(16, seed=7)
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=48, stop=["\n"], seed=0)
    mean = {}
    for name, instr in (("pos", POSITIVE_INSTRUCTION), ("neg", NEGATIVE_INSTRUCTION)):
        outs = llm.generate([format_prompt(p, instr) for p in prompts], sp, use_tqdm=False)
        mean[name] = toy_rewards(c.text for o in outs for c in o.outputs).mean()
    assert mean["pos"] > mean["neg"] + 1.0, mean


def test_preference_dataset(toy_patient):
    ds = make_preference_dataset(toy_patient["patient"], n_prompts=48, samples_per_prompt=4, seed=0)
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert len(ds) > 24  # ties are skipped, but most prompts give a pair
    c, r = toy_rewards(ds["chosen"]), toy_rewards(ds["rejected"])
    assert (c > r).all()
    np.testing.assert_array_equal(c, ds["chosen_reward"])
    np.testing.assert_array_equal(r, ds["rejected_reward"])
    assert all(not p.startswith("User:") and not x.startswith(" ") for p, x in zip(ds["prompt"], ds["chosen"]))
    again = make_preference_dataset(toy_patient["patient"], n_prompts=48, samples_per_prompt=4, seed=0)
    assert again["chosen"] == ds["chosen"] and again["rejected"] == ds["rejected"]
    scored = as_scored(ds)  # what Stage 1 reads after "Assistant:"
    assert scored["chosen"] == [" " + c for c in ds["chosen"]]
    assert scored["rejected"] == [" " + r for r in ds["rejected"]]
