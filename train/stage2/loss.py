"""TFPO's objective (Stage 2; docs/method.md): subtrajectory balance, value discrimination,
their weighted sum :func:`tfpo_objective`, and GenARM's trajectory loss.

Shapes: a batch of ``B`` responses, right-padded to ``L`` tokens. ``mask[b, k-1]`` says token
``y_k`` exists; response ``b`` has ``n_b = mask[b].sum()`` tokens and states ``s_0..s_{n_b}``.
Per-state tensors are ``[B, L + 1]`` (state ``k`` ends in token ``y_k``; ``s_0`` is the prompt).
Everything is vectorised: no Python loop over tokens, states or pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTINGS = ("all", "lambda", "trajectory")


def _check_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool token mask; must be a valid prefix per row (right padding)."""
    mask = mask.bool()
    if mask.shape[-1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("tfpo: the response mask must be right-padded (a run of valid tokens, then padding)")
    return mask


def state_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` token mask -> ``[B, L + 1]`` mask of the valid states ``s_0..s_n``."""
    mask = _check_mask(mask)
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


def prefix_log_q(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log Q(s_k) = sum_{j<=k} r_j`` with ``log Q(s_0) = 0``: ``[B, L]`` -> ``[B, L + 1]``."""
    r = rewards.masked_fill(~_check_mask(mask), 0.0)
    return F.pad(r.cumsum(dim=1), (1, 0))


def final_state_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each response's final state ``s_n`` (its number of tokens), ``[B]``."""
    return _check_mask(mask).sum(dim=1)


def apply_boundary(log_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sets ``log V = 0`` at each response's final state (a finished response's flow is its reward)."""
    final = final_state_index(mask)
    is_final = torch.arange(log_v.shape[1], device=log_v.device)[None, :] == final[:, None]
    return log_v.masked_fill(is_final, 0.0)


def balance_terms(logp_tokens, log_q, log_v, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """``b_k = log Q(s_k) + log V(s_k) - C_k`` per state, so that the residual ``res(m, n) = b_m - b_n``.

    ``C_k = sum_{j<k} log pi(y_{j+1} | s_j)``; ``log V`` gets the final-state boundary here.
    Returns ``(b, states)``, both ``[B, L + 1]``; ``b`` is zero on padded states.
    """
    B, L = logp_tokens.shape
    if log_q.shape != (B, L + 1) or log_v.shape != (B, L + 1):
        raise ValueError(f"tfpo: log_q and log_v must be [B, L+1] = {(B, L + 1)}, got {tuple(log_q.shape)}, "
                         f"{tuple(log_v.shape)} (use prefix_log_q(rewards, mask) for log_q)")
    states = state_mask(mask)
    logp = logp_tokens.masked_fill(~states[:, 1:], 0.0)
    c = F.pad(logp.cumsum(dim=1), (1, 0))
    b = log_q + apply_boundary(log_v, mask) - c
    return b.masked_fill(~states, 0.0), states


def subtb_loss(logp_tokens, log_q, log_v, mask, weighting: str = "all", subtb_lambda: float = 0.9,
               return_per_sequence: bool = False) -> torch.Tensor:
    """Subtrajectory balance ``mean_(m<n) res(m, n)^2`` per response, averaged over the batch.

    ``weighting``: ``"all"`` - every pair equally, exact in O(L) from
    ``sum_(m<n) (b_m - b_n)^2 = N sum b^2 - (sum b)^2`` (computed around the mean, which is
    the same number without cancellation); ``"trajectory"`` - only ``(m, n) = (0, n_b)``;
    ``"lambda"`` (experimental) - pair weight ``subtb_lambda^(n-m)``, normalised per response
    (an O(L^2) matrix; ``subtb_lambda = 1`` is ``"all"``). Responses with no tokens have no
    pairs and are skipped.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"tfpo: subtb weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    b, states = balance_terms(logp_tokens, log_q, log_v, mask)
    sf = states.to(b.dtype)
    n = sf.sum(dim=1)
    has_pairs = n > 1
    if weighting == "all":
        mean = b.sum(dim=1, keepdim=True) / n[:, None]
        centred = (b - mean) * sf
        pair_sum = n * centred.pow(2).sum(dim=1)
        per_seq = pair_sum / (n * (n - 1) / 2).clamp_min(1.0)
    elif weighting == "trajectory":
        last = b.gather(1, final_state_index(mask)[:, None]).squeeze(1)
        per_seq = (b[:, 0] - last).pow(2)
    else:
        if not 0.0 < subtb_lambda <= 1.0:
            raise ValueError(f"tfpo: subtb_lambda must be in (0, 1], got {subtb_lambda}")
        idx = torch.arange(b.shape[1], device=b.device)
        gap = (idx[None, :] - idx[:, None]).to(b.dtype)  # [m, n] -> n - m
        upper = gap > 0
        weight = torch.where(upper, torch.tensor(subtb_lambda, dtype=b.dtype, device=b.device).pow(gap), 0.0)
        weight = weight[None] * (sf[:, :, None] * sf[:, None, :])  # [B, m, n]
        residual = b[:, :, None] - b[:, None, :]
        per_seq = (weight * residual.pow(2)).sum(dim=(1, 2)) / weight.sum(dim=(1, 2)).clamp_min(1e-30)
    per_seq = per_seq * has_pairs
    if return_per_sequence:
        return per_seq
    return per_seq.sum() / has_pairs.sum().clamp_min(1)


def first_divergence(chosen_ids, rejected_ids, chosen_mask, rejected_mask) -> torch.Tensor:
    """1-based index ``j`` of the first response token where ``y+`` and ``y-`` differ, ``[B]``.

    0 when there is none inside both responses (identical, or one a prefix of the other).
    """
    lm = min(chosen_ids.shape[1], rejected_ids.shape[1])
    both = chosen_mask[:, :lm].bool() & rejected_mask[:, :lm].bool()
    diff = (chosen_ids[:, :lm] != rejected_ids[:, :lm]) & both
    any_diff = diff.any(dim=1)
    first = diff.to(torch.int32).argmax(dim=1) + 1
    return torch.where(any_diff, first, torch.zeros_like(first))


def value_pair_mask(chosen_rewards, rejected_rewards, chosen_mask, rejected_mask, divergence) -> torch.Tensor:
    """``[B, Lc + 1, Lr + 1]`` pairs ``(s_w, s_l)`` for the value loss.

    ``s_w`` ends in a positively rewarded token of ``y+``, ``s_l`` in a negatively rewarded token
    of ``y-`` of the same prompt; the pair at the first divergence ``j`` is always included.
    """
    win = F.pad((chosen_rewards > 0) & chosen_mask.bool(), (1, 0))
    lose = F.pad((rejected_rewards < 0) & rejected_mask.bool(), (1, 0))
    pairs = win[:, :, None] & lose[:, None, :]
    ic = torch.arange(win.shape[1], device=win.device)
    ir = torch.arange(lose.shape[1], device=lose.device)
    has = divergence > 0
    div_c = (ic[None, :] == divergence[:, None]) & has[:, None]
    div_r = (ir[None, :] == divergence[:, None]) & has[:, None]
    return pairs | (div_c[:, :, None] & div_r[:, None, :])


def value_discrimination_loss(log_v_chosen, log_v_rejected, chosen_rewards, rejected_rewards, chosen_mask,
                              rejected_mask, chosen_ids, rejected_ids, gamma: float = 0.1) -> torch.Tensor:
    """``mean max(0, gamma - (log V(s_w) - log V(s_l)))`` over the pairs of :func:`value_pair_mask`.

    ``log_v_*`` are ``[B, L* + 1]`` per-state log-values (pass them through
    :func:`apply_boundary` first to score the same ``V`` that the flow uses). The mean is over
    all pairs in the batch; with no pairs the loss is 0 (still attached to the graph).
    """
    div = first_divergence(chosen_ids, rejected_ids, chosen_mask, rejected_mask)
    pairs = value_pair_mask(chosen_rewards, rejected_rewards, chosen_mask, rejected_mask, div)
    hinge = F.relu(gamma - (log_v_chosen[:, :, None] - log_v_rejected[:, None, :]))
    pf = pairs.to(hinge.dtype)
    return (hinge * pf).sum() / pf.sum().clamp_min(1.0)


def tfpo_objective(logp: torch.Tensor, log_v: torch.Tensor, inputs: dict, args,
                   ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TFPO's loss on a collated batch (B chosen rows, then their B rejected rows):
    ``L_SubTB + value_loss_weight * L_value``; returns ``(loss, metrics)``.

    ``args`` is a ``TFPOConfig`` (``reward_scale``, ``reference_weight``, ``subtb_weighting``,
    ``subtb_lambda``, ``gamma``, ``value_loss_weight``). With ``ref_logp`` (``log pi_ref`` per
    token) the prefix score is ``log Q(s_t) = sum_{k<=t} (c r_k + kappa log pi_ref(y_k))``
    (``c``: ``reward_scale``, ``kappa``: ``reference_weight``); without it, ``sum c r_k``.
    """
    mask, ids = inputs["response_mask"], inputs["response_ids"]
    rewards = inputs["rewards"] * args.reward_scale
    B = mask.shape[0] // 2
    log_q = prefix_log_q(rewards if ref_logp is None else rewards + args.reference_weight * ref_logp, mask)
    log_v = apply_boundary(log_v, mask)
    subtb = subtb_loss(logp, log_q, log_v, mask, weighting=args.subtb_weighting, subtb_lambda=args.subtb_lambda)
    value = value_discrimination_loss(log_v[:B], log_v[B:], rewards[:B], rewards[B:], mask[:B], mask[B:],
                                      ids[:B], ids[B:], gamma=args.gamma)
    traj = subtb_loss(logp, log_q, log_v, mask, weighting="trajectory", return_per_sequence=True)
    return subtb + args.value_loss_weight * value, {"subtb": subtb, "value_loss": value,
                                                    "flow_residual": traj.detach().sqrt().mean()}


def genarm_loss(sum_logp_chosen, sum_logp_rejected, beta_r: float = 0.05) -> torch.Tensor:
    """GenARM's trajectory loss ``-log sigmoid(beta_r (sum log pi(y+) - sum log pi(y-)))``, batch mean."""
    return -F.logsigmoid(beta_r * (sum_logp_chosen - sum_logp_rejected)).mean()
