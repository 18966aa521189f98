"""The Stage 3 formula computed independently with transformers, by teacher forcing."""

from __future__ import annotations

import torch


def _next_token_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """log p(. | ids[:t]) for t = start..len(ids)-1 ... len(ids): ``[len(ids) - start + 1, V]``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[start - 1:], dim=-1)


def guided_scores(patient, doctors, prompt_ids, output_ids, alpha=1.0, betas=None, rule="product"):
    """``[len(output_ids), V]`` guided scores ``alpha*lp + sum beta*(ld [- lref])`` at every step.

    ``doctors`` maps a name to a ``LoadedDoctor``; ``betas`` maps a name to its weight.
    """
    ids = list(prompt_ids) + list(output_ids[:-1])
    p = len(prompt_ids)
    out = alpha * _next_token_logprobs(patient, ids, p)
    vocab = out.shape[1]
    for name, beta in (betas or {}).items():
        if not beta:
            continue
        doc = doctors[name]
        ld = _next_token_logprobs(doc.model, ids, p)
        if rule == "delta":
            if doc.is_lora:
                with doc.model.disable_adapter():
                    ld = ld - _next_token_logprobs(doc.model, ids, p)
            else:
                ld = ld - _next_token_logprobs(doc.reference_model, ids, p)
        v = min(vocab, ld.shape[1])
        out[:, :v] += beta * ld[:, :v]
        out[:, v:] = float("-inf")
    return out
