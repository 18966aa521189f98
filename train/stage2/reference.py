"""The doctor's reference ``pi_ref`` for TFPO's reference-relative flow target (docs/method.md, Stage 2).

``log Q(s_t) = sum_{k<=t} [r_k + kappa log pi_ref(y_k | s_{k-1})]``: SubTB then fits
``log pi - kappa log pi_ref`` to the rewards, so with zero rewards (and ``kappa = 1``) the doctor
stays its reference. ``pi_ref`` is the doctor's starting weights, evaluated without grad:

- LoRA doctor: the same model with its adapter disabled (as TRL's DPO does), one more forward;
- full fine-tuning: a frozen copy of the starting weights (``TFPOTrainer.ref_model``), built once
  in the trainer's ``__init__``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def start_at_reference(head: torch.nn.Module, scale: float = 0.01) -> torch.nn.Module:
    """Shrinks the value head's output layer (weights x ``scale``, bias 0), so ``log V ~ 0`` at the
    start: with the reference target the first residuals are then the rewards alone and zero
    rewards give a near-zero loss (a random head would make the doctor fit its noise). Not zero, so
    every layer of the head still gets a gradient. Returns ``head``."""
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.zero_()
    return head


def reference_context(model: torch.nn.Module, ref_model: torch.nn.Module | None):
    """``(module, context)``: what to run for ``pi_ref`` and the context to run it in.

    A LoRA model runs itself under ``disable_adapter()`` (one-shot: a fresh context per forward); a
    full one runs ``ref_model``, its frozen starting weights."""
    if hasattr(model, "peft_config"):
        return model, model.disable_adapter()
    if ref_model is None:
        raise ValueError("TFPO: a fully fine-tuned doctor needs its starting weights as the reference")
    return ref_model, contextlib.nullcontext()


def reference_logp(model: torch.nn.Module, ref_model: torch.nn.Module | None, inputs: dict,
                   token_logp: Callable[[torch.nn.Module, dict], torch.Tensor]) -> torch.Tensor:
    """``log pi_ref(y_k | s_{k-1})`` per response token, ``[N, L]``, without grad.

    ``token_logp(module, inputs)`` is the trainer's own per-token log-prob of a forward, so the
    reference is gathered exactly as the doctor's log-probs are."""
    module, ctx = reference_context(model, ref_model)
    with torch.no_grad(), ctx:
        return token_logp(module, inputs).detach()


def logratio_metrics(logp: torch.Tensor, ref_logp: torch.Tensor | None, rewards: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per batch (B chosen rows, then B rejected): the doctor's log-ratio margin
    ``sum(log pi - log pi_ref)(y+) - sum(...)(y-)`` next to Stage 1's target ``sum r(y+) - sum r(y-)``.

    With a reference, ``pairs_ranked_right`` counts pairs whose log-ratio margin is positive: what
    the reference-relative doctor is trained to rank (its raw margin also holds ``pi_ref``'s own)."""
    B = mask.shape[0] // 2
    m = mask.to(logp.dtype)
    total = (rewards * m).sum(dim=1)
    out = {"stage1_target": (total[:B] - total[B:]).mean()}
    if ref_logp is not None:
        ratio = ((logp.detach() - ref_logp) * m).sum(dim=1)
        margin = ratio[:B] - ratio[B:]
        out.update(logratio_margin=margin.mean(), pairs_ranked_right=(margin > 0).float().mean())
    return out
