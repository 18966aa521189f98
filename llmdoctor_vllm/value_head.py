"""The doctor's value head: an MLP from the last hidden state to ``log V_phi(s)``."""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """Predicts ``log V_phi(s)`` (so ``V_phi > 0``) from the doctor's last hidden state.

    A two-layer MLP is enough to let the value differ from the LM's own features; the head is
    always trained in full, even when the LM is trained through LoRA.
    """

    def __init__(self, hidden_size: int, inner_size: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.inner_size = inner_size or hidden_size
        self.net = nn.Sequential(
            nn.Linear(hidden_size, self.inner_size),
            nn.GELU(),
            nn.Linear(self.inner_size, 1),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[...]`` log-values."""
        return self.net(hidden).squeeze(-1)
