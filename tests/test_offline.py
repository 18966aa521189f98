"""Guided decoding in a real in-process vLLM engine, checked against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import PROMPTS, guided_scores, run, sp


def test_beta_zero_is_plain_vllm(engine):
    """beta = 0 (and alpha set) gives exactly the tokens of plain decoding, greedy and seeded."""
    for kw in ({}, {"temperature": 1.0, "seed": 7}):
        plain, _ = run(engine, PROMPTS, sp(**kw))
        zero, _ = run(engine, PROMPTS, sp(guide={"beta": 0.0, "alpha": 1.0}, **kw))
        guided, _ = run(engine, PROMPTS, sp(guide={"beta": 1.0, "doctors": "doctor0"}, **kw))
        assert zero == plain
        assert guided != plain  # the doctor does steer (greedy included: not argmax-invariant)


@pytest.mark.parametrize("rule", ["product", "delta"])
@pytest.mark.parametrize("betas", [{"doctor0": 0.7}, {"doctor0": 0.5, "lora": 0.8}, {"doctor1": 1.3, "lora": 0.4}])
def test_guided_distribution_matches_formula(engine, hf_models, tiny, rule, betas):
    """The processed log-probs of each chosen token equal the formula recomputed with transformers."""
    _check_formula(engine, hf_models, tiny, rule, betas)


@pytest.mark.parametrize("rule", ["product", "delta"])
def test_patient_min_p_matches_formula(engine, hf_models, tiny, rule):
    """With ``patient_min_p`` the doctors reweight only the patient's support: the formula, masked."""
    _check_formula(engine, hf_models, tiny, rule, {"doctor0": 0.5, "lora": 2.0}, patient_min_p=0.3)


def test_patient_min_p_one_keeps_the_patients_top_token(engine):
    """patient_min_p = 1 leaves only the patient's top token, so the doctors, the rule and the
    sampling seed no longer matter; a lower bound lets them change the reply."""
    delta = {"beta": 3.0, "rule": "delta"}
    product = {"beta_doctor1": 2.0, "doctors": "doctor1"}
    kept_delta, _ = run(engine, PROMPTS, sp(guide=delta | {"patient_min_p": 1.0}, temperature=1.0, seed=3))
    kept_product, _ = run(engine, PROMPTS, sp(guide=product | {"patient_min_p": 1.0}, temperature=1.0, seed=11))
    free_delta, _ = run(engine, PROMPTS, sp(guide=delta | {"patient_min_p": 0.001}, temperature=1.0, seed=3))
    free_product, _ = run(engine, PROMPTS, sp(guide=product | {"patient_min_p": 0.001}, temperature=1.0, seed=11))
    assert kept_delta == kept_product
    assert free_delta != kept_delta and free_product != kept_product


def _check_formula(engine, hf_models, tiny, rule, betas, patient_min_p=0.0):
    patient, doctors = hf_models
    guide = {f"beta_{n}": b for n, b in betas.items()} | {"doctors": list(betas), "rule": rule, "alpha": 0.9}
    if patient_min_p:
        guide["patient_min_p"] = patient_min_p
    prompt_ids = [tiny["tokenizer"](p)["input_ids"] for p in PROMPTS]
    from vllm import TokensPrompt

    outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sp(guide=guide, logprobs=0),
                           use_tqdm=False)
    for p_ids, o in zip(prompt_ids, outs):
        toks = list(o.outputs[0].token_ids)
        ref = guided_scores(patient, doctors, p_ids, toks, alpha=0.9, betas=betas, rule=rule,
                            patient_min_p=patient_min_p)
        assert toks == ref.argmax(-1).tolist()  # greedy follows the guided scores
        got = torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, toks)])
        want = torch.log_softmax(ref, -1)[torch.arange(len(toks)), torch.tensor(toks)]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        if patient_min_p:  # the mask did bite: some step had tokens the doctors wanted outside it
            full = guided_scores(patient, doctors, p_ids, toks, alpha=0.9, betas=betas, rule=rule)
            assert (torch.isneginf(ref) & ~torch.isneginf(full)).any()


def test_mixed_batch_equals_requests_alone(engine):
    """Plain and differently-weighted guided requests share a batch without affecting each other.

    Eight requests with four slots (max_num_seqs=4) and different lengths: requests join while
    others run, finish at different steps, slots are reused and rows are moved.
    """
    settings = [{}, {"beta": 0.5, "doctors": "doctor0"}, {"beta_doctor1": 1.2, "alpha": 0.8},
                {"beta_lora": 0.9, "rule": "delta", "patient_min_p": 0.2}, {}, {"beta": 0.3, "rule": "delta"},
                {"beta_doctor0": 2.0}, {"beta_lora": 0.6, "beta_doctor1": 0.6}]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(settings))]
    params = [sp(guide=g, max_tokens=6 + 5 * (i % 3), temperature=0.8 if i % 2 else 0.0, seed=i)
              for i, g in enumerate(settings)]
    together, _ = run(engine, prompts, params)
    alone = [run(engine, [p], [q])[0][0] for p, q in zip(prompts, params)]
    assert together == alone
    from llmdoctor_vllm.processor import active_processors

    # vLLM reports finished requests as removed at its next step: take one, unguided
    run(engine, ["The cat"], sp(max_tokens=1))
    (proc,) = [p for p in active_processors() if p.vllm_config is engine.llm_engine.vllm_config]
    occ = proc.core.occupancy()
    assert occ["guided_requests"] == 0
    assert all(v == {"streams": 0, "blocks": 0} for k, v in occ.items() if k != "guided_requests")


@pytest.mark.parametrize("bad,field", [
    ({"llmdoctor_beta_nobody": 1.0}, "llmdoctor_beta_nobody"),
    ({"llmdoctor_beta": "lots"}, "llmdoctor_beta"),
    ({"llmdoctor_alpha": math.nan}, "llmdoctor_alpha"),
    ({"llmdoctor_beta": math.inf}, "llmdoctor_beta"),
    ({"llmdoctor_beta": -0.5}, "llmdoctor_beta"),
    ({"llmdoctor_rule": "sum"}, "llmdoctor_rule"),
    ({"llmdoctor_patient_min_p": 1.5}, "llmdoctor_patient_min_p"),
    ({"llmdoctor_patient_min_p": -0.1}, "llmdoctor_patient_min_p"),
    ({"llmdoctor_doctors": ["doctor0", "nobody"]}, "llmdoctor_doctors"),
    ({"llmdoctor_betta": 1.0}, "llmdoctor_betta"),
])
def test_bad_request_is_rejected_and_engine_keeps_serving(engine, bad, field):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match=field):
        engine.generate(["The cat"], SamplingParams(max_tokens=4, extra_args=bad), use_tqdm=False)
    toks, _ = run(engine, ["The cat"], sp(guide={"beta": 0.5}, max_tokens=4))
    assert len(toks[0]) == 4
