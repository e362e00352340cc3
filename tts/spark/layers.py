"""Small building blocks of BiCodec: weight-normalised convolutions and the Snake activation.

The published `BiCodec/model.safetensors` stores weight-normalised convolutions the old way
(`torch.nn.utils.weight_norm`): `<name>.weight_g` (the per-output-channel gain, dim 0 kept) and
`<name>.weight_v` (the direction), plus `<name>.bias`. These modules hold exactly those parameters.
`fold_weight_norm(model)` computes `g * v / ||v||` once after loading, so inference runs a plain
convolution (upstream calls `remove_weight_norm` for the same reason).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weight_from_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, the norm over every dim but 0 (torch's `weight_norm(dim=0)`)."""
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return v * (g / norm)


class _WeightNormConv(nn.Module):
    """Shared parameter handling: `weight_g` [C0, 1, 1], `weight_v` [C0, C1, K], `bias`."""

    def __init__(self, shape: tuple[int, int, int], bias_size: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(shape))
        self.weight_g = nn.Parameter(torch.ones(shape[0], 1, 1))
        self.bias = nn.Parameter(torch.zeros(bias_size))
        self.register_buffer("folded", None, persistent=False)

    def weight(self) -> torch.Tensor:
        return self.folded if self.folded is not None else weight_from_norm(self.weight_g, self.weight_v)

    def fold(self) -> None:
        with torch.no_grad():
            self.folded = weight_from_norm(self.weight_g, self.weight_v).detach()


class WNConv1d(_WeightNormConv):
    """Weight-normalised Conv1d: [B, C_in, T] -> [B, C_out, T']."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, padding: int = 0):
        super().__init__((out_channels, in_channels, kernel_size), out_channels)
        self.dilation, self.padding = dilation, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, dilation=self.dilation)


class WNConvTranspose1d(_WeightNormConv):
    """Weight-normalised ConvTranspose1d (weight [C_in, C_out, K], so the gain is per input channel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__((in_channels, out_channels, kernel_size), out_channels)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight(), self.bias, stride=self.stride, padding=self.padding)


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """Precompute every weight-normalised kernel (call after loading weights; before `.to()` is fine)."""
    for m in model.modules():
        if isinstance(m, _WeightNormConv):
            m.fold()
    return model


class Snake1d(nn.Module):
    """Snake activation x + sin^2(a x) / a with a learned per-channel `alpha` [1, C, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1e-9 keeps the reciprocal finite where a channel's alpha trained to zero (as upstream)
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)
