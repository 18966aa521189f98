"""Stage 1 token rewards: the formulas by hand, vLLM's log-probs against transformers, the data
checks, restartable shards and an end-to-end run (one in-process engine for the module)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmdoctor_train.stage1.rewards import DEFAULT_NEGATIVE, DEFAULT_POSITIVE, Dimension, ragged_token_rewards, token_rewards
from llmdoctor_train.stage1.data import BadRowError, load_preferences
from llmdoctor_train.stage1.pipeline import RewardsConfig, compute_rewards
from llmdoctor_train.stage1.data import PromptFormatter
from llmdoctor_train.stage1.scoring import score_with_hf, score_with_vllm

MAX_LEN = 256
ROWS = [
    {"prompt": "The cat kindly", "chosen": " helps the book.", "rejected": " badly reads a letter."},
    {"prompt": [{"role": "user", "content": "A dog quickly"}],
     "chosen": [{"role": "assistant", "content": " thanks the teacher."}],
     "rejected": [{"role": "assistant", "content": " rarely calls."}]},
    {"prompt": "Our team", "chosen": " warmly builds the house.", "rejected": " never answers."},
    {"prompt": "My friend carefully", "chosen": " writes an answer.", "rejected": " poorly finds the river."},
    {"prompt": "The teacher", "chosen": " clearly reads a song.", "rejected": " rudely calls."},
]
DIMS = [Dimension("help"), Dimension("harm", "Be safe: refuse harm.", "Be reckless.")]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    from llmdoctor_train.toy.models import build_tiny_lm, build_tokenizer, save_lm

    tok = build_tokenizer()
    return save_lm(build_tiny_lm(tok, vocab_pad_to=64), tok, tmp_path_factory.mktemp("rw") / "patient")


@pytest.fixture(scope="module")
def tok(patient):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(patient)


@pytest.fixture(scope="module")
def llm(patient, keep_alive):
    """The module's one in-process engine (kept alive to the session's end, see conftest)."""
    from vllm import LLM

    from llmdoctor_train.toy.pipeline import engine_kwargs

    engine = LLM(model=patient, **engine_kwargs(kv_cache_memory_bytes=16 << 20, max_model_len=MAX_LEN,
                                                max_num_seqs=16))
    keep_alive(engine)
    return engine


# --- formulas -----------------------------------------------------------------------------------

def from_gaps(gaps, seed=0):
    """log-prob pairs whose |difference| is ``gaps`` (random sign, random base)."""
    rng = np.random.default_rng(seed)
    d = np.asarray(gaps, dtype=np.float64)
    base = rng.uniform(-12, -1, d.size)
    flip = rng.choice([-1.0, 1.0], d.size)
    return base + flip * d, base


def test_token_at_mean_importance_gets_tanh_1():
    r = token_rewards(*from_gaps([1.0, 1.0, 1.0]), sign=+1)
    np.testing.assert_allclose(r.S, math.tanh(1 / (1 + 1e-6)), rtol=1e-12)
    assert abs(r.S[0] - 0.7616) < 1e-4
    np.testing.assert_allclose(r.rewards, r.S)
    np.testing.assert_allclose(r.logp_gap, 1.0, rtol=1e-12)


def test_hand_values_threshold_and_sign():
    gaps = [2.0, 1.0, 0.5, 0.45, 0.05]  # mean 0.8
    S = np.tanh(np.array(gaps) / (0.8 + 1e-6))
    pos = token_rewards(*from_gaps(gaps), sign=+1)
    neg = token_rewards(*from_gaps(gaps, seed=1), sign=-1)
    np.testing.assert_allclose(pos.S, S, rtol=1e-10)
    assert S[-1] < 0.1 and pos.rewards[-1] == 0 and neg.rewards[-1] == 0  # below θ: no reward
    np.testing.assert_allclose(pos.rewards[:-1], S[:-1], rtol=1e-10)
    np.testing.assert_allclose(neg.rewards[:-1], -S[:-1], rtol=1e-10)  # rejected: negative
    high = token_rewards(*from_gaps(gaps), sign=+1, theta=0.8)  # θ is settable
    np.testing.assert_allclose(high.rewards, np.where(S > 0.8, S, 0.0), rtol=1e-10)


def test_threshold_boundary_is_atanh_theta_times_mean():
    theta, eps = 0.1, 1e-6
    edge = math.atanh(theta) * (1 + eps)  # gap = atanh(θ)·(mean + ε) with mean = 1
    for a, rewarded in ((edge - 1e-6, False), (edge + 1e-6, True)):
        r = token_rewards(*from_gaps([a, 2 - a]), sign=+1, theta=theta, eps=eps)
        assert (r.rewards[0] != 0) == rewarded and r.rewards[1] > 0


def test_no_importance_gives_zero_not_nan():
    r = token_rewards([-3.0, -2.0], [-3.0, -2.0], sign=+1)
    assert np.all(r.S == 0) and np.all(r.rewards == 0) and not np.isnan(r.S).any()


def test_ragged_equals_one_response_at_a_time():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 9, 12)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    lp, ln = rng.normal(-5, 2, offsets[-1]), rng.normal(-5, 2, offsets[-1])
    signs = rng.choice([-1.0, 1.0], lengths.size)
    flat = ragged_token_rewards(lp, ln, offsets, signs, theta=0.3)
    for i in range(lengths.size):
        s = slice(offsets[i], offsets[i + 1])
        one = token_rewards(lp[s], ln[s], signs[i], theta=0.3)
        np.testing.assert_allclose(flat.rewards[s], one.rewards, rtol=1e-12)
    # offsets need not start at 0 (arrow slices)
    shifted = ragged_token_rewards(np.r_[0.0, lp], np.r_[9.0, ln], offsets + 1, signs, theta=0.3)
    np.testing.assert_allclose(shifted.rewards, flat.rewards, rtol=1e-12)


def test_dimension_parsing():
    d = Dimension.parse(r"harm:Be safe\: always.:Be reckless.")
    assert (d.name, d.positive, d.negative) == ("harm", "Be safe: always.", "Be reckless.")
    d = Dimension.parse("help::")
    assert (d.positive, d.negative) == (DEFAULT_POSITIVE, DEFAULT_NEGATIVE)
    for bad in ("help:only", "a b:x:y", "x:y:z:w"):
        with pytest.raises(ValueError):
            Dimension.parse(bad)


# --- prompts and scoring ------------------------------------------------------------------------

def test_plain_prompt_format_and_exact_concatenation(tok):
    f = PromptFormatter(tok)
    assert f.mode == "plain"
    assert f.render("hi", "INS") == "INS\n\nUser: hi\nAssistant:"
    assert f.render("hi") == "User: hi\nAssistant:"  # prompt_ids: the bare prompt, as the doctor sees it
    assert f.render([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], "INS") == \
        "INS\n\nS\n\nUser: a\nAssistant: b\nUser: c\nAssistant:"
    assert f.prompt_ids(["hi"], "INS")[0] == tok("INS\n\nUser: hi\nAssistant:")["input_ids"]
    assert f.response_ids([" helps."])[0] == tok(" helps.", add_special_tokens=False)["input_ids"]
    assert PromptFormatter(tok, append_eos=True).response_ids(["x"])[0][-1] == tok.eos_token_id


def test_chat_template_puts_instruction_in_system_message(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    f = PromptFormatter(t)
    assert f.mode == "chat"
    assert f.render("hi", "INS") == "<system>INS\n<user>hi\n<assistant>"
    assert f.render("hi") == "<user>hi\n<assistant>"
    want = t("<system>INS\n<user>hi\n<assistant>", add_special_tokens=False)["input_ids"]
    assert f.prompt_ids(["hi"], "INS")[0] == want
    t.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                       "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>")
    # a template without a system role: the instruction prefixes the first user turn
    assert PromptFormatter(t).render("hi", "INS") == "<user>INS\n\nhi\n<assistant>"


def test_vllm_prompt_logprobs_equal_transformers(llm, patient, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(patient, dtype="float32").eval()
    f = PromptFormatter(tok)
    prompts = [r["prompt"] for r in ROWS[:3]]
    responses = f.response_ids([r["chosen"] for r in ROWS[:3]])
    pairs = [(p, r) for ins in (DEFAULT_POSITIVE, "Be brief.", None)
             for p, r in zip(f.prompt_ids(prompts, ins), responses)]
    got, want = score_with_vllm(llm, pairs), score_with_hf(model, pairs)
    for (_, r), g, w in zip(pairs, got, want):
        assert g.shape == w.shape == (len(r),)
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)
    assert not np.allclose(got[0], got[3])  # the instruction matters


def test_length_limit_leaves_one_position_for_the_sampled_token(llm, tok):
    """vLLM refuses a prompt of exactly max_model_len (it must sample one token): rows must fit in one less."""
    from datasets import Dataset

    from llmdoctor_train.stage1.scoring import plan_shards
    from llmdoctor_train.stage1.tokens import tokenize_preferences

    f = PromptFormatter(tok)
    ds = Dataset.from_list(ROWS[:1])
    instructions = [DEFAULT_POSITIVE, DEFAULT_NEGATIVE]
    n = max(len(f.prompt_ids([ROWS[0]["prompt"]], ins)[0]) for ins in instructions) + \
        max(len(f.response_ids([ROWS[0][side]])[0]) for side in ("chosen", "rejected"))
    tokens = tokenize_preferences(ds, f, instructions)
    assert plan_shards(tokens, len(instructions), 10, n + 1)[1] == []
    assert [i for i, _ in plan_shards(tokens, len(instructions), 10, n)[1]] == [0]
    ids = list(range(5, 5 + MAX_LEN - 1))
    assert score_with_vllm(llm, [(ids[:-10], ids[-10:])])[0].shape == (10,)  # MAX_LEN - 1 tokens: accepted


# --- data checks --------------------------------------------------------------------------------

BAD = {1: {"prompt": "A dog", "chosen": " helps."},                                         # rejected missing
       3: {"prompt": "A dog", "chosen": "", "rejected": " calls."},                          # empty response
       4: {"prompt": "A dog", "chosen": [{"role": "user", "content": "x"}], "rejected": " calls."},
       5: {"prompt": "A dog", "chosen": " the book" * 60, "rejected": " calls."}}            # too long


def bad_data(tmp_path) -> str:
    rows = [BAD.get(i, ROWS[i % len(ROWS)]) for i in range(7)]
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_bad_rows_raise_naming_the_rows(tmp_path, llm, patient):
    out = tmp_path / "out"
    with pytest.raises(BadRowError) as e:
        compute_rewards(bad_data(tmp_path), patient, out, llm=llm, progress=False)
    msg = str(e.value)
    assert [i for i, _ in e.value.rows] == [1, 3, 4, 5]
    for needle in ("row 1: 'rejected' is missing", "row 3: 'chosen' is empty", "row 4: 'chosen' has ['user']",
                   "row 5:", "max_model_len 256", "--skip-bad-rows"):
        assert needle in msg
    assert not out.exists()  # nothing scored or written


def test_skip_bad_rows_counts_them(tmp_path, llm, patient):
    from datasets import load_from_disk

    out = tmp_path / "out"
    s = compute_rewards(bad_data(tmp_path), patient, out, RewardsConfig(skip_bad_rows=True, shard_size=3), llm=llm,
                        progress=False)
    assert (s["rows"], s["rows_in_data"], s["rows_skipped"]) == (3, 7, 4)
    assert [x["row"] for x in s["skipped"]] == [1, 3, 4, 5]
    assert load_from_disk(str(out))["row_index"] == [0, 2, 6]


def test_missing_column_is_named(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match=r"\['rejected'\] missing"):
        load_preferences(path)


# --- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, llm, patient):
    """A two-dimension run over 5 rows in shards of 2 (3 shards)."""
    root = tmp_path_factory.mktemp("e2e")
    data = write_jsonl(root / "prefs.jsonl", ROWS)
    out = root / "out"
    config = RewardsConfig(dimensions=DIMS, shard_size=2)
    summary = compute_rewards(data, patient, out, config, llm=llm, progress=False)
    return {"data": data, "out": out, "config": config, "summary": summary}


def test_end_to_end_dataset_and_summary(run, tok, llm):
    from datasets import load_from_disk

    ds = load_from_disk(str(run["out"]))
    s = json.loads((run["out"] / "summary.json").read_text())
    assert s == run["summary"]
    assert len(ds) == s["rows"] == 5 and s["rows_skipped"] == 0 and (s["shards"], s["shards_computed"]) == (3, 3)
    for col in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_rewards", "rejected_rewards", "chosen_logp_gap",
                "chosen_S", "rejected_S", "chosen_rewards_help", "rejected_rewards_harm", "chosen_logp_pos_harm"):
        assert col in ds.column_names
    f = PromptFormatter(tok)
    n_tokens = 0
    for i, row in enumerate(ds):
        assert row["row_index"] == i
        assert row["prompt_ids"] == f.prompt_ids([ROWS[i]["prompt"]])[0]
        for side, sign in (("chosen", 1), ("rejected", -1)):
            ids = row[f"{side}_ids"]
            assert ids == f.response_ids([ROWS[i][side]])[0]
            n_tokens += len(ids)
            assert row[f"{side}_rewards"] == row[f"{side}_rewards_help"]  # main = first dimension
            for d in ("help", "harm"):
                r = np.array(row[f"{side}_rewards_{d}"])
                assert len(r) == len(ids) and np.all(sign * r >= 0)
                want = token_rewards(row[f"{side}_logp_pos_{d}"], row[f"{side}_logp_neg_{d}"], sign)
                np.testing.assert_allclose(r, want.rewards, atol=1e-6)
                np.testing.assert_allclose(row[f"{side}_S_{d}"], want.S, atol=1e-6)
    # the stored log-probs are the engine's: rescore row 0's chosen response under the positive instruction
    lp = score_with_vllm(llm, [(f.prompt_ids([ROWS[0]["prompt"]], DEFAULT_POSITIVE)[0], ds[0]["chosen_ids"])])[0]
    np.testing.assert_allclose(ds[0]["chosen_logp_pos_help"], lp, atol=1e-6)
    r = np.concatenate([np.array(x) for side in ("chosen", "rejected") for x in ds[f"{side}_rewards"]])
    assert s["tokens"] == n_tokens == r.size
    assert s["fraction_rewarded"] == pytest.approx((r != 0).mean())
    assert s["mean_abs_reward"] == pytest.approx(np.abs(r).mean(), rel=1e-6)
    assert set(s["dimensions"]) == {"help", "harm"} and s["main_dimension"] == "help"


def test_implicit_prompt_conversations_score_as_explicit_prompts(run, tmp_path, llm, patient):
    """HH-style rows (only chosen/rejected conversations) get TRL's extracted prompt: the same
    token ids and rewards as the explicit-prompt rows they were made from."""
    from datasets import Dataset, load_from_disk

    def conv(prompt, reply):
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = reply if isinstance(reply, str) else reply[0]["content"]
        return turns + [{"role": "assistant", "content": text}]

    rows = [{side: conv(r["prompt"], r[side]) for side in ("chosen", "rejected")} for r in ROWS]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hh"))
    s = compute_rewards(str(tmp_path / "hh"), patient, tmp_path / "out", run["config"], llm=llm, progress=False)
    assert s["rows"] == len(ROWS) and s["tokenizer_fingerprint"] == run["summary"]["tokenizer_fingerprint"]
    got, want = load_from_disk(str(tmp_path / "out")), load_from_disk(str(run["out"]))
    for col in ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_rewards", "rejected_rewards_harm"):
        assert got[col] == want[col], col


def test_restart_reuses_finished_shards(run, llm, patient):
    from datasets import load_from_disk

    out, before = run["out"], load_from_disk(str(run["out"]))[:]
    import shutil

    shutil.rmtree(out / "shards" / "00001")  # an interrupted run: shard 1 never finished
    (out / "shards" / "00001.tmp").mkdir()  # ... and left a half-written folder
    kept = {n: (out / "shards" / n / "meta.json").stat().st_mtime_ns for n in ("00000", "00002")}
    s = compute_rewards(run["data"], patient, out, run["config"], llm=llm, progress=False)
    assert (s["shards_reused"], s["shards_computed"]) == (2, 1)
    assert kept == {n: (out / "shards" / n / "meta.json").stat().st_mtime_ns for n in kept}
    assert load_from_disk(str(out))[:] == before
    # θ changes the rewards but not the patient's log-probs: nothing is rescored, and no engine is needed
    s = compute_rewards(run["data"], patient, out, RewardsConfig(dimensions=DIMS, shard_size=2, theta=0.5), llm=None,
                        progress=False)
    assert s["shards_computed"] == 0 and s["fraction_rewarded"] < run["summary"]["fraction_rewarded"]
    after = load_from_disk(str(out))
    assert all(x == 0 or abs(x) > 0.5 for row in after["chosen_rewards"] for x in row)
    compute_rewards(run["data"], patient, out, run["config"], progress=False)  # back to θ = 0.1 for later tests


def test_cli_runs_through_the_llmdoctor_parser(tmp_path, run, llm, patient):
    from llmdoctor_train.cli import build_parser
    from llmdoctor_train.stage1.cli import run_rewards

    out = tmp_path / "cli"
    args = build_parser().parse_args([
        "rewards", "--data", run["data"], "--patient", patient, "--output", str(out), "--no-progress",
        "--dimension", "help::", "--dimension", r"harm:Be safe\: refuse harm.:Be reckless.",
        "--main-dimension", "harm"])
    s = run_rewards(args, llm=llm)
    assert s["main_dimension"] == "harm" and s["rows"] == 5
    from datasets import load_from_disk

    ds, ref = load_from_disk(str(out)), load_from_disk(str(run["out"]))
    assert ds["chosen_rewards"] == ref["chosen_rewards_harm"]
    bad = build_parser().parse_args(["rewards", "--data", bad_data(tmp_path), "--patient", patient, "--output",
                                     str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="row 1: 'rejected' is missing"):
        run_rewards(bad, llm=llm)


def test_module_help():
    p = subprocess.run([sys.executable, "-m", "llmdoctor_train.cli", "rewards", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert p.returncode == 0
    for needle in ("--data", "--patient", "--output", "--dimension", "--theta", "--skip-bad-rows", "--shard-size",
                   "--max-model-len", "chosen_rewards"):
        assert needle in p.stdout


_EXIT_PROBE = """
import sys, threading
from llmdoctor_train.cli import main
main(sys.argv[1:])
alive = [t.name for t in threading.enumerate() if t.name == "EngineCoreOutputQueueThread" and t.is_alive()]
print("output threads alive:", alive)
"""


def test_cli_with_the_multiprocess_engine_stops_it_and_exits_cleanly(tmp_path, run, patient):
    """`llmdoctor rewards` as users run it (vLLM's multi-process engine): the engine is shut down
    and its output thread joined before exit; left to exit-time finalisers, the process was seen to
    abort (SIGABRT) after writing its output."""
    import os

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", _EXIT_PROBE, "rewards", "--data", run["data"], "--patient", patient,
                        "--output", str(tmp_path / "mp"), "--no-progress", "--enforce-eager", "--dtype", "float32",
                        "--max-model-len", str(MAX_LEN), "--engine-arg", "kv_cache_memory_bytes=16777216",
                        "--engine-arg", "max_num_seqs=8"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "output threads alive: []" in p.stdout, p.stdout[-2000:]
    assert json.loads((tmp_path / "mp" / "summary.json").read_text())["rows"] == len(ROWS)
