"""BiCodec's wave generator (DAC-style decoder): latent [B, C, T] -> waveform [B, 1, T * prod(rates)].

Key layout under `decoder.model.`:

    0                      WNConv1d(C_in, ch, 7)
    1..n                   DecoderBlock i: block.0 Snake, block.1 WNConvTranspose1d(ch/2^i, ch/2^(i+1), k_i, rate_i),
                           block.2..4 ResidualUnit(dilation 1, 3, 9): block.0 Snake, block.1 WNConv1d(7, dil),
                           block.2 Snake, block.3 WNConv1d(1)
    n+1                    Snake
    n+2                    WNConv1d(ch/2^n, 1, 7)        (then tanh, no weights)

With padding (k - rate) // 2 and k - rate even (published kernels 16, 11, 8, 4 at rates 8, 5, 4, 2)
every stage multiplies the length exactly by its rate: 320 samples per token.
"""

from __future__ import annotations

import torch
from torch import nn

from tts.spark.config import WaveGeneratorConfig
from tts.spark.layers import Snake1d, WNConv1d, WNConvTranspose1d

RESIDUAL_DILATIONS = (1, 3, 9)
CONV_KERNEL = 7


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, CONV_KERNEL, dilation=dilation, padding=(CONV_KERNEL - 1) * dilation // 2),
            Snake1d(dim),
            WNConv1d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        trim = (x.shape[-1] - y.shape[-1]) // 2  # zero with the published paddings
        if trim > 0:
            x = x[..., trim:-trim]
        return x + y


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(cin),
            WNConvTranspose1d(cin, cout, kernel, stride=stride, padding=(kernel - stride) // 2),
            *(ResidualUnit(cout, d) for d in RESIDUAL_DILATIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WaveGenerator(nn.Module):
    def __init__(self, cfg: WaveGeneratorConfig):
        super().__init__()
        layers: list[nn.Module] = [WNConv1d(cfg.input_channel, cfg.channels, CONV_KERNEL, padding=CONV_KERNEL // 2)]
        out_dim = cfg.channels
        for i, (kernel, rate) in enumerate(zip(cfg.kernel_sizes, cfg.rates)):
            in_dim, out_dim = cfg.channels // 2 ** i, cfg.channels // 2 ** (i + 1)
            layers.append(DecoderBlock(in_dim, out_dim, kernel, rate))
        layers += [Snake1d(out_dim), WNConv1d(out_dim, cfg.d_out, CONV_KERNEL, padding=CONV_KERNEL // 2), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, T] -> wav [B, d_out, T * hop] in [-1, 1]."""
        return self.model(x)
