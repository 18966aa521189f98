"""The ARGS baseline in a real in-process vLLM engine (tiny random patient from ``tiny``), with a text
reward named by import path."""

from __future__ import annotations

import numpy as np
import pytest

PROMPTS = ["The cat kindly", "A dog sees the", "My friend"]
REWARD = "tests.test_baselines:count_e"


def count_e(texts: list[str]) -> np.ndarray:
    """A text reward for the tests: how many letters ``e`` a text holds (integers, so ties are exact)."""
    return np.array([t.count("e") for t in texts], dtype=np.float64)


@pytest.fixture(scope="module")
def llm(tiny, keep_alive):
    """One engine with ARGS; logprobs are the raw patient's (to see its own top-k)."""
    from vllm import LLM

    from benchmarks.quality.baselines.args import ARGSLogitsProcessor

    engine = LLM(model=tiny["patient"], logits_processors=[ARGSLogitsProcessor],
                 additional_config={"args": {"reward": REWARD}}, dtype="float32", enforce_eager=True,
                 kv_cache_memory_bytes=128 << 20, max_model_len=256, max_num_seqs=8, seed=0,
                 logprobs_mode="raw_logprobs")
    keep_alive(engine)
    return engine


def _ids(llm, prompts, params):
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _sp(**kw):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=kw.pop("max_tokens", 12), **kw)


def test_args_w0_k1_is_greedy(llm):
    """w=0, k=1 keeps only the patient's top token: sampling at temperature 1 is greedy decoding."""
    greedy = _ids(llm, PROMPTS, _sp(temperature=0.0))
    args = _ids(llm, PROMPTS, [_sp(temperature=1.0, seed=i, extra_args={"args_w": 0.0, "args_k": 1})
                               for i in range(len(PROMPTS))])
    assert args == greedy


def test_args_large_w_picks_best_reward_candidate_in_topk(llm, tiny):
    """With a large w, each step's token is the candidate among the patient's own top-k whose reply so
    far (decoded, the candidate appended) scores best, the patient's logit breaking ties; per row's k
    (k=3 and the default 10 in one batch)."""
    tok = tiny["tokenizer"]
    ks = [3, 10, 3]
    params = [_sp(temperature=0.0, logprobs=10, extra_args={"args_w": 1e4, **({"args_k": k} if k != 10 else {})})
              for k in ks]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    steered = 0
    for o, k in zip(outs, ks):
        c = o.outputs[0]
        assert len(c.token_ids) == 12
        for t, (got, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            top = [v for v, x in lp.items() if x.rank <= k]  # the raw patient's top-k at this step
            assert len(top) == k
            texts = tok.batch_decode([list(c.token_ids[:t]) + [v] for v in top], skip_special_tokens=True)
            r = count_e(texts)
            assert got == max(top, key=lambda v: (r[top.index(v)], lp[v].logprob))
            steered += got != next(v for v, x in lp.items() if x.rank == 1)
    assert steered > 0  # the reward moved decoding off the patient's greedy choice


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
    ({"args_w": 1.0, "args_k": 2.5}, "args_k"), ({"args_k": 3}, "args_w"), ({"args_x": 1}, "args_x")])
def test_bad_arguments_refused(llm, extra, field):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match=field):
        llm.generate(PROMPTS[:1], _sp(extra_args=extra), use_tqdm=False)
    assert len(_ids(llm, PROMPTS[:1], _sp(temperature=0.0))[0]) == 12  # the engine still serves


def test_rows_keep_their_state_through_finishes_and_refills(llm):
    """Ten requests of different lengths through eight slots (vLLM removes, refills and moves rows as
    they finish): every request decodes exactly as when it runs alone, its reward reading its own reply."""
    extras = [None, {"args_w": 3.0}, {"args_w": 1e4, "args_k": 3}, None, {"args_w": 1e4}, {"args_w": 2.0, "args_k": 4},
              None, {"args_w": 1e4, "args_k": 6}, {"args_w": 1.0, "args_k": 8}, {"args_w": 5.0, "args_k": 2}]
    lens = [2, 12, 3, 12, 12, 4, 5, 12, 9, 12]  # late rows move into the holes
    prompts = [PROMPTS[i % 3] for i in range(10)]
    params = [_sp(temperature=1.0, seed=40 + i, max_tokens=m, extra_args=e) for i, (m, e) in enumerate(zip(lens, extras))]
    together = _ids(llm, prompts, params)
    alone = [_ids(llm, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert together == alone
    assert [len(t) for t in together] == lens


def test_load_reward_resolves_and_refuses():
    from benchmarks.quality.baselines.args import load_reward

    assert load_reward(REWARD) is count_e
    for bad in ("tests.test_baselines:nothing", "no_such_module:f", "tests.test_baselines", "tests.test_baselines:PROMPTS"):
        with pytest.raises(ValueError, match="args.reward"):
            load_reward(bad)
