"""The alignment-quality benchmark: its metrics on hand-computed cases, and its smallest run end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality_metrics import bleu, distinct_n, diversity, pearson, perplexity, self_bleu, win_rate
from llmdoctor_train.toy.world import toy_rewards

REPO = Path(__file__).resolve().parents[1]


def test_task_reward_hand_computed():
    texts = ["The cat kindly helps the doctor.", "A dog rudely blames my friend. The cat often sees a song.",
             "My friend warmly thanks the teacher. Our team never ignores the book.", ""]
    # +2; -2; (+2) + (-2) = 0; empty: 0
    np.testing.assert_array_equal(toy_rewards(texts), [2.0, -2.0, 0.0, 0.0])


def test_distinct_n_hand_computed():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c: {a, b, c}
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc: {ab, ba, bc}
    assert distinct_n(texts, 3) == pytest.approx(1.0)  # aba bab | abc
    assert distinct_n(["a", ""], 2) == 0.0 and distinct_n([], 1) == 0.0
    d = diversity(texts)
    assert d["distinct_2"] == pytest.approx(3 / 5) and set(d) == {"distinct_1", "distinct_2", "distinct_3",
                                                                  "self_bleu"}


def test_bleu_hand_computed():
    assert bleu("a b c d e".split(), ["a b c d e".split()]) == pytest.approx(1.0)
    assert bleu("x y z w".split(), ["a b c d".split()]) == 0.0  # no unigram match
    assert bleu([], ["a b".split()]) == 0.0 and bleu(["a"], []) == 0.0
    # p1 = 3/4, p2 = (1+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1): product 1/16; BP = exp(1 - 6/4)
    hyp, ref = "the cat sat on".split(), "the cat ran on the mat".split()
    assert bleu(hyp, [ref]) == pytest.approx(0.5 * math.exp(-0.5))
    # clipping by the largest count in one reference: "the" x4 vs max 2 -> p1 = 2/4; (the the) x3 vs 1 ->
    # p2 = 2/4; p3 = 1/3; p4 = 1/2: product 1/24; c = 4 >= r = 2: BP = 1
    assert bleu(["the"] * 4, [["the", "cat"], ["the", "the"]]) == pytest.approx(24 ** -0.25)
    # closest reference length, ties to the shorter (2, not 4): BP = 1; p4 has no 4-grams: (0+1)/(1+1)
    assert bleu("a b c".split(), ["a b".split(), "a b c d".split()]) == pytest.approx(2 ** -0.25)


def test_self_bleu_hand_computed():
    # the two identical texts score 1 against each other; the third shares no word: 0
    assert self_bleu(["a b c d", "a b c d", "e f g h"]) == pytest.approx(2 / 3)
    assert self_bleu(["a b c d"]) == 0.0
    # an empty text is a hypothesis scoring 0 but never a reference
    assert self_bleu(["a b c d", "a b c d", ""]) == pytest.approx(2 / 3)


def test_win_rate_perplexity_pearson():
    assert win_rate([1, 2, 3], [1, 1, 4]) == pytest.approx(0.5)  # tie, win, loss
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])
    assert perplexity([[math.log(0.5), math.log(0.25)], []]) == pytest.approx(math.sqrt(8))
    assert math.isnan(perplexity([[]]))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_targets_pick_points_within_the_diversity_floor():
    from benchmarks import quality_report as quality

    pt = lambda r, d2, ppl=3.0: {"reward": r, "distinct_2": d2, "perplexity": ppl}  # noqa: E731
    methods = {"patient": [pt(0.0, 0.5)], "llmdoctor_product": [pt(3.0, 0.40), pt(2.0, 0.48)],
               "llmdoctor_delta": [pt(1.0, 0.6)], "genarm_product": [pt(5.0, 0.3)],
               "genarm_delta": [pt(1.5, 0.5), pt(2.2, 0.7, ppl=40.0)], "best_of_16": [pt(2.5, 0.47)]}
    t = quality.targets(methods)
    assert t["distinct_2_floor"] == pytest.approx(0.475)
    assert (t["llmdoctor_best"], t["genarm_best"], t["best_of_16"], t["best_of_16_within_floor"]) == (
        2.0, 2.2, 2.5, None)
    assert t["llmdoctor_ge_genarm"] is False and t["llmdoctor_ge_best_of_16"] is False
    assert t["llmdoctor_ge_best_of_16_within_floor"] is None
    fluent = quality.targets(methods, ppl_factor=1.5)  # the garbled (ppl 40 > 4.5) GenARM point drops out
    assert fluent["genarm_best"] == 1.5 and fluent["llmdoctor_ge_genarm"] is True


def test_fluent_frontier_and_its_length_share():
    from benchmarks.quality_frontier import aggregate, frontier, markdown, paired, targets

    pt = lambda r, d2, wf=1.0, w=10.0: {"reward": r, "distinct_2": d2, "wellformed": wf, "mean_words": w,  # noqa: E731
                                        "setting": {}}
    def run(shift):
        return {"methods": {"patient": [pt(1.0, 0.34)],
                            "llmdoctor_product": [pt(2.0 + shift, 0.31, w=12.5), pt(9.0, 0.31, wf=0.8),
                                                  pt(3.0 + shift, 0.22, w=15.0)],
                            "llmdoctor_delta": [pt(2.5, 0.26)], "genarm_product": [pt(2.2, 0.30), pt(2.6, 0.20)],
                            "best_of_16": [pt(2.4, 0.27)]}}
    f = frontier(run(0.0))
    assert f["llmdoctor"]["0.30"]["reward"] == 2.0  # the 80%-well-formed point does not count
    assert f["llmdoctor"]["0.25"]["reward"] == 2.5 and f["llmdoctor"]["0.20"]["reward"] == 3.0
    assert f["genarm"]["0.25"]["reward"] == 2.2 and f["best_of_16"]["0.30"] is None
    # 2.0 at 12.5 words vs the patient's 1.0 at 10: 1.6 at the patient's length, so 0.4 of the 1.0 gain is length
    assert f["llmdoctor"]["0.30"]["reward_at_patient_length"] == pytest.approx(1.6)
    assert f["llmdoctor"]["0.30"]["length_share"] == pytest.approx(0.4)
    agg = aggregate([f, frontier(run(0.5)), frontier(run(1.0))])
    r = agg["llmdoctor"]["0.20"]["reward"]
    assert (r["n"], r["mean"], r["min"], r["max"]) == (3, pytest.approx(3.5), 3.0, 4.0)
    assert r["std"] == pytest.approx(0.5)
    # where the sweeps cross each level: linear between fluent neighbours, in sweep order
    assert f["crossing"]["llmdoctor"]["0.30"] == pytest.approx(2.0 + 1.0 / 9)  # (0.31, 2.0) - (0.22, 3.0)
    assert f["crossing"]["llmdoctor"]["0.25"] == pytest.approx(2.0 + 6.0 / 9)
    assert f["crossing"]["llmdoctor"]["0.20"] is None  # no fluent point below 0.22
    assert f["crossing"]["genarm"]["0.25"] == pytest.approx(2.4) and "best_of_16" not in f["crossing"]
    # the same crossing at the patient's length (R x 10 / W): 1.6 at 0.31 and 2.0 at 0.22
    assert f["crossing_at_patient_length"]["llmdoctor"]["0.25"] == pytest.approx(1.6 + 0.4 * 6.0 / 9)
    assert f["crossing_at_patient_length"]["genarm"]["0.25"] == pytest.approx(2.4)  # 10 words: no change
    assert f["crossing_at_patient_length"]["llmdoctor"]["0.20"] is None
    t = targets(agg)
    assert t["0.25"]["llmdoctor_crossing"] == pytest.approx(2.0 + 6.0 / 9 + 0.5) and t["0.25"]["ge_genarm_crossing"]
    assert t["0.20"]["ge_genarm"] is True and t["0.20"]["ge_best_of_16"] is True
    assert t["0.30"]["genarm"] == pytest.approx(2.2) and t["0.30"]["best_of_16"] == pytest.approx(2.4)
    # LLMdoctor - GenARM seed by seed: 0.4, 0.9, 1.4 at 0.20; at the 0.25 crossing 2/3 - 0.4 + shift
    d = paired([f, frontier(run(0.5)), frontier(run(1.0))])
    assert (d["0.20"]["frontier"]["n"], d["0.20"]["frontier"]["mean"]) == (3, pytest.approx(0.9))
    assert d["0.20"]["frontier"]["sem"] == pytest.approx(0.5 / 3 ** 0.5)
    assert d["0.30"]["frontier"]["mean"] == pytest.approx(0.3)
    assert d["0.25"]["crossing"]["mean"] == pytest.approx(6.0 / 9 - 0.4 + 0.5)
    assert d["0.20"]["crossing"] == {"n": 0}  # LLMdoctor's sweep does not cross 0.20
    assert d["0.25"]["crossing_at_patient_length"]["n"] == 3
    # a method missing from some seeds (doctors-only runs mixed in) says over how many seeds it is
    short = frontier(run(1.0) | {"methods": {k: v for k, v in run(1.0)["methods"].items() if k != "best_of_16"}})
    table = markdown(aggregate([f, frontier(run(0.5)), short]))
    assert "(+2.40…+2.40; 10.0 w; 2 seeds)" in table and "(+3.00…+4.00; 15.0 w) |" in table


def test_quick_benchmark_end_to_end(tmp_path):
    """The smallest settings run the whole benchmark (patient, pairs, Stage 1, both doctors, every
    method in one engine) and write well-formed results, into tmp_path only."""
    out = tmp_path / "out"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--workdir",
                           str(tmp_path / "work"), "--output-dir", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "quality.json").read_text())
    assert isinstance(res["task"], str) and res["task"]
    expected = {"patient", "llmdoctor_product", "llmdoctor_delta", "genarm_product", "genarm_delta", "args",
                "best_of_4", "best_of_16", "aisp"}
    assert expected <= set(res["methods"])
    for name, points in res["methods"].items():
        if name == "best_of_16":  # --quick runs best-of-4 only
            continue
        assert points, name
        for p in points:
            for key in ("setting", "reward", "win_rate", "distinct_1", "distinct_2", "distinct_3", "self_bleu",
                        "perplexity", "compute"):
                assert key in p, (name, key)
            assert 0 <= p["win_rate"] <= 1 and 0 <= p["distinct_2"] <= 1 and 0 <= p["self_bleu"] <= 1
            assert p["perplexity"] > 1 and p["compute"] > 0
    assert res["methods"]["patient"][0]["win_rate"] == 0.5
    assert 0 < res["stage1"]["fraction_rewarded"] <= 1 and "pearson_gap" in res["stage1"]
    probe = res["doctors"]["probe"]
    assert set(probe) == {"tfpo", "genarm"}
    # both LoRA doctors sit on the patient, so their references' P(stop) are the patient's, equal
    assert 0 < probe["tfpo"]["stop"]["reference"] < 1 and 0 < probe["tfpo"]["stop"]["doctor"] < 1
    assert probe["tfpo"]["stop"]["reference"] == pytest.approx(probe["genarm"]["stop"]["reference"], rel=1e-5)
    for f in ("quality.md", "quality.png", "quality_compute.png"):
        assert (out / f).stat().st_size > 0

    # a variant: both doctors trained again on EOS-ended pairs and decoded with patient_min_p and a
    # patient weight alpha, no baselines; merged onto the base run
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--reuse", "--doctors-only",
                           "--append-eos", "--patient-min-p", "0.05", "--alpha", "0.8", "--workdir",
                           str(tmp_path / "work"), "--output-dir", str(out), "--name", "variant"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variant = json.loads((out / "variant.json").read_text())
    assert not variant["methods"]["args"] and not variant["methods"]["aisp"]
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(res["patient"]["patient"]).eos_token_id
    with_eos, without = (load_from_disk(str(tmp_path / "work" / d)) for d in ("rewards_eos", "rewards"))
    assert all(ids[-1] == eos for ids in list(with_eos["chosen_ids"]) + list(with_eos["rejected_ids"]))
    assert [ids + [eos] for ids in without["chosen_ids"]] == list(with_eos["chosen_ids"])
    assert {Path(p).name for p in variant["doctors"]["paths"].values()} == {"doctor_tfpo_s42_eos",
                                                                            "doctor_genarm_s42_eos"}
    from benchmarks.quality_frontier import DOCTOR_METHODS, merge_doctors

    merged = merge_doctors(res, variant)
    assert merged["settings"]["patient_min_p"] == 0.05 and merged["settings"]["append_eos"] is True
    assert merged["settings"]["alpha"] == 0.8 and res["settings"]["alpha"] == 1.0
    assert merged["methods"]["args"] == res["methods"]["args"]
    for m in DOCTOR_METHODS:
        assert merged["methods"][m] and all(p["setting"]["patient_min_p"] == 0.05 and p["setting"]["alpha"] == 0.8
                                            for p in merged["methods"][m])
    assert all("alpha" not in p["setting"] for m in DOCTOR_METHODS for p in res["methods"][m])
    # the workdir holds world 0: reusing it as another world is refused
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--reuse", "--world-seed", "1",
                           "--workdir", str(tmp_path / "work"), "--output-dir", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "holds world 0, not --world-seed 1" in proc.stderr
    # ... and so is reusing it with other world sizes (more preference pairs)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--reuse", "--pair-prompts", "30",
                           "--workdir", str(tmp_path / "work"), "--output-dir", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "other world sizes" in proc.stderr and "'pair_prompts': (24, 30)" in proc.stderr


def test_probe_compares_each_doctor_with_its_own_reference(tiny, hf_models):
    """The quality probe's reference is the delta rule's: a full doctor's starting weights, a LoRA
    doctor's base with the adapter off; the pair shift is doctor minus reference, chosen minus rejected."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.quality_report import _doctor_and_reference, _pair_shifts

    _, doctors = hf_models
    x = torch.tensor([[1, 5, 9, 2, 7, 3]])
    pair = {"prompt_ids": [1, 5], "chosen_ids": [9, 2], "rejected_ids": [7], "chosen_rewards": [0.5, 0.0],
            "rejected_rewards": [-0.3]}
    assert {d.manifest.kind for d in doctors.values()} == {"full", "lora"}
    for name, loaded in doctors.items():
        doctor, reference = _doctor_and_reference(loaded)
        expected = loaded.reference_model if loaded.manifest.kind == "full" else \
            AutoModelForCausalLM.from_pretrained(tiny["root"] / "lora_base").eval()
        with torch.no_grad():
            ref_logits, doc_logits = reference(input_ids=x).logits, doctor(input_ids=x).logits
            torch.testing.assert_close(ref_logits, expected(input_ids=x).logits)
            assert not torch.allclose(ref_logits, doc_logits), name

            def lp(run, ids):
                t = torch.tensor([pair["prompt_ids"] + ids])
                return float(torch.log_softmax(run(input_ids=t).logits, -1)[0, 1:-1].gather(1, t[0, 2:, None]).sum())

            want = (lp(doctor, [9, 2]) - lp(reference, [9, 2])) - (lp(doctor, [7]) - lp(reference, [7]))
            shift, target = _pair_shifts(doctor, reference, [pair])
        assert shift == [pytest.approx(want, abs=1e-5)] and target == [pytest.approx(0.8)]
