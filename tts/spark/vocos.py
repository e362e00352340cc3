"""BiCodec's feature encoder and its prenet/postnet: ConvNeXt (Vocos) backbones with sampling blocks.

Key layout (BiCodec/model.safetensors), e.g. for the encoder:

    encoder.encoder.embed.{weight,bias}                 Conv1d(C_in, D, 7)
    encoder.encoder.norm.{weight,bias}                  LayerNorm(D)   (AdaLayerNorm: norm.scale/shift.*)
    encoder.encoder.convnext.<i>.{dwconv,norm,pwconv1,pwconv2}.*, .gamma
    encoder.encoder.final_layer_norm.*
    encoder.downsample.<j>.1.*                          a 2-layer backbone after sampling block <j>.0
    encoder.project.*                                   Linear(D, C_out)

The prenet/postnet (`FeatDecoder`) have `linear_pre`, `downsample.<j>.1`, `vocos_backbone`, `linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tts.spark.config import FeatDecoderConfig, FeatEncoderConfig

LAYER_NORM_EPS = 1e-6
#: Every sampling block is followed by a short backbone of this many ConvNeXt layers (upstream fixed).
SAMPLING_BACKBONE_LAYERS = 2
DWCONV_KERNEL = 7


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine, then a scale and shift predicted from a condition vector [B, cond]."""

    def __init__(self, condition_dim: int, dim: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = nn.Linear(condition_dim, dim)
        self.shift = nn.Linear(condition_dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], cond [B, cond_dim] -> [B, T, D]."""
        x = F.layer_norm(x, (self.dim,), eps=self.eps)
        return x * self.scale(cond).unsqueeze(1) + self.shift(cond).unsqueeze(1)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (7 frames) -> norm -> pointwise MLP (GELU) -> layer scale, residual. [B, D, T]."""

    def __init__(self, dim: int, intermediate_dim: int, condition_dim: int | None):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, DWCONV_KERNEL, padding=DWCONV_KERNEL // 2, groups=dim)
        self.norm = AdaLayerNorm(condition_dim, dim) if condition_dim else nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = self.dwconv(x).transpose(1, 2)
        y = self.norm(y, cond) if isinstance(self.norm, AdaLayerNorm) else self.norm(y)
        y = self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + (self.gamma * y).transpose(1, 2)


class VocosBackbone(nn.Module):
    """Conv embed + norm + ConvNeXt blocks + final LayerNorm: [B, C_in, T] -> [B, T, D] (note: time-major out)."""

    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int,
                 condition_dim: int | None = None):
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, DWCONV_KERNEL, padding=DWCONV_KERNEL // 2)
        self.norm = AdaLayerNorm(condition_dim, dim) if condition_dim else nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, condition_dim) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(x).transpose(1, 2)
        x = self.norm(x, cond) if isinstance(self.norm, AdaLayerNorm) else self.norm(x)
        x = x.transpose(1, 2)
        for block in self.convnext:
            x = block(x, cond)
        return self.final_layer_norm(x.transpose(1, 2))


class SamplingBlock(nn.Module):
    """Resampling by an integer factor with residual paths: [B, T, D] -> [B, D, T'] (channel-major out).

    Up: repeat + grouped transposed conv; down: grouped strided conv + two average pools. At factor
    1 (every published config) it has no weights and returns 3 * x: the conv path and both skip
    paths all pass x through.
    """

    def __init__(self, dim: int, upsample_scale: int = 1, downsample_scale: int = 1):
        super().__init__()
        self.up, self.down = upsample_scale, downsample_scale
        if self.up > 1:
            self.de_conv_upsampler = nn.Sequential(
                nn.LeakyReLU(0.2),
                nn.ConvTranspose1d(dim, dim, kernel_size=self.up * 2, stride=self.up,
                                   padding=self.up // 2 + self.up % 2, output_padding=self.up % 2, groups=dim))
        if self.down > 1:
            self.conv_downsampler = nn.Sequential(
                nn.LeakyReLU(0.2),
                nn.Conv1d(dim, dim, kernel_size=2 * self.down, stride=self.down,
                          padding=self.down // 2 + self.down % 2, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)
        if self.up > 1:
            repeated = x.repeat_interleave(self.up, dim=2)
            merged = repeated + self.de_conv_upsampler(x)
        else:
            repeated = merged = x
        if self.down > 1:
            conv = self.conv_downsampler(merged)
            skip2 = F.avg_pool1d(merged, kernel_size=self.down, stride=self.down)
            skip1 = F.avg_pool1d(repeated, kernel_size=self.down, stride=self.down)
        else:
            conv, skip2, skip1 = merged, merged, repeated
        return conv + skip1 + skip2


def _sampling_stages(dim: int, intermediate: int, ratios, up: bool) -> nn.Sequential:
    stages = []
    for ratio in ratios:
        block = SamplingBlock(dim, upsample_scale=ratio) if up else SamplingBlock(dim, downsample_scale=ratio)
        stages.append(nn.Sequential(block, VocosBackbone(dim, dim, intermediate, SAMPLING_BACKBONE_LAYERS)))
    return nn.Sequential(*stages)


class FeatEncoder(nn.Module):
    """wav2vec2 features [B, C_in, T] -> BiCodec latent [B, C_out, T / prod(sample_ratios)]."""

    def __init__(self, cfg: FeatEncoderConfig):
        super().__init__()
        self.encoder = VocosBackbone(cfg.input_channels, cfg.vocos_dim, cfg.vocos_intermediate_dim,
                                     cfg.vocos_num_layers)
        self.downsample = _sampling_stages(cfg.vocos_dim, cfg.vocos_intermediate_dim, cfg.sample_ratios, up=False)
        self.project = nn.Linear(cfg.vocos_dim, cfg.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(self.encoder(x))
        return self.project(x).transpose(1, 2)


class FeatDecoder(nn.Module):
    """Latent [B, C_in, T] (+ condition [B, cond]) -> [B, C_out, T * prod(sample_ratios)]."""

    def __init__(self, cfg: FeatDecoderConfig):
        super().__init__()
        self.use_tanh = cfg.use_tanh_at_final
        self.linear_pre = nn.Linear(cfg.input_channels, cfg.vocos_dim)
        self.downsample = _sampling_stages(cfg.vocos_dim, cfg.vocos_intermediate_dim, cfg.sample_ratios, up=True)
        self.vocos_backbone = VocosBackbone(cfg.vocos_dim, cfg.vocos_dim, cfg.vocos_intermediate_dim,
                                            cfg.vocos_num_layers, condition_dim=cfg.condition_dim)
        self.linear = nn.Linear(cfg.vocos_dim, cfg.out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = self.linear_pre(x.transpose(1, 2))
        x = self.downsample(x).transpose(1, 2)
        x = self.linear(self.vocos_backbone(x, cond)).transpose(1, 2)
        return torch.tanh(x) if self.use_tanh else x
