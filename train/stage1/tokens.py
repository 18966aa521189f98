"""Stage 1 input prepared once: TRL's prompt extraction, then every row checked and tokenised with
``datasets.map`` (cached by datasets' fingerprint, ``num_proc`` workers), before any shard is scored.

The tokenised dataset has one row per input row and the columns ``problem`` (why the row
cannot be scored, or ``""``), ``prompt_ids`` (the bare prompt: what the doctor sees),
``prompt_ids_<k>`` (the prompt under the ``k``-th distinct instruction), ``chosen_ids`` and
``rejected_ids``; a bad row keeps empty lists. Shards then read ids only (no re-tokenising on a
restart, a length change or a rescoring).
"""

from __future__ import annotations

from llmdoctor_train.stage1.data import PREFERENCE_FIELDS, PromptFormatter, row_problem

RESPONSES = ("chosen", "rejected")


def extract_prompt(example: dict) -> dict:
    """One row in TRL's explicit-prompt form (``trl.data_utils.maybe_extract_prompt``): a row that
    holds only ``chosen``/``rejected`` conversations (HH style) gets their common first turns as
    ``prompt``. A row it cannot handle (a missing response) is left for :func:`row_problem` to name."""
    from trl.data_utils import is_conversational, maybe_extract_prompt

    row = {f: example.get(f) for f in PREFERENCE_FIELDS}
    if row["chosen"] is None or row["rejected"] is None:
        return row
    if row["prompt"] is not None and not all(is_conversational({"chosen": row[f]}) for f in PREFERENCE_FIELDS[1:]):
        return row  # an explicit prompt, and responses TRL would not split: row_problem judges them
    present = {k: v for k, v in row.items() if v is not None}
    try:
        out = maybe_extract_prompt(present)
    except (IndexError, KeyError, TypeError):
        return row
    return {f: out.get(f) for f in PREFERENCE_FIELDS}


def with_prompts(ds, num_proc: int | None = None):
    """``ds`` with a ``prompt`` column for every row, extracted as TRL does where it is implicit."""
    if "prompt" in ds.column_names and not _conversational(ds, "chosen"):
        return ds  # explicit prompts, standard responses: nothing to extract
    return ds.map(extract_prompt, num_proc=num_proc, desc="extracting prompts")


def _conversational(ds, column: str) -> bool:
    from trl.data_utils import is_conversational

    return len(ds) > 0 and any(is_conversational({column: v}) for v in ds[:8][column] if v)


def _spread(n: int, good: list[int], values: list) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for i, v in zip(good, values):
        out[i] = v
    return out


def tokenize_batch(batch: dict, formatter: PromptFormatter, instructions: list[str]) -> dict:
    """``datasets.map`` function (batched): each row's problem (or ``""``) and its token ids."""
    rows = list(zip(*(batch[f] for f in PREFERENCE_FIELDS)))
    problems = [row_problem(*row) for row in rows]
    good = [i for i, why in enumerate(problems) if why is None]
    prompts = [rows[i][0] for i in good]
    n = len(rows)
    out = {"problem": [why or "" for why in problems],
           "prompt_ids": _spread(n, good, formatter.prompt_ids(prompts, None))}
    for k, ins in enumerate(instructions):
        out[f"prompt_ids_{k}"] = _spread(n, good, formatter.prompt_ids(prompts, ins))
    for j, side in enumerate(RESPONSES, start=1):
        out[f"{side}_ids"] = _spread(n, good, formatter.response_ids([rows[i][j] for i in good], side))
    return out


def token_features(n_instructions: int):
    """The ``datasets.Features`` of :func:`tokenize_batch`'s output."""
    from datasets import Features, List, Value

    ids = List(Value("int32"))
    cols = {"problem": Value("string"), "prompt_ids": ids}
    cols |= {f"prompt_ids_{k}": ids for k in range(n_instructions)}
    return Features(cols | {f"{side}_ids": ids for side in RESPONSES})


def tokenize_preferences(ds, formatter: PromptFormatter, instructions: list[str], num_proc: int | None = None,
                         batch_size: int = 256):
    """Every row of a preference dataset checked and tokenised once (see the module docstring)."""
    ds = with_prompts(ds, num_proc)
    missing = [f for f in PREFERENCE_FIELDS if f not in ds.column_names]
    if missing:
        from llmdoctor_train.stage1.data import DataError

        raise DataError(f"data: column(s) {missing} missing; it has {ds.column_names}")
    return ds.map(tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                  fn_kwargs={"formatter": formatter, "instructions": instructions},
                  remove_columns=ds.column_names, features=token_features(len(instructions)),
                  desc="tokenising")
