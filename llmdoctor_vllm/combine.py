"""The decoding rules of Stage 3, over the full vocabulary (METHOD, Stage 3).

product: ``alpha * log p_patient + sum_i beta_i * log p_doctor_i``
delta:   ``alpha * log p_patient + sum_i beta_i * (log p_doctor_i - log p_doctor_i_ref)``
"""

from __future__ import annotations

import torch


def combine(patient_logits: torch.Tensor, alpha: torch.Tensor, doctor_terms: torch.Tensor,
            valid_vocab: int) -> torch.Tensor:
    """Guided scores for ``G`` rows.

    ``patient_logits`` ``[G, V]`` (``-inf`` where vLLM masked a token); ``alpha`` ``[G]`` (``>= 0``); ``doctor_terms`` ``[G, V']`` the already
    beta-weighted sum of doctor log-probability terms (``V' >= valid_vocab``). Columns past
    ``valid_vocab`` (padding rows of the logits, no token of the tokenizer) become ``-inf``.
    """
    out = torch.log_softmax(patient_logits.float(), dim=-1).mul_(alpha[:, None])
    v = min(out.shape[1], doctor_terms.shape[1], valid_vocab)
    out[:, :v] += doctor_terms[:, :v]
    if v < out.shape[1]:
        out[:, v:] = float("-inf")
    # what vLLM masked before us (bad words, allowed tokens, min_tokens, grammars) stays masked,
    # whatever alpha is (0 * -inf would be NaN)
    return out.masked_fill_(torch.isneginf(patient_logits), float("-inf"))
