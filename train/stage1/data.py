"""Token ids for Stage 1: (instruction, prompt) rendered for the patient, responses appended exactly.

Prompt and response are tokenised separately and their ids concatenated, so the response
tokens the patient is scored on are exactly the ids stored for the doctor (no merge across
the boundary). With a chat template the instruction is the system message; without one the
prompt is ``"{instruction}\\n\\nUser: {prompt}\\nAssistant:"``.
"""

from __future__ import annotations

from train.rewards_data import as_messages, response_text


class PromptFormatter:
    """Renders prompts with or without an instruction and tokenises prompts and responses in batches.

    ``template``: "auto" (chat template when the tokenizer has one), "chat" or "plain".
    ``append_eos``: end every response with the tokenizer's EOS token (off by default [D]:
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
        return self._render_chat(msgs, instruction) if self.chat else self._render_plain(msgs, instruction)

    def _render_plain(self, msgs, instruction):
        head = [instruction] if instruction else []
        head += [m["content"] for m in msgs if m["role"] == "system"]
        turns = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs if m["role"] != "system")
        return ("\n\n".join(head) + "\n\n" if head else "") + turns + "\nAssistant:"

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
