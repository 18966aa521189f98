"""The quality benchmark: its metrics and operating point on hand-computed cases, the fluency judge
on a tiny local model, and the whole benchmark end to end on tiny models (no Gemma download)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from benchmarks.quality.judge import perplexity
from benchmarks.quality.metrics import distinct_n, operating_point, over_seeds, summarize
from benchmarks.quality.report import METHODS, targets


def test_distinct_n_hand_computed():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c: {a, b, c}
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc: {ab, ba, bc}
    assert distinct_n(["a", ""], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_summarize_and_over_seeds_hand_computed():
    s = summarize([0.9, 0.5, -0.2, 0.1], [np.log([0.5, 0.25]), np.zeros(0), np.log([0.5])], ["a b", "a b", "c", ""],
                  [2, 0, 1, 3], seconds=2.0)
    assert s["reward"] == pytest.approx(0.325) and s["positive_share"] == 0.5  # 0.5 counts as positive
    assert s["perplexity"] == pytest.approx(np.exp(-np.log(0.5 * 0.25 * 0.5) / 3))  # pooled over tokens
    assert s["distinct_2"] == 0.5 and s["mean_tokens"] == 1.5 and s["tokens_per_second"] == 3.0
    agg = over_seeds([s, {**s, "reward": 0.525}])
    assert agg["reward"] == pytest.approx(0.425) and agg["reward_std"] == pytest.approx(0.2 / np.sqrt(2))
    assert agg["perplexity_std"] == 0.0 and agg["seeds"] == 2
    assert perplexity([np.zeros(0)]) != perplexity([np.zeros(0)])  # nan: no tokens


def test_operating_point_respects_both_bounds():
    plain = {"reward": 0.5, "perplexity": 10.0, "distinct_2": 1.0}
    pts = [{"reward": 0.9, "perplexity": 12.5, "distinct_2": 1.0},  # too disfluent (> 12)
           {"reward": 0.8, "perplexity": 11.0, "distinct_2": 0.85},  # too repetitive (< 0.9)
           {"reward": 0.7, "perplexity": 12.0, "distinct_2": 0.9},  # on both bounds: qualifies
           {"reward": 0.6, "perplexity": 9.0, "distinct_2": 0.9}]
    assert operating_point(pts, plain) is pts[2]
    assert operating_point(pts[:2], plain) is None
    assert operating_point(pts, plain, ppl_factor=1.3) is pts[0]


def test_targets():
    m = {k: {"reward_at_operating_point": v} for k, v in
         {"llmdoctor": 0.8, "genarm": 0.8, "best_of_4": 0.7, "prompted": 0.8, "best_of_16": 0.9}.items()}
    assert targets(m) == {"llmdoctor_ge_genarm": True, "llmdoctor_ge_best_of_4": True, "llmdoctor_gt_prompted": False,
                          "stretch_llmdoctor_ge_best_of_16": False}
    m["genarm"]["reward_at_operating_point"] = None
    assert targets(m)["llmdoctor_ge_genarm"] is None


@pytest.fixture(scope="module")
def judge(tiny):
    from benchmarks.quality.judge import Judge

    return Judge(tiny["patient"], batch_size=2)


def test_judge_scores_reply_tokens_after_bos_and_context(judge):
    """Each reply's log-probabilities equal a plain full forward of ``<bos> context \\n\\n reply`` read at
    the reply's tokens, whatever the batch (padding) around it."""
    import torch

    contexts = ["The cat kindly helps", "A dog", "My friend sees the book"]
    replies = ["the doctor thanks the teacher.", "never", "A dog rudely blames my friend and the cat."]
    got = judge.token_logprobs(contexts, replies)
    for c, r, lp in zip(contexts, replies, got):
        ids, start = judge.encode(c, r)
        assert ids[0] == judge.tok.bos_token_id and ids[1] != judge.tok.bos_token_id
        assert len(lp) == len(ids) - start == len(judge.tok(r, add_special_tokens=False)["input_ids"])
        with torch.inference_mode():
            ref = judge.model(torch.tensor([ids])).logits[0].log_softmax(-1)
        want = ref[start - 1:-1].gather(1, torch.tensor(ids[start:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(lp, want, rtol=1e-4, atol=1e-4)
    alone = judge.token_logprobs(contexts[1:2], replies[1:2])[0]
    np.testing.assert_allclose(alone, got[1], rtol=1e-4, atol=1e-4)
    assert judge.token_logprobs(["x"], [""])[0].size == 0


def test_benchmark_end_to_end_on_tiny_models(tiny, tmp_path):
    """The whole benchmark on a tiny patient (a chat template added) with the tiny LoRA doctor as both
    doctors and the tiny patient as judge: every method is reported, with the fields the docs read, the
    PNG is written, and a rerun on the same workdir reuses the samples."""
    from transformers import AutoTokenizer

    from benchmarks.quality.run import main

    patient = tmp_path / "patient"
    shutil.copytree(tiny["patient"], patient)
    tok = AutoTokenizer.from_pretrained(patient)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    tok.save_pretrained(patient)
    argv = ["--patient", str(patient), "--doctor", tiny["doctors"]["lora"], "--genarm", tiny["doctors"]["lora"],
            "--judge", tiny["patient"], "--seeds", "0", "1", "--n-prompts", "3", "--max-tokens", "6",
            "--betas", "1", "--args-w", "1", "--args-k", "3", "--max-num-seqs", "64",
            "--output-dir", str(tmp_path / "out"), "--name", "q", "--workdir", str(tmp_path / "work")]
    result = main(argv)
    saved = json.loads((tmp_path / "out" / "q.json").read_text())
    assert (tmp_path / "out" / "q.png").stat().st_size > 0
    assert set(saved["methods"]) == set(METHODS)
    assert saved["command"].startswith("python -m benchmarks.quality ")
    plain = saved["methods"]["plain"]
    assert plain["reward_at_operating_point"] is not None and plain["calls_per_token"] == 1
    for name, entry in saved["methods"].items():
        assert {"reward_at_operating_point", "spread", "command", "points"} <= set(entry)
        for p in entry["points"]:  # one draw of 16 samples: one best-of-16, best-of-4 from two of its groups
            assert p["seeds"] == len(p["per_seed"]) == (1 if name == "best_of_16" else 2) and p["perplexity"] > 1
    doc = saved["methods"]["llmdoctor"]["points"]
    assert sorted((p["setting"]["rule"], p["calls_per_token"]) for p in doc) == [("delta", 3.0), ("product", 2.0)]
    assert [p["calls_per_token"] for p in (saved["methods"]["best_of_4"]["points"][0],
                                            saved["methods"]["best_of_16"]["points"][0])] == [4.0, 16.0]
    # best-of-16 picks among all 16 samples, so it is never below best-of-4 from its first 4
    b4, b16 = (saved["methods"][m]["points"][0]["per_seed"] for m in ("best_of_4", "best_of_16"))
    assert all(x["reward"] >= y["reward"] for x, y in zip(b16, b4))
    assert set(saved["targets"]) == set(result["targets"])
    store = json.loads((tmp_path / "work" / "store.json").read_text())
    again = main(argv)  # everything comes from the store: same numbers
    assert again["methods"]["llmdoctor"]["points"][0]["reward"] == result["methods"]["llmdoctor"]["points"][0]["reward"]
    assert json.loads((tmp_path / "work" / "store.json").read_text())["samples"] == store["samples"]
