"""BiCodec's speaker encoder: mel -> ECAPA-TDNN frames -> perceiver resampler -> residual FSQ.

tokenize: mel [B, T, n_mels] -> global ids [B, 1, 32]
detokenize: ids [B, 1, 32] -> d-vector [B, out_dim] (FSQ codes, flattened channel-major, then a Linear)

Key layout under `speaker_encoder.`:

    speaker_encoder.layer1.{conv,bn}.*                            Conv1d(n_mels, C, 5) + BatchNorm
    speaker_encoder.layer{2,3,4}.se_res2block.{0,2}.{conv,bn}.*   1x1 conv blocks
    speaker_encoder.layer{2,3,4}.se_res2block.1.{convs,bns}.<i>.* Res2 branch convs (7 of C/8 channels)
    speaker_encoder.layer{2,3,4}.se_res2block.3.linear{1,2}.*     squeeze-excitation
    speaker_encoder.conv.*, speaker_encoder.pool.linear{1,2}.*, speaker_encoder.bn.*, speaker_encoder.linear.*
    perceiver_sampler.{proj_context,latents,norm.gamma}, perceiver_sampler.layers.<i>.0.to_{q,kv,out}.weight,
    perceiver_sampler.layers.<i>.1.{0,2}.*                        GEGLU feed-forward
    quantizer.project_{in,out}.*, project.*

The x-vector head (pool -> bn -> linear) is part of the checkpoint but not of inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tts.spark.config import SpeakerEncoderConfig
from tts.spark.quantizers import ResidualFSQ

#: ECAPA-TDNN's Res2 blocks split channels into this many groups (upstream scale=8).
RES2_SCALE = 8
#: (kernel, dilation) of ECAPA layers 2-4; padding equals the dilation so lengths are kept.
SE_RES2_LAYERS = ((3, 2), (3, 3), (3, 4))
#: Variance floor inside the attentive statistics pooling (upstream's constant).
POOL_VAR_EPS = 1e-7


class Conv1dReluBn(nn.Module):
    """Conv1d -> ReLU -> BatchNorm1d (this order, as trained)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, padding=padding, dilation=dilation)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Conv1dReluBn(nn.Module):
    """Res2Net conv: channel groups processed in a chain, each adding the previous group's output."""

    def __init__(self, channels: int, kernel: int, padding: int, dilation: int, scale: int = RES2_SCALE):
        super().__init__()
        self.width = channels // scale
        n = scale - 1 if scale > 1 else 1
        self.convs = nn.ModuleList(nn.Conv1d(self.width, self.width, kernel, padding=padding, dilation=dilation)
                                   for _ in range(n))
        self.bns = nn.ModuleList(nn.BatchNorm1d(self.width) for _ in range(n))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.width, dim=1)
        out, y = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = groups[i] if i == 0 else y + groups[i]
            y = bn(F.relu(conv(y)))
            out.append(y)
        if self.scale > 1:
            out.append(groups[len(self.convs)])  # the last group passes through untouched
        return torch.cat(out, dim=1)


class SEConnect(nn.Module):
    """Squeeze-excitation: channel gates from the time-mean."""

    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SERes2Block(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int, se_bottleneck: int):
        super().__init__()
        self.se_res2block = nn.Sequential(
            Conv1dReluBn(channels, channels),
            Res2Conv1dReluBn(channels, kernel, padding=dilation, dilation=dilation),
            Conv1dReluBn(channels, channels),
            SEConnect(channels, se_bottleneck))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_res2block(x)


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling with global context (the x-vector head's pooling)."""

    def __init__(self, in_dim: int, bottleneck: int):
        super().__init__()
        self.linear1 = nn.Conv1d(in_dim * 3, bottleneck, kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck, in_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True).expand_as(x)
        std = torch.sqrt(x.var(dim=-1, keepdim=True) + POOL_VAR_EPS).expand_as(x)
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(torch.cat((x, mean, std), dim=1)))), dim=2)
        mu = torch.sum(alpha * x, dim=2)
        var = torch.sum(alpha * x ** 2, dim=2) - mu ** 2
        return torch.cat([mu, torch.sqrt(var.clamp(min=POOL_VAR_EPS))], dim=1)


class EcapaTdnn(nn.Module):
    """ECAPA-TDNN (global-context variant): mel [B, T, F] -> frame features [B, 3C, T] (+ x-vector)."""

    def __init__(self, feat_dim: int, embed_dim: int, channels: int, se_bottleneck: int, astp_bottleneck: int):
        super().__init__()
        self.layer1 = Conv1dReluBn(feat_dim, channels, kernel=5, padding=2)
        self.layer2, self.layer3, self.layer4 = (SERes2Block(channels, k, d, se_bottleneck) for k, d in SE_RES2_LAYERS)
        self.conv = nn.Conv1d(channels * 3, channels * 3, kernel_size=1)
        self.pool = AttentiveStatsPool(channels * 3, astp_bottleneck)
        self.bn = nn.BatchNorm1d(channels * 6)
        self.linear = nn.Linear(channels * 6, embed_dim)

    def frames(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, T, F] -> latent frames [B, 3C, T] (what the perceiver attends to)."""
        out1 = self.layer1(mel.permute(0, 2, 1))
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        return F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))

    def x_vector(self, latent: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(self.pool(latent)))


class CrossAttention(nn.Module):
    """Latents attend to [latents; context] (bias-free projections, no mask, non-causal)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = latents.shape
        context = torch.cat((latents, context), dim=-2)
        q = self.to_q(latents)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = q.shape[-1] ** -0.5
        attn = (torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult * 2 / 3)
    return nn.Sequential(nn.Linear(dim, inner * 2), GEGLU(), nn.Linear(inner, dim))


class RMSNorm(nn.Module):
    """x / ||x|| * sqrt(dim) * gamma."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class PerceiverResampler(nn.Module):
    """Context [B, T, dim_context] -> `num_latents` learned queries refined by cross-attention: [B, N, dim]."""

    def __init__(self, dim: int, dim_context: int, num_latents: int, depth: int, heads: int, dim_head: int,
                 ff_mult: int):
        super().__init__()
        self.proj_context = nn.Linear(dim_context, dim) if dim_context != dim else nn.Identity()
        self.latents = nn.Parameter(torch.zeros(num_latents, dim))
        self.layers = nn.ModuleList(nn.ModuleList([CrossAttention(dim, heads, dim_head), feed_forward(dim, ff_mult)])
                                    for _ in range(depth))
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_context(x)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(latents, x) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class SpeakerEncoder(nn.Module):
    def __init__(self, cfg: SpeakerEncoderConfig):
        super().__init__()
        c = cfg.ecapa_channels
        self.speaker_encoder = EcapaTdnn(cfg.input_dim, cfg.out_dim, c, cfg.se_bottleneck, cfg.astp_bottleneck)
        self.perceiver_sampler = PerceiverResampler(cfg.latent_dim, c * 3, cfg.token_num, cfg.perceiver_depth,
                                                    cfg.perceiver_heads, cfg.perceiver_dim_head, cfg.perceiver_ff_mult)
        self.quantizer = ResidualFSQ(cfg.fsq_levels, cfg.fsq_num_quantizers, cfg.latent_dim)
        self.project = nn.Linear(cfg.latent_dim * cfg.token_num, cfg.out_dim)

    def tokenize(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, T, n_mels] -> global ids [B, num_quantizers, token_num] (int32)."""
        frames = self.speaker_encoder.frames(mel)
        latents = self.perceiver_sampler(frames.transpose(1, 2)).transpose(1, 2)  # [B, latent, N]
        _, ids = self.quantizer(latents)
        return ids

    def detokenize(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, num_quantizers, token_num] -> d-vector [B, out_dim]."""
        z = self.quantizer.decode(ids)  # [B, latent, N]
        return self.project(z.reshape(z.shape[0], -1))
