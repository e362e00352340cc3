"""BiCodec's two quantizers.

* `FactorizedVQ` (semantic stream): project the latent down to `codebook_dim`, pick the codebook
  entry of highest cosine similarity, and on the way back look the (unnormalised) entry up and
  project it up again. Keys: `quantizer.in_project.weight_{g,v}/bias`, `quantizer.out_project.*`,
  `quantizer.codebook.weight` [K, d], `quantizer.cluster_size` [K] (a training statistic, kept for
  key parity).
* `ResidualFSQ` (global stream): finite scalar quantization, every dim bounded by tanh to `level`
  values; one id per vector is the mixed-radix number of the per-dim level indices. Keys: only the
  in/out projections (`project_in`, `project_out`); the FSQ layers themselves hold no weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tts.spark.layers import WNConv1d

#: FSQ bounds each dim slightly beyond its outermost levels so that rounding reaches them.
FSQ_BOUND_EPS = 1e-3


class FactorizedVQ(nn.Module):
    """Semantic VQ: latent [B, D, T] <-> token ids [B, T]."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        if input_dim == codebook_dim:
            raise ValueError("FactorizedVQ expects a projection (input_dim != codebook_dim), as published")
        self.in_project = WNConv1d(input_dim, codebook_dim, 1)
        self.out_project = WNConv1d(codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)
        self.register_buffer("cluster_size", torch.zeros(codebook_size))

    def tokenize(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, T] -> ids [B, T] (int64): nearest codebook entry after L2-normalising both sides."""
        z_e = self.in_project(z)
        b = z_e.shape[0]
        enc = F.normalize(z_e.transpose(1, 2).reshape(-1, z_e.shape[1]))
        book = F.normalize(self.codebook.weight)
        # squared euclidean distance of unit vectors (upstream's expression, kept for identical ties)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + book.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(1)[1].view(b, -1)

    def detokenize(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> latent [B, D, T]."""
        return self.out_project(F.embedding(ids, self.codebook.weight).transpose(1, 2))


def _fsq_basis(levels: list[int]) -> list[int]:
    basis, acc = [], 1
    for level in levels:
        basis.append(acc)
        acc *= level
    return basis


class ResidualFSQ(nn.Module):
    """Channel-first residual FSQ: x [B, dim, N] <-> ids [B, num_quantizers, N]."""

    def __init__(self, levels: tuple[int, ...], num_quantizers: int, dim: int):
        super().__init__()
        self.num_quantizers = num_quantizers
        self.codebook_dim = len(levels)
        if dim != self.codebook_dim:
            self.project_in = nn.Linear(dim, self.codebook_dim)
            self.project_out = nn.Linear(self.codebook_dim, dim)
        else:
            self.project_in = self.project_out = nn.Identity()
        lv = torch.tensor(levels, dtype=torch.int32)
        self.register_buffer("levels", lv, persistent=False)
        self.register_buffer("basis", torch.tensor(_fsq_basis(list(levels)), dtype=torch.int32), persistent=False)
        # residual stage q works on the residual scaled up by (level - 1) ** q
        scales = torch.stack([(lv.float() - 1) ** -q for q in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One FSQ stage: z [..., d] -> (codes in [-1, 1] [..., d], ids [...])."""
        levels = self.levels
        half_l = (levels - 1) * (1 + FSQ_BOUND_EPS) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        bounded = (z + shift).tanh() * half_l - offset
        half_width = levels // 2
        codes = bounded.round() / half_width
        ids = ((codes * half_width + half_width) * self.basis).sum(dim=-1).to(torch.int32)
        return codes, ids

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, dim, N] -> (quantized [B, dim, N], ids [B, num_quantizers, N] int32)."""
        # the scalar quantization runs in float32 whatever the model dtype (as upstream forces)
        residual = self.project_in(x.transpose(1, 2)).float()
        out = torch.zeros_like(residual)
        all_ids = []
        for q in range(self.num_quantizers):
            codes, ids = self._quantize(residual / self.scales[q])
            quantized = codes * self.scales[q]
            residual = residual - quantized
            out = out + quantized
            all_ids.append(ids)
        return self.project_out(out.to(x.dtype)).transpose(1, 2), torch.stack(all_ids, dim=1)

    def codes_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [..., num_quantizers] -> summed scaled codes [..., codebook_dim]."""
        digits = (ids.long().unsqueeze(-1) // self.basis.long()) % self.levels.long()  # [..., q, d]
        half_width = self.levels // 2
        codes = (digits - half_width) / half_width
        return (codes * self.scales).sum(dim=-2)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, num_quantizers, N] -> quantized [B, dim, N] (same as `forward`'s first output)."""
        codes = self.codes_from_ids(ids.transpose(1, 2))
        weight = getattr(self.project_out, "weight", None)
        return self.project_out(codes.to(weight.dtype if weight is not None else codes.dtype)).transpose(1, 2)
