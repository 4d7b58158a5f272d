"""The SPM losses, in epsilon space whatever the model predicts.

Erase: `MSE(eps'(x_t, target), eps(x_t, neutral) - eta * (eps(x_t, positive) - eps(x_t, neutral)))`.
Anchor: `MSE(eps'(x_t, a), eps(x_t, a))` over the anchors. Total: `erase + la_strength * anchor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_epsilon(output: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise a UNet output implies at `x_t = sample` with cumulative alpha `alpha_prod`, in fp32.

    For v-prediction `eps = sqrt(a) v + sqrt(1 - a) x_t`; the map is affine in the output, so the erase
    target (an affine combination) is the same whether it is formed before or after conversion.
    """
    output, sample = output.float(), sample.float()
    if prediction_type == "epsilon":
        return output
    alpha_prod = alpha_prod.float().to(output.device)
    if prediction_type == "v_prediction":
        return alpha_prod.sqrt() * output + (1 - alpha_prod).sqrt() * sample
    if prediction_type == "sample":
        return (sample - alpha_prod.sqrt() * output) / (1 - alpha_prod).sqrt()
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample.")


def spm_losses(
    eps_target: torch.Tensor,
    eps_positive: torch.Tensor,
    eps_neutral: torch.Tensor,
    eta: float,
    anchor_with: torch.Tensor | None = None,
    anchor_without: torch.Tensor | None = None,
    la_strength: float = 0.0,
) -> dict[str, torch.Tensor]:
    """`{"loss", "erase"}` plus `"anchor"` when anchors are given; `loss` is what gets backpropagated."""
    goal = eps_neutral - eta * (eps_positive - eps_neutral)
    erase = F.mse_loss(eps_target.float(), goal.float().detach())
    losses = {"loss": erase, "erase": erase}
    if anchor_with is not None and anchor_without is not None:
        anchor = F.mse_loss(anchor_with.float(), anchor_without.float().detach())
        losses["anchor"] = anchor
        losses["loss"] = erase + la_strength * anchor
    return losses
