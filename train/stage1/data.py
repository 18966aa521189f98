"""Stage 1 input: preference data loaded and checked row by row, and rendered as token ids for the patient.

Fields (``prompt``, ``chosen``, ``rejected``) are plain text or, as in TRL's conversational
preference datasets, lists of chat messages (``{"role": ..., "content": ...}``): the prompt is
the conversation so far, each response the assistant's reply. Without a ``prompt`` column the
prompt is extracted from ``chosen``/``rejected`` as TRL does (``stage1.tokens``). A bad row is never dropped
silently: it raises :class:`BadRowError` naming its index, or is skipped and counted when the
caller asks.

Prompt and response are tokenised separately and their ids concatenated, so the response
tokens the patient is scored on are exactly the ids stored for the doctor (no merge across
the boundary). With a chat template the instruction is the system message; without one the
prompt is :func:`render_plain`'s ``"{instruction}\\n\\nUser: {prompt}\\nAssistant:"``.
"""

from __future__ import annotations

from pathlib import Path


PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


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
    """Returns ``ds`` if it has the ``chosen`` and ``rejected`` columns, else raises naming the missing.

    ``prompt`` may be absent: TRL's implicit-prompt datasets (chosen/rejected conversations that
    share their first turns) get it extracted (``llmdoctor_train.stage1.tokens``)."""
    missing = [f for f in PREFERENCE_FIELDS[1:] if f not in ds.column_names]
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
    for field, value in (("chosen", chosen), ("rejected", rejected), ("prompt", prompt)):
        if value is None:
            return f"'{field}' is missing"
    try:
        as_messages(prompt, "prompt")
        response_text(chosen, "chosen")
        response_text(rejected, "rejected")
    except ValueError as e:
        return str(e)
    return None


def render_plain(msgs: list[dict], instruction: str | None = None) -> str:
    """The prompt without a chat template: ``"{instruction}\\n\\nUser: {prompt}\\nAssistant:"`` for one
    user turn (system messages join the instruction; turns are ``"Role: content"`` lines); with no
    instruction, ``"User: {prompt}\\nAssistant:"``. The one plain template of the project."""
    head = [instruction] if instruction else []
    head += [m["content"] for m in msgs if m["role"] == "system"]
    turns = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs if m["role"] != "system")
    return ("\n\n".join(head) + "\n\n" if head else "") + turns + "\nAssistant:"


class PromptFormatter:
    """Renders prompts with or without an instruction and tokenises prompts and responses in batches.

    ``template``: "auto" (chat template when the tokenizer has one), "chat" or "plain".
    ``append_eos``: end every response with the tokenizer's EOS token (off by default:
    a response is scored verbatim, as the dataset gives it).
    """

    def __init__(self, tokenizer, template: str = "auto", append_eos: bool = False):
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be auto, chat or plain, not {template!r}")
        if template == "chat" and not has_chat:
            raise ValueError("template 'chat' asked for, but the tokenizer has no chat template")
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos asked for, but the tokenizer has no EOS token")
        self.tokenizer = tokenizer
        self.chat = template == "chat" or (template == "auto" and has_chat)
        self.append_eos = append_eos

    @property
    def mode(self) -> str:
        return "chat" if self.chat else "plain"

    def render(self, prompt, instruction: str | None = None) -> str:
        """The prompt text the patient sees; ``instruction=None`` gives the bare prompt (the doctor's view)."""
        msgs = as_messages(prompt, "prompt")
        return self._render_chat(msgs, instruction) if self.chat else render_plain(msgs, instruction)

    def _render_chat(self, msgs, instruction):
        apply = self.tokenizer.apply_chat_template
        if not instruction:
            return apply(msgs, tokenize=False, add_generation_prompt=True)
        if msgs[0]["role"] == "system":
            with_sys = [{"role": "system", "content": f"{instruction}\n\n{msgs[0]['content']}"}] + msgs[1:]
        else:
            with_sys = [{"role": "system", "content": instruction}] + msgs
        try:
            return apply(with_sys, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (e.g. Gemma): prefix the first user turn instead
            user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            if user is None:
                raise
            msgs = [dict(m) for m in msgs]
            msgs[user]["content"] = f"{instruction}\n\n{msgs[user]['content']}"
            return apply(msgs, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompts, instruction: str | None = None) -> list[list[int]]:
        """Token ids of each prompt under ``instruction`` (one batched tokenizer call).

        A chat-rendered text already holds its special tokens; a plain one gets the tokenizer's
        usual ones (e.g. BOS).
        """
        texts = [self.render(p, instruction) for p in prompts]
        if not texts:  # transformers 5 fails on an empty batch
            return []
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]]

    def response_ids(self, responses, field: str = "response") -> list[list[int]]:
        """Token ids of each response, without special tokens (plus EOS with ``append_eos``)."""
        texts = [response_text(r, field) for r in responses]
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        if self.append_eos:
            ids = [list(x) + [self.tokenizer.eos_token_id] for x in ids]
        return [list(x) for x in ids]
