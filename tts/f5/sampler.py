"""F5-TTS flow-matching sampler: timesteps, seeded noise, and the Euler ODE loop.

Semantics follow upstream `CFM.sample` (model/cfm.py) with torchdiffeq's fixed-grid Euler:
x(t=0) is Gaussian noise, x(t=1) the mel; each step x <- x + (t[i+1] - t[i]) * v(t[i], x) with the
classifier-free guided velocity v = pred + (pred - null) * cfg_strength. The reference region of
the result is replaced by the reference mel (as upstream's PyTorch path does).

The ODE state is float32 whatever the network's dtype (the network casts its inputs); timesteps
are float32 too. `ode_step` is a free function so a caller can `torch.compile` it or capture it in
a CUDA graph per batch shape; nothing inside the step loop syncs with the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tts.f5.dit import DiT

#: Empirically Pruned Step Sampling (upstream model/utils.py get_epss_timesteps): for these step
#: counts the grid is the listed indices on a 1/32 grid instead of an even spacing.
EPSS_GRID = 32
EPSS_TIMESTEPS: dict[int, tuple[int, ...]] = {
    5: (0, 2, 4, 8, 16, 32),
    6: (0, 2, 4, 6, 8, 16, 32),
    7: (0, 2, 4, 6, 8, 16, 24, 32),
    10: (0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32),
    12: (0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32),
}


def timesteps(nfe: int, sway: float | None, use_epss: bool = True) -> Tensor:
    """Flow times [nfe + 1] float32 from 0 (noise) to 1 (data), as upstream CFM.sample builds them.

    The EPSS table for its step counts (when use_epss), else an even grid; then sway sampling
    t + sway * (cos(pi/2 t) - 1 + t) on top (sway -1 crowds steps near t = 0). None = no sway.
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1; got {nfe}")
    if use_epss and nfe in EPSS_TIMESTEPS:
        t = torch.tensor(EPSS_TIMESTEPS[nfe], dtype=torch.float32) * (1.0 / EPSS_GRID)
    else:
        t = torch.linspace(0, 1, nfe + 1, dtype=torch.float32)
    if sway is not None:
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def make_noise(seed: int, frames: int, mel_dim: int = 100, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise [frames, mel_dim] for one item, a pure function of the seed.

    Drawn on the CPU (then moved), so CPU and CUDA runs start from the same noise; for a given seed
    it equals upstream's `torch.manual_seed(seed); torch.randn(frames, mel_dim)` on CPU.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(frames, mel_dim, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def min_total_frames(text_len: int, ref_len: int) -> int:
    """Upstream's floor on the total length: the text or the reference, whichever is longer, plus one
    frame, so something is generated. text_len counts all tokens (reference + target text)."""
    return max(int(text_len), int(ref_len)) + 1


def guided_euler(x: Tensor, pred: Tensor, null: Tensor, dt: Tensor, cfg_strength) -> Tensor:
    """x + dt * v with the classifier-free-guided velocity v = pred + (pred - null) * cfg, in x's dtype."""
    v = (pred + (pred - null) * cfg_strength).to(x.dtype)
    return x + dt * v


def ode_step(dit: DiT, x: Tensor, t0: Tensor, dt: Tensor, cond: Tensor, text_cond: Tensor,
             text_uncond: Tensor, mask: Tensor, cfg_strength: float) -> Tensor:
    """One Euler step. x [B, T, mel] float32 state at time t0 (0-d tensor), dt 0-d -> state at t0 + dt."""
    pred, null = dit(x, cond, text_cond, text_uncond, t0.expand(x.shape[0]), mask)
    return guided_euler(x, pred, null, dt, cfg_strength)


@torch.no_grad()
def sample(dit: DiT, cond_mel: Tensor, text_ids: Tensor, ref_lens: Tensor, total_lens: Tensor, noise: Tensor,
           nfe: int, cfg_strength: float, sway: float | None, use_epss: bool = True) -> Tensor:
    """Generate mel frames for a batch.

    cond_mel [B, T, mel]: reference mel, zero past ref_lens; text_ids [B, Nt] long (reference text
    + target text, padded with -1); ref_lens, total_lens [B] long: reference and total frames per
    item (total >= min_total_frames is the caller's job); noise [B, T, mel]: from `make_noise`, zero
    past total_lens. Returns float32 [B, T, mel]: the reference mel on [0, ref_len), generated mel
    on [ref_len, total_len), zeros after. Each item's result does not depend on its batch mates.
    """
    b, frames, _ = noise.shape
    device = noise.device
    if cond_mel.shape != noise.shape or text_ids.shape[0] != b:
        raise ValueError(f"batch shapes disagree: cond_mel {tuple(cond_mel.shape)}, noise {tuple(noise.shape)}, "
                         f"text_ids {tuple(text_ids.shape)}")
    pos = torch.arange(frames, device=device)[None, :]
    mask = pos < total_lens.to(device)[:, None]  # [B, T] the item's frames
    ref_mask = (pos < ref_lens.to(device)[:, None])[..., None]  # [B, T, 1] the reference frames
    cond = torch.where(ref_mask, cond_mel.float(), 0.0)
    text_cond, text_uncond = dit.embed_text(text_ids.to(device), total_lens.to(device), frames=frames)
    t = timesteps(nfe, sway, use_epss).to(device)
    dts = t[1:] - t[:-1]
    x = torch.where(mask[..., None], noise.float(), 0.0)
    for i in range(nfe):
        x = ode_step(dit, x, t[i], dts[i], cond, text_cond, text_uncond, mask, cfg_strength)
    out = torch.where(ref_mask, cond, x)
    return torch.where(mask[..., None], out, 0.0)


__all__ = ["EPSS_TIMESTEPS", "timesteps", "make_noise", "min_total_frames", "guided_euler", "ode_step", "sample"]
