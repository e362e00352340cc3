"""ONNX exports of F5's heavy modules, for TensorRT engines (`build_engines f5`).

Two graphs, both in the padded layout the torch runtime's `tts.f5.sampler.sample` uses, so the
TensorRT runtime (`tts.f5.trt_runner`) only swaps the module and keeps the pipeline's batching:

* **DiT** (`DiTGraph`): one velocity evaluation of the CFG pair, `DiT.forward`:
  x, cond [B, T, mel] float32; text_cond, text_uncond [B, T, text_dim] in the weights' dtype;
  time [B] float32 (flow time in [0, 1]); mask [B, T] bool -> pred, null [B, T, mel] in the weights'
  dtype. Inside, the rows are doubled (2 B rows: conditional, then unconditional), so an engine
  built for B chunks runs 2 B rows. B, T are dynamic. The text embedding (`DiT.embed_text`, once
  per request) and the Euler update stay in torch: they are a few percent of a step's work and
  keep the engine's inputs the same as the torch module's.
* **Vocos** (`VocosGraph`): mel [B, 100, T] float32 plus lengths [B] int64 (frames per item) ->
  audio [B, (T - 1) * hop] float32, item i exact on its first (lengths_i - 1) * hop samples and zero
  after (as `tts.f5.fast.vocode_batch`). The inverse STFT is written with operators TensorRT runs:
  the inverse real DFT as two products with fixed cosine / sine bases (window folded in) and the
  overlap-add as a sum of shifted hop-sized blocks (n_fft = 4 hops: pads, slices and adds), the
  window envelope the same way. No FFT, no Col2Im, and no transposed convolution (a 1,024-tap
  deconvolution kernel is past what TensorRT's deconvolution layer is known to accept).

Exported with torch's dynamo exporter at `OPSET`; `check_*` helpers compare an export against the
torch module with onnxruntime (CPU), which is how the tests and `build_engines --check` prove them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tts.f5.dit import DiT
from tts.f5.vocos import ENVELOPE_FLOOR, MAX_MAGNITUDE, Vocos

#: ONNX opset: 18 has every operator these graphs use (LayerNormalization, Mish via Softplus/Tanh,
#: ConvTranspose, ScaledDotProductAttention decomposed to MatMul/Softmax) and TensorRT 10 parses it.
OPSET = 18
#: Default longest padded item the engines are built for: 4096 frames = 43.7 s at 93.75 frames/s
#: (a 12 s prompt plus a 22 s chunk is 3,190 frames; upstream's engine stopped at 3000).
DEFAULT_MAX_FRAMES = 4096
#: Shortest item: upstream's floor (text or prompt + 1) never goes below a few frames; 16 keeps the
#: optimisation profile's lower end from forcing tiny-kernel tactics.
MIN_FRAMES = 16

DIT_INPUTS = ("x", "cond", "text_cond", "text_uncond", "time", "mask")
DIT_OUTPUTS = ("pred", "null")
VOCOS_INPUTS = ("mel", "lengths")
VOCOS_OUTPUTS = ("audio",)


# -- DiT ------------------------------------------------------------------------------------------

class DiTGraph(nn.Module):
    """`DiT.forward` as an export root (named inputs, tuple output). Needs the plain "conv" form of
    the position convolution (the fast path's Triton kernel does not export)."""

    def __init__(self, dit: DiT):
        super().__init__()
        if dit.input_embed.conv_pos_embed.form == "kernel":
            raise ValueError("export the DiT before the fast path switches its convolution to the Triton kernel")
        self.dit = dit

    def forward(self, x: Tensor, cond: Tensor, text_cond: Tensor, text_uncond: Tensor, time: Tensor,
                mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.dit(x, cond, text_cond, text_uncond, time, mask)


def dit_example_inputs(dit: DiT, batch: int = 2, frames: int = 48, seed: int = 0) -> dict[str, Tensor]:
    """Inputs of `DiTGraph` for tracing and checks: item i is `frames - 7 i` frames long (mixed
    lengths, so masks matter); text from random ids through the module's own `embed_text`."""
    cfg = dit.cfg
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([max(frames - 7 * i, 2) for i in range(batch)])
    ref = (lens // 3).clamp_min(1)
    mask = torch.arange(frames)[None, :] < lens[:, None]
    ref_mask = (torch.arange(frames)[None, :] < ref[:, None])[..., None]
    ids = torch.randint(0, cfg.text_num_embeds, (batch, frames // 2), generator=gen)
    with torch.no_grad():
        text_cond, text_uncond = dit.embed_text(ids, lens, frames=frames)
    x = torch.randn(batch, frames, cfg.mel_dim, generator=gen).masked_fill(~mask[..., None], 0.0)
    cond = torch.where(ref_mask, torch.randn(batch, frames, cfg.mel_dim, generator=gen), 0.0)
    return {"x": x, "cond": cond, "text_cond": text_cond.to(dit.dtype), "text_uncond": text_uncond.to(dit.dtype),
            "time": torch.rand(batch, generator=gen), "mask": mask}


def export_dit(dit: DiT, path: str | Path, max_frames: int = DEFAULT_MAX_FRAMES) -> Path:
    """Write the DiT graph (weights inside; a model over 2 GB gets an external data file beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = torch.export.Dim
    rows, frames = dim("chunks", min=1, max=1024), dim("frames", min=2, max=max_frames)
    shapes = {"x": {0: rows, 1: frames}, "cond": {0: rows, 1: frames}, "text_cond": {0: rows, 1: frames},
              "text_uncond": {0: rows, 1: frames}, "time": {0: rows}, "mask": {0: rows, 1: frames}}
    example = dit_example_inputs(dit)
    with torch.no_grad():
        program = torch.onnx.export(DiTGraph(dit).eval(), tuple(example[k] for k in DIT_INPUTS), dynamo=True,
                                    input_names=list(DIT_INPUTS), output_names=list(DIT_OUTPUTS),
                                    dynamic_shapes=shapes, opset_version=OPSET, external_data=False
                                    if _param_bytes(dit) < 1.9e9 else True)
    program.save(str(path))
    return path


# -- Vocos ----------------------------------------------------------------------------------------

def inverse_dft_bases(n_fft: int, window: Tensor) -> tuple[Tensor, Tensor]:
    """Real inverse DFT of a one-sided spectrum as products: frame = Re @ C - Im @ S, with
    C[k, n] = w_k / N cos(2 pi k n / N) window[n] and S[k, n] = w_k / N sin(2 pi k n / N) window[n],
    w_k = 1 for the DC and Nyquist bins and 2 otherwise (their mirrored halves). Both [N/2 + 1, N]
    float32; the imaginary parts of DC and Nyquist drop out as in irfft (sin is 0 there)."""
    bins = n_fft // 2 + 1
    k = torch.arange(bins, dtype=torch.float64)[:, None]
    n = torch.arange(n_fft, dtype=torch.float64)[None, :]
    weight = torch.full((bins, 1), 2.0, dtype=torch.float64)
    weight[0] = weight[-1] = 1.0
    angle = 2 * math.pi * k * n / n_fft
    win = window.double()[None, :]
    cos = (weight / n_fft * torch.cos(angle) * win).float()
    sin = (weight / n_fft * torch.sin(angle) * win).float()
    return cos, sin


class VocosGraph(nn.Module):
    """Vocos decode of a padded batch with per-item lengths, in operators TensorRT runs (see the
    module docstring). Same arithmetic as `tts.f5.fast.vocode_batch` up to float rounding."""

    def __init__(self, vocos: Vocos):
        super().__init__()
        self.vocos = vocos
        cfg = vocos.config
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length
        window = vocos.head.istft.window.float()
        cos, sin = inverse_dft_bases(cfg.n_fft, window)
        self.register_buffer("idft_cos", cos, persistent=False)
        self.register_buffer("idft_sin", sin, persistent=False)
        self.register_buffer("window_sq", (window * window)[None, None, :], persistent=False)  # [1, 1, N]
        if cfg.n_fft % cfg.hop_length:
            raise ValueError(f"overlap-add by blocks needs n_fft ({cfg.n_fft}) to be a multiple of the hop "
                             f"({cfg.hop_length})")

    def forward(self, mel: Tensor, lengths: Tensor) -> Tensor:
        """mel [B, C, T] float32, lengths [B] int64 (2 <= lengths <= T) -> audio [B, (T - 1) * hop]."""
        bb = self.vocos.backbone
        t = mel.shape[2]
        keep = (torch.arange(t, device=mel.device)[None, :] < lengths[:, None])[:, None, :]  # [B, 1, T]
        dt = self.vocos.head.out.weight.dtype
        h = bb.embed(mel.masked_fill(~keep, 0.0).to(dt))
        h = bb.norm(h.transpose(1, 2)).transpose(1, 2)
        for block in bb.convnext:
            r = block.dwconv(h.masked_fill(~keep, 0.0)).transpose(1, 2)
            r = block.pwconv2(block.act(block.pwconv1(block.norm(r))))
            if block.gamma is not None:
                r = block.gamma * r
            h = h + r.transpose(1, 2)
        feats = bb.final_layer_norm(h.transpose(1, 2))
        log_mag, phase = self.vocos.head.out(feats).float().chunk(2, dim=-1)  # each [B, T, bins]
        mag = torch.clamp(torch.exp(log_mag), max=MAX_MAGNITUDE)
        frames = (mag * torch.cos(phase)) @ self.idft_cos - (mag * torch.sin(phase)) @ self.idft_sin  # [B, T, N]
        keep_t = keep.transpose(1, 2).float()  # [B, T, 1]
        y = overlap_add_blocks(frames * keep_t, self.hop)  # [B, (T - 1) hop + N]
        env = overlap_add_blocks(self.window_sq * keep_t, self.hop)
        pad, n_out = self.n_fft // 2, (t - 1) * self.hop
        y, env = y[:, pad: pad + n_out], env[:, pad: pad + n_out]
        inside = (env > ENVELOPE_FLOOR) & (torch.arange(n_out, device=mel.device)[None, :]
                                           < ((lengths - 1) * self.hop)[:, None])
        return torch.where(inside, y / env.clamp_min(ENVELOPE_FLOOR), 0.0)


def overlap_add_blocks(frames: Tensor, hop: int) -> Tensor:
    """frames [B, T, N] (N = k hops) -> [B, (T - 1) hop + N]: frame t added at sample t hop, as
    `tts.f5.vocos.overlap_add`. Block j of frame t lands on output block t + j, so the output is the
    sum over j of the frames' j-th blocks shifted by j blocks: k pads, slices and adds."""
    b, t, n = frames.shape
    k = n // hop
    blocks = frames.reshape(b, t, k, hop)
    out = F.pad(blocks[:, :, 0], (0, 0, 0, k - 1))  # [B, T + k - 1, hop]
    for j in range(1, k):
        out = out + F.pad(blocks[:, :, j], (0, 0, j, k - 1 - j))
    return out.reshape(b, (t + k - 1) * hop)


def vocos_example_inputs(vocos: Vocos, lengths: tuple[int, ...] = (40, 27), seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    mel = torch.randn(len(lengths), vocos.config.input_channels, t, generator=gen) - 4.0
    return {"mel": mel, "lengths": torch.tensor(lengths, dtype=torch.int64)}


def export_vocos(vocos: Vocos, path: str | Path, max_frames: int = DEFAULT_MAX_FRAMES) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dim = torch.export.Dim
    rows, frames = dim("items", min=1, max=1024), dim("frames", min=2, max=max_frames)
    example = vocos_example_inputs(vocos)
    with torch.no_grad():
        program = torch.onnx.export(VocosGraph(vocos).eval(), (example["mel"], example["lengths"]), dynamo=True,
                                    input_names=list(VOCOS_INPUTS), output_names=list(VOCOS_OUTPUTS),
                                    dynamic_shapes={"mel": {0: rows, 2: frames}, "lengths": {0: rows}},
                                    opset_version=OPSET, external_data=False)
    program.save(str(path))
    return path


# -- checks ---------------------------------------------------------------------------------------

def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def ort_session(path: str | Path, threads: int = 2):
    """An onnxruntime CPU session (the CPU check of an export)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(session, inputs: dict[str, Tensor]) -> list[Tensor]:
    feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items()}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
