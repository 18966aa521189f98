"""The decoding rules of Stage 3 (METHOD, Stage 3).

product: ``alpha * log p_patient + sum_i beta_i * log p_doctor_i``
delta:   ``alpha * log p_patient + sum_i beta_i * (log p_doctor_i - log p_doctor_i_ref)``

Over the full vocabulary (the paper's), or [D] only over the patient's support: the tokens with
``p_patient >= patient_min_p * max p_patient``, every other token masked. A doctor's tilt on a
token the patient all but rules out is what breaks replies under the delta rule at large beta.
"""

from __future__ import annotations

import torch


def combine(patient_logits: torch.Tensor, alpha: torch.Tensor, doctor_terms: torch.Tensor,
            valid_vocab: int, log_min_p: torch.Tensor | None = None, any_zero_alpha: bool = True) -> torch.Tensor:
    """Guided scores for ``G`` rows.

    ``patient_logits`` ``[G, V]`` (``-inf`` where vLLM masked a token); ``alpha`` ``[G]`` (``>= 0``;
    ``None`` when every row's is 1);
    ``doctor_terms`` ``[G, V']`` the already beta-weighted sum of doctor log-probability terms
    (``V' >= valid_vocab``). Columns past ``valid_vocab`` (padding rows of the logits, no token of
    the tokenizer) become ``-inf``.
    ``log_min_p`` ``[G]``: per row, ``log(patient_min_p)`` (``-inf``: the full vocabulary); ``None``
    when no row restricts it. The patient's top token among the first ``valid_vocab`` always stays.
    ``any_zero_alpha=False`` (the caller knows no row has ``alpha == 0``) skips the pass that keeps
    vLLM's masked tokens masked: with ``alpha > 0`` they are ``-inf`` already.
    """
    out = torch.log_softmax(patient_logits.float(), dim=-1)
    v = min(out.shape[1], doctor_terms.shape[1], valid_vocab)
    # the support is measured against the top token the step can produce (one of the first v)
    outside = None if log_min_p is None else out < out[:, :v].amax(dim=-1, keepdim=True) + log_min_p[:, None]
    if alpha is not None:  # None: every row's alpha is 1
        out.mul_(alpha[:, None])
    out[:, :v] += doctor_terms[:, :v]
    if v < out.shape[1]:
        out[:, v:] = float("-inf")
    if outside is not None:
        out.masked_fill_(outside, float("-inf"))
    # what vLLM masked before us (bad words, allowed tokens, min_tokens, grammars) stays masked,
    # whatever alpha is (0 * -inf would be NaN)
    return out.masked_fill_(torch.isneginf(patient_logits), float("-inf")) if any_zero_alpha else out
