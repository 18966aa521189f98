"""ARGS and AISP baselines in a real in-process vLLM engine (tiny random patient from ``tiny``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.baselines.aisp import (aisp_generate, aisp_noise, importance_weights, load_output_embedding,
                                           sample_seeds, sampling_params, update_mean)

PROMPTS = ["The cat kindly", "A dog sees the", "My friend"]


@pytest.fixture(scope="module")
def table(tiny):
    """A random token table over the tokenizer (shorter than the padded vocabulary), one clear winner."""
    rng = np.random.default_rng(0)
    t = rng.normal(0, 0.5, len(tiny["tokenizer"])).astype(np.float32)
    t[100] = 5.0
    return t


@pytest.fixture(scope="module")
def llm(tiny, table, tmp_path_factory, keep_alive):
    """One engine with both baselines; logprobs are the raw patient's (to see its own top-k)."""
    from vllm import LLM

    from benchmarks.baselines.aisp import AISPLogitsProcessor
    from benchmarks.baselines.args import ARGSLogitsProcessor

    path = tmp_path_factory.mktemp("args") / "table.npy"
    np.save(path, table)
    engine = LLM(model=tiny["patient"], logits_processors=[ARGSLogitsProcessor, AISPLogitsProcessor],
                 additional_config={"args": {"token_rewards": str(path)}}, dtype="float32", enforce_eager=True,
                 kv_cache_memory_bytes=128 << 20, max_model_len=256, max_num_seqs=8, seed=0,
                 logprobs_mode="raw_logprobs")
    keep_alive(engine)
    return engine


def _ids(llm, prompts, params):
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _sp(**kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=kw.pop("max_tokens", 12), **kw)


# ----------------------------------------------------------------------------- ARGS

def test_args_w0_k1_is_greedy(llm):
    """w=0, k=1 keeps only the patient's top token: sampling at temperature 1 is greedy decoding."""
    greedy = _ids(llm, PROMPTS, _sp(temperature=0.0))
    args = _ids(llm, PROMPTS, [_sp(temperature=1.0, seed=i, extra_args={"args_w": 0.0, "args_k": 1})
                               for i in range(len(PROMPTS))])
    assert args == greedy


def test_args_large_w_picks_best_table_token_in_topk(llm, tiny, table):
    """With a large w, each step's token is the best-table token among the patient's own top-k,
    per row's k (k=3 and the default 10 in one batch)."""
    padded = np.pad(table, (0, 512))
    ks = [3, 10, 3]
    params = [_sp(temperature=0.0, logprobs=10, extra_args={"args_w": 1000.0, **({"args_k": k} if k != 10 else {})})
              for k in ks]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    steered = 0
    for o, k in zip(outs, ks):
        c = o.outputs[0]
        assert len(c.token_ids) == 12
        for tok, lp in zip(c.token_ids, c.logprobs):
            top = [t for t, x in lp.items() if x.rank <= k]  # the raw patient's top-k at this step
            assert len(top) == k
            assert tok == max(top, key=lambda t: padded[t])
            steered += tok != next(t for t, x in lp.items() if x.rank == 1)
    assert steered > 0  # the reward moved decoding off the patient's greedy choice


def test_args_whole_vocab_steers_to_table_argmax(llm, table):
    """k >= vocab and a large w: every token is the table's winner (token 100)."""
    out = _ids(llm, PROMPTS[:1], _sp(temperature=1.0, seed=0, extra_args={"args_w": 1000.0, "args_k": 10**6}))
    assert out == [[int(np.argmax(table))] * 12] and np.argmax(table) == 100


def test_args_plain_rows_untouched_in_mixed_batch(llm):
    """Plain rows batched with ARGS rows come out as in a plain-only run; the ARGS rows change."""
    plain = [_sp(temperature=1.0, seed=10 + i) for i in range(len(PROMPTS))]
    alone = _ids(llm, PROMPTS, plain)
    guided = [_sp(temperature=1.0, seed=10 + i, extra_args={"args_w": 3.0}) for i in range(len(PROMPTS))]
    mixed = _ids(llm, [p for p in PROMPTS for _ in range(2)], [sp for pair in zip(plain, guided) for sp in pair])
    assert mixed[0::2] == alone
    assert mixed[1::2] != alone


@pytest.mark.parametrize("extra, field", [
    ({"args_w": float("nan")}, "args_w"), ({"args_w": "1"}, "args_w"), ({"args_w": 1.0, "args_k": -1}, "args_k"),
    ({"args_w": 1.0, "args_k": 2.5}, "args_k"), ({"args_k": 3}, "args_w"), ({"args_x": 1}, "args_x"),
    ({"aisp_tau": 4, "aisp_sigma": -1.0}, "aisp_sigma"), ({"aisp_sigma": 1.0}, "aisp_tau"),
    ({"aisp_tau": 2, "aisp_mean": [0.0, 1.0, 2.0]}, "aisp_mean"), ({"aisp_tau": 1, "aisp_seed": 1.5}, "aisp_seed")])
def test_bad_arguments_refused(llm, extra, field):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match=field):
        llm.generate(PROMPTS[:1], _sp(extra_args=extra), use_tqdm=False)
    assert len(_ids(llm, PROMPTS[:1], _sp(temperature=0.0))[0]) == 12  # the engine still serves


# ----------------------------------------------------------------------------- AISP

def test_aisp_sigma0_is_plain_and_sigma_changes_output(llm):
    """In one batch: sigma=0 rows equal plain seeded decoding token for token, sigma>0 rows differ."""
    n = len(PROMPTS)
    plain = _ids(llm, PROMPTS, [_sp(temperature=1.0, seed=20 + i) for i in range(n)])
    aisp = [_sp(temperature=1.0, seed=20 + i, extra_args={"aisp_seed": 7 + i, "aisp_sigma": s, "aisp_tau": 16})
            for s in (0.0, 2.0) for i in range(n)]
    out = _ids(llm, PROMPTS + PROMPTS, aisp)
    assert out[:n] == plain
    assert all(a != b for a, b in zip(out[n:], plain))


def test_aisp_perturbs_exactly_positions_before_tau(llm, tiny):
    """A mean spike ``c * W[x]`` at positions 0..3 (tau=4, sigma=0) forces x there; from position 4
    on, decoding is the plain patient's greedy continuation of that prefix."""
    W = load_output_embedding(tiny["patient"]).numpy()
    x = next(i for i in range(100, 300) if np.argmax(W @ W[i]) == i)
    ids = tiny["tokenizer"](PROMPTS[0])["input_ids"]
    mean = np.tile(20.0 * W[x], (4, 1))
    out = _ids(llm, {"prompt_token_ids": ids}, _sp(temperature=0.0, extra_args={
        "aisp_seed": 1, "aisp_sigma": 0.0, "aisp_tau": 4, "aisp_mean": mean.ravel().tolist()}))[0]
    assert out[:4] == [x] * 4
    cont = _ids(llm, {"prompt_token_ids": ids + [x] * 4}, _sp(temperature=0.0, max_tokens=8))[0]
    assert out[4:] == cont


def test_importance_weights_limits_and_mean_update():
    r = np.array([[1.0, 3.0, 2.0, 3.0 - 1e-3], [0.0, -1.0, 5.0, 4.0]])
    np.testing.assert_array_equal(importance_weights(r, 0.0), [[0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(importance_weights(r, 1e-6), [[0, 1, 0, 0], [0, 0, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(importance_weights(r, 1e9), np.full((2, 4), 0.25), atol=1e-8)
    np.testing.assert_allclose(importance_weights(r, math.inf), np.full((2, 4), 0.25))
    w = importance_weights(r, 1.0)
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_allclose(w[1], np.exp(r[1]) / np.exp(r[1]).sum())
    eps = np.stack([aisp_noise(s, 3, 5) for s in range(4)])
    np.testing.assert_array_equal(aisp_noise(2, 3, 5), eps[2])  # the driver rebuilds the processor's noise
    mean = np.ones((3, 5), np.float32)
    np.testing.assert_allclose(update_mean(eps, [0, 0, 1, 0], mean, 0.5), mean + 0.5 * eps[2], rtol=1e-6)
    np.testing.assert_allclose(update_mean(eps, [0.25] * 4, mean, 0.5), mean + 0.5 * eps.mean(0), rtol=1e-5)


def test_aisp_generate_best_sample_and_best_of_n_limit(llm):
    """The returned reward is the max over all samples (its text among them); at lam -> 0 the next
    mean is the best sample's v, and one iteration selects what best-of-n selects over the same samples."""
    def reward(texts):
        return np.array([t.count("e") + 1e-3 * len(t) for t in texts])

    kw = dict(n=4, sigma=1.0, tau=8, max_tokens=12, temperature=1.0, seed=3)
    res = aisp_generate(llm, PROMPTS[:2], reward, iterations=2, lam=1e-9, **kw)
    sr, st = res["sample_rewards"], res["sample_texts"]
    assert sr.shape == (2, 2, 4) and res["compute"]["samples"] == 16
    assert 16 <= res["compute"]["generated_tokens"] <= 16 * 12
    np.testing.assert_array_equal(res["rewards"], sr.max(axis=(0, 2)))
    for p in range(2):
        assert res["texts"][p] in st[0][p] + st[1][p] and reward([res["texts"][p]])[0] == res["rewards"][p]
        best = int(np.argmax(sr[0, p]))  # lam -> 0: u_1 = v^(best) = 0 + sigma * eps^(best)
        seed = sample_seeds(3, 0, 2, 4)[p, best]
        np.testing.assert_allclose(res["means"][1, p], aisp_noise(seed, 8, res["means"].shape[-1]), rtol=1e-5)
    one = aisp_generate(llm, PROMPTS[:2], reward, iterations=1, lam=0.0, **kw)
    params = sampling_params(sample_seeds(3, 0, 2, 4).ravel(), None, sigma=1.0, tau=8, max_tokens=12,
                             temperature=1.0)
    texts = [o.outputs[0].text for o in llm.generate([p for p in PROMPTS[:2] for _ in range(4)], params,
                                                     use_tqdm=False)]
    bon = [texts[4 * p + int(np.argmax(reward(texts[4 * p:4 * p + 4])))] for p in range(2)]
    assert one["texts"] == bon == [st[0][p][int(np.argmax(sr[0, p]))] for p in range(2)]


# ----------------------------------------------------------------------------- batch bookkeeping

def test_rows_keep_their_state_through_finishes_and_refills(llm):
    """Ten requests of different lengths through eight slots (vLLM removes, refills and moves
    rows as they finish): every request decodes exactly as when it runs alone."""
    extras = [None, {"args_w": 3.0}, {"aisp_seed": 1, "aisp_sigma": 2.0, "aisp_tau": 16}, None,
              {"aisp_seed": 2, "aisp_sigma": 2.0, "aisp_tau": 3}, {"args_w": 2.0, "args_k": 4}, None,
              {"aisp_seed": 4, "aisp_sigma": 2.0, "aisp_tau": 16}, {"aisp_seed": 3, "aisp_sigma": 1.0, "aisp_tau": 8},
              {"args_w": 5.0, "args_k": 2}]
    lens = [2, 12, 3, 12, 12, 4, 5, 12, 9, 12]  # late rows (an AISP one last) move into the holes
    prompts = [PROMPTS[i % 3] for i in range(10)]
    params = [_sp(temperature=1.0, seed=40 + i, max_tokens=m, extra_args=e) for i, (m, e) in enumerate(zip(lens, extras))]
    together = _ids(llm, prompts, params)
    alone = [_ids(llm, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert together == alone
    assert [len(t) for t in together] == lens


def test_load_table_pads_and_refuses():
    from benchmarks.baselines.args import load_table

    np.testing.assert_array_equal(load_table([1.0, -2.0], 4), [1.0, -2.0, 0.0, 0.0])
    for bad in ([1.0] * 5, [1.0, float("nan")], [[1.0]], "/nonexistent/table.npy"):
        with pytest.raises(ValueError, match="token_rewards"):
            load_table(bad, 4)


def test_token_table_is_exact_for_the_toy_reward():
    """On the toy world's tokenizer each good/bad word (with its space) is one token, so the table
    summed over a well-formed reply's tokens is its toy reward."""
    import random

    from benchmarks.baselines.args import token_reward_table
    from llmdoctor_train.toy.models import build_tokenizer
    from llmdoctor_train.toy.world import BAD_WORDS, GOOD_WORDS, sample_reply, toy_reward, toy_world_corpus

    tok = build_tokenizer([r["text"] for r in toy_world_corpus(3000, seed=0)], vocab_size=1024)
    table = token_reward_table(tok, toy_reward, size=1024)
    assert table.shape == (1024,) and not table[len(tok):].any()
    for w in GOOD_WORDS + BAD_WORDS:
        assert len(tok(" " + w)["input_ids"]) == 1
    rng = random.Random(0)
    replies = [sample_reply(rng, "the cat", c) for c in ("pos", "neg", "neutral") * 30]
    got = [table[tok(" " + r)["input_ids"]].sum() for r in replies]
    np.testing.assert_array_equal(got, [toy_reward(r) for r in replies])
    assert {int(table.max()), int(table.min())} == {1, -1}
