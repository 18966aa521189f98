"""Stage 1 input: preference data (``prompt``, ``chosen``, ``rejected``) loaded and checked row by row.

Fields are plain text or, as in TRL's conversational preference datasets, lists of chat
messages (``{"role": ..., "content": ...}``): the prompt is the conversation so far, each
response the assistant's reply. A bad row is never dropped silently: it raises
:class:`BadRowError` naming its index, or is skipped and counted when the caller asks.
"""

from __future__ import annotations

from pathlib import Path

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """The preference data cannot be used as given (file, split, columns or rows)."""


class BadRowError(DataError):
    """Rows that cannot be scored; ``rows`` holds ``(row_index, reason)`` pairs."""

    def __init__(self, rows: list[tuple[int, str]], hint: str = "pass --skip-bad-rows to skip and count them"):
        self.rows = rows
        shown = "; ".join(f"row {i}: {why}" for i, why in rows[:10])
        more = f" (and {len(rows) - 10} more)" if len(rows) > 10 else ""
        super().__init__(f"{len(rows)} bad row(s): {shown}{more}; {hint}")


def load_preferences(path: str | Path, split: str = "train"):
    """A ``datasets.Dataset`` from a JSONL/JSON/parquet file, a ``save_to_disk`` folder or a folder of files."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
    elif p.is_dir():
        ds = datasets.load_dataset(str(p), split=split)
    else:
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix.lower())
        if kind is None:
            raise DataError(f"--data {path}: expected .jsonl, .json, .parquet or .csv, or a dataset folder")
        ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"--data {path}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    return check_columns(ds, f"--data {path}")


def check_columns(ds, name: str = "data"):
    """Returns ``ds`` if it has the ``prompt``, ``chosen`` and ``rejected`` columns, else raises naming the missing."""
    missing = [f for f in FIELDS if f not in ds.column_names]
    if missing:
        raise DataError(f"{name}: column(s) {missing} missing; it has {ds.column_names}")
    return ds


def as_messages(value, field: str) -> list[dict]:
    """A prompt as a list of chat messages (a plain string is one user message)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"'{field}' must be text or a non-empty list of chat messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"'{field}' holds a message that is not {{'role': str, 'content': str}}: {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def response_text(value, field: str) -> str:
    """The text of a response: a string, or the content of assistant message(s) (joined by newlines)."""
    if isinstance(value, str):
        text = value
    else:
        msgs = as_messages(value, field)
        roles = {m["role"] for m in msgs} - {"assistant"}
        if roles:
            raise ValueError(f"'{field}' has {sorted(roles)} message(s); expected only the assistant's reply")
        text = "\n".join(m["content"] for m in msgs)
    if not text.strip():
        raise ValueError(f"'{field}' is empty")
    return text


def row_problem(prompt, chosen, rejected) -> str | None:
    """Why a row cannot be scored (missing field, empty response, malformed messages), or None."""
    for field, value in zip(FIELDS, (prompt, chosen, rejected)):
        if value is None:
            return f"'{field}' is missing"
    try:
        as_messages(prompt, "prompt")
        response_text(chosen, "chosen")
        response_text(rejected, "rejected")
    except ValueError as e:
        return str(e)
    return None
