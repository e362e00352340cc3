"""Vocos vocoder (`charactr/vocos-mel-24khz`): log-mel [B, 100, T] -> 24 kHz audio [B, (T - 1) * 256].

Architecture (Vocos `VocosBackbone` + `ISTFTHead`, as the published `config.yaml` builds them):
- backbone: Conv1d(100 -> dim, k7) embed, LayerNorm, `num_layers` ConvNeXt blocks (depthwise
  Conv1d k7, LayerNorm, Linear dim -> intermediate, GELU, Linear back, per-channel layer scale
  `gamma`, residual), final LayerNorm. Published: dim 512, intermediate 1536, 8 layers.
- head: Linear(dim -> n_fft + 2) split into log-magnitude and phase halves of 513 bins each;
  magnitude = exp(.) clipped at 100; spectrum = magnitude * (cos phase + i sin phase); inverse STFT
  with a periodic Hann window, n_fft 1024, hop 256, centred ("center" padding).

State-dict keys are those of the published `pytorch_model.bin` (`backbone.*`, `head.out.*`,
`head.istft.window`). That file also carries the training feature extractor's buffers
(`feature_extractor.mel_spec.spectrogram.window`, `feature_extractor.mel_spec.mel_scale.fb`);
they are derived constants, so the loader accepts and ignores them (tts/f5/mel.py computes the
same mel). `write_demo_vocos` writes random weights in exactly this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tts.f5 import mel as mel_mod

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "pytorch_model.bin"
#: Keys of the published file that belong to the training-time feature extractor (ignored on load).
IGNORED_PREFIXES = ("feature_extractor.",)
MAX_MAGNITUDE = 1e2  # upstream clips exp(log-magnitude) here so a wild output cannot blow up the audio
LAYER_NORM_EPS = 1e-6  # Vocos LayerNorms use eps 1e-6 (not torch's default 1e-5)
CONV_KERNEL = 7  # embed and depthwise convs: kernel 7, padding 3 keeps the frame count

_FEATURES_CLASS = "vocos.feature_extractors.MelSpectrogramFeatures"
_BACKBONE_CLASS = "vocos.models.VocosBackbone"
_HEAD_CLASS = "vocos.heads.ISTFTHead"


@dataclass(frozen=True)
class VocosConfig:
    """What `config.yaml` says, limited to the mel / ConvNeXt / ISTFT-head model this module runs."""

    input_channels: int = 100  # mel channels in
    dim: int = 512  # backbone width
    intermediate_dim: int = 1536  # ConvNeXt MLP width
    num_layers: int = 8  # ConvNeXt blocks
    layer_scale_init_value: float | None = None  # None -> 1 / num_layers (only decides whether gamma exists)
    n_fft: int = 1024  # head: 513 bins, n_fft + 2 = 1026 outputs
    hop_length: int = 256  # samples per mel frame
    padding: str = "center"  # ISTFT padding; only "center" (the published model) is supported
    sample_rate: int = 24000  # feature extractor's rate (the audio's rate)

    @property
    def has_layer_scale(self) -> bool:
        value = self.layer_scale_init_value or 1.0 / self.num_layers
        return value > 0

    @classmethod
    def from_yaml(cls, data: dict, source: str = CONFIG_FILE) -> "VocosConfig":
        """Build from a parsed Vocos config (`feature_extractor`, `backbone`, `head`, each
        `{class_path, init_args}`; a training config's `model.init_args` holding them works too)."""
        if isinstance(data, dict) and "backbone" not in data and isinstance(data.get("model"), dict):
            data = data["model"].get("init_args", {})
        if not isinstance(data, dict) or not all(k in data for k in ("feature_extractor", "backbone", "head")):
            raise ValueError(f"{source}: not a Vocos config (needs 'feature_extractor', 'backbone' and 'head')")
        fe, bb, hd = (_section(data, k, cls_path, source) for k, cls_path in
                      (("feature_extractor", _FEATURES_CLASS), ("backbone", _BACKBONE_CLASS), ("head", _HEAD_CLASS)))
        if bb.get("adanorm_num_embeddings"):
            raise ValueError(f"{source}: backbone.adanorm_num_embeddings is set (an EnCodec-conditioned model); "
                             f"only the mel model is supported")
        cfg = cls(input_channels=int(bb["input_channels"]), dim=int(bb["dim"]),
                  intermediate_dim=int(bb["intermediate_dim"]), num_layers=int(bb["num_layers"]),
                  layer_scale_init_value=bb.get("layer_scale_init_value"),
                  n_fft=int(hd["n_fft"]), hop_length=int(hd["hop_length"]), padding=str(hd.get("padding", "same")),
                  sample_rate=int(fe.get("sample_rate", 24000)))
        if int(hd["dim"]) != cfg.dim:
            raise ValueError(f"{source}: head.dim {hd['dim']} differs from backbone.dim {cfg.dim}")
        if cfg.padding != "center":
            raise ValueError(f"{source}: head padding {cfg.padding!r} is not supported (only 'center')")
        fe_mels, fe_hop = int(fe.get("n_mels", cfg.input_channels)), int(fe.get("hop_length", cfg.hop_length))
        if fe_mels != cfg.input_channels or fe_hop != cfg.hop_length:
            raise ValueError(f"{source}: feature extractor (n_mels {fe_mels}, hop {fe_hop}) does not match the "
                             f"backbone input ({cfg.input_channels}) / head hop ({cfg.hop_length})")
        return cfg

    def to_yaml(self) -> dict:
        """The published config layout for this configuration."""
        backbone = {"input_channels": self.input_channels, "dim": self.dim,
                    "intermediate_dim": self.intermediate_dim, "num_layers": self.num_layers}
        if self.layer_scale_init_value is not None:
            backbone["layer_scale_init_value"] = self.layer_scale_init_value
        return {
            "feature_extractor": {"class_path": _FEATURES_CLASS, "init_args": {
                "sample_rate": self.sample_rate, "n_fft": self.n_fft, "hop_length": self.hop_length,
                "n_mels": self.input_channels, "padding": self.padding}},
            "backbone": {"class_path": _BACKBONE_CLASS, "init_args": backbone},
            "head": {"class_path": _HEAD_CLASS, "init_args": {
                "dim": self.dim, "n_fft": self.n_fft, "hop_length": self.hop_length, "padding": self.padding}},
        }


def _section(data: dict, key: str, class_path: str, source: str) -> dict:
    section = data[key]
    if not isinstance(section, dict) or section.get("class_path") != class_path:
        got = section.get("class_path") if isinstance(section, dict) else section
        raise ValueError(f"{source}: {key}.class_path is {got!r}; only {class_path} is supported")
    return dict(section.get("init_args") or {})


# --- modules ---------------------------------------------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """[B, C, T] -> [B, C, T]: depthwise conv, LayerNorm over C, MLP, layer scale, residual."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: bool):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=CONV_KERNEL, padding=CONV_KERNEL // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).transpose(1, 2)  # [B, T, C]
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        if self.gamma is not None:
            h = self.gamma * h
        return x + h.transpose(1, 2)


class VocosBackbone(nn.Module):
    """log-mel [B, input_channels, T] -> features [B, T, dim] (frame count kept)."""

    def __init__(self, cfg: VocosConfig):
        super().__init__()
        self.embed = nn.Conv1d(cfg.input_channels, cfg.dim, kernel_size=CONV_KERNEL, padding=CONV_KERNEL // 2)
        self.norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.convnext = nn.ModuleList(
            ConvNeXtBlock(cfg.dim, cfg.intermediate_dim, cfg.has_layer_scale) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)  # [B, dim, T]
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


def overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """frames [B, T, W] -> [B, (T - 1) * hop + W]: frame t added at sample t * hop (col2im, as torch.istft)."""
    b, t, w = frames.shape
    out = F.fold(frames.transpose(1, 2), output_size=(1, (t - 1) * hop + w), kernel_size=(1, w), stride=(1, hop))
    return out.reshape(b, -1)


def centered_istft(spec: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor,
                   lens: torch.Tensor | None = None) -> torch.Tensor:
    """torch.istft(spec, n_fft, hop, n_fft, window, center=True) in the same steps (inverse real
    FFT per frame, window, overlap-add, divide by the overlap-added squared window, drop n_fft // 2
    at each end), for a batch whose items may have fewer frames than the batch.

    spec: complex [B, n_fft // 2 + 1, T]; lens: [B] frames per item (None: all T), on spec's device.
    Returns float32 [B, (T - 1) * hop]; item i's first (lens_i - 1) * hop samples equal its solo
    inverse STFT (its frames past lens_i are zeroed and left out of its window envelope), the rest
    are zero. Unlike torch.istft it never reads a value back to the host (torch.istft checks the
    envelope's minimum on the host: a device sync per call); the envelope of a Hann window at a
    quarter hop is bounded away from zero, which `CenteredISTFT` checks once when built.
    """
    b, _, t = spec.shape
    frames = torch.fft.irfft(spec.transpose(1, 2), n=n_fft, dim=-1) * window  # [B, T, n_fft]
    wsq = (window * window).expand(b, t, n_fft)
    if lens is not None:
        keep = (torch.arange(t, device=spec.device)[None, :] < lens[:, None])[..., None]  # [B, T, 1]
        frames, wsq = frames * keep, wsq * keep
    y, env = overlap_add(frames, hop), overlap_add(wsq, hop)
    pad, n_out = n_fft // 2, (t - 1) * hop
    y, env = y[:, pad: pad + n_out], env[:, pad: pad + n_out]
    inside = env > ENVELOPE_FLOOR
    if lens is not None:
        inside = inside & (torch.arange(n_out, device=spec.device)[None, :] < ((lens - 1) * hop)[:, None])
    return torch.where(inside, y / env.clamp_min(ENVELOPE_FLOOR), 0.0)


#: torch.istft refuses a window whose overlap-added square falls below this inside the output.
ENVELOPE_FLOOR = 1e-11


class CenteredISTFT(nn.Module):
    """Complex spectrum [B, n_fft // 2 + 1, T] -> audio [B, (T - 1) * hop] (torch.istft, center=True;
    see `centered_istft`).

    The Hann window is a buffer named `window`, as in the checkpoint (`head.istft.window`).
    """

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft))
        # the envelope inside any output is the steady-state sum of squared shifted windows (and
        # more at the ends): check once that it stays clear of zero for this window and hop
        window = torch.hann_window(n_fft, device="cpu")  # on the CPU even when the module is built on "meta"
        env = overlap_add((window ** 2).expand(1, 2 * n_fft // hop_length + 1, n_fft), hop_length)
        inner = env[0, n_fft // 2: env.shape[1] - n_fft // 2]
        if float(inner.min()) <= ENVELOPE_FLOOR:
            raise ValueError(f"ISTFT with n_fft {n_fft} and hop {hop_length}: the window overlap-add has zeros")

    def forward(self, spec: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        return centered_istft(spec, self.n_fft, self.hop_length, self.window.float(), lens)


class ISTFTHead(nn.Module):
    """Features [B, T, dim] -> audio [B, (T - 1) * hop]: Linear -> exp magnitude (<= 100) and phase -> ISTFT.

    Runs the spectrum and inverse STFT in float32 whatever the weights' dtype.
    """

    def __init__(self, cfg: VocosConfig):
        super().__init__()
        self.out = nn.Linear(cfg.dim, cfg.n_fft + 2)
        self.istft = CenteredISTFT(cfg.n_fft, cfg.hop_length)

    def spectrum(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, dim] -> complex64 [B, n_fft // 2 + 1, T]."""
        log_mag, phase = self.out(x).float().transpose(1, 2).chunk(2, dim=1)
        mag = torch.clip(torch.exp(log_mag), max=MAX_MAGNITUDE)
        return torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.istft(self.spectrum(x))


class Vocos(nn.Module):
    """Mel vocoder: `decode(mel [B, 100, T]) -> audio [B, (T - 1) * 256]` float32 at 24 kHz."""

    def __init__(self, cfg: VocosConfig = VocosConfig()):
        super().__init__()
        self.config = cfg
        self.backbone = VocosBackbone(cfg)
        self.head = ISTFTHead(cfg)

    @property
    def samples_per_frame(self) -> int:
        return self.config.hop_length

    def output_length(self, frames: int) -> int:
        """Audio samples for `frames` mel frames: (T - 1) * hop (centred ISTFT drops n_fft // 2 at each end)."""
        return (frames - 1) * self.config.hop_length

    @torch.inference_mode()
    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel [B, input_channels, T] (T >= 2) -> float32 audio [B, (T - 1) * hop] on the model's device."""
        if mel.dim() != 3 or mel.shape[1] != self.config.input_channels:
            raise ValueError(f"Vocos.decode expects a mel of shape [B, {self.config.input_channels}, T], "
                             f"got {tuple(mel.shape)}")
        if mel.shape[2] < 2:
            raise ValueError(f"Vocos.decode needs at least 2 mel frames, got {mel.shape[2]}")
        param = self.head.out.weight
        return self.head(self.backbone(mel.to(device=param.device, dtype=param.dtype)))

    forward = decode

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> "Vocos":
        """Load `config.yaml` + `pytorch_model.bin` (as published) from `directory`; strict, with clear errors."""
        directory = Path(directory)
        cfg = load_config(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise ValueError(f"Vocos weights not found: {weights} (expected the published {WEIGHTS_FILE})")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise ValueError(f"cannot read Vocos weights {weights}: {exc}") from exc
        model = cls(cfg)
        model.load_checkpoint_state(state, source=str(weights))
        window = model.head.istft.window.float().clone()
        model.to(device=torch.device(device), dtype=dtype)
        model.head.istft.window = window.to(device=torch.device(device))  # the ISTFT runs in float32
        return model.eval()

    def load_checkpoint_state(self, state: dict, source: str = WEIGHTS_FILE) -> None:
        """Copy a published-layout state dict in: feature-extractor buffers ignored, everything else exact."""
        if not isinstance(state, dict):
            raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
        state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
        expected = self.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if "state_dict" in unexpected:
            raise ValueError(f"{source} looks like a training checkpoint (it has 'state_dict'); "
                             f"use the published inference {WEIGHTS_FILE}")
        wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches ({'; '.join(wrong[:4])})")
        if problems:
            raise ValueError(f"{source} does not fit the Vocos model built from {CONFIG_FILE} "
                             f"(dim {self.config.dim}, {self.config.num_layers} layers): " + "; ".join(problems))
        self.load_state_dict(state, strict=True)


def load_config(directory: str | Path) -> VocosConfig:
    """Parse `directory/config.yaml` into a VocosConfig (ValueError when absent or not a mel Vocos)."""
    import yaml

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"Vocos config not found: {path} (expected the published {CONFIG_FILE})")
    with open(path, "r", encoding="utf-8") as f:
        data = yaml.safe_load(f)
    cfg = VocosConfig.from_yaml(data, source=str(path))
    if cfg.input_channels != mel_mod.N_MELS or cfg.sample_rate != mel_mod.SAMPLE_RATE:
        raise ValueError(f"{path}: a {cfg.input_channels}-mel {cfg.sample_rate} Hz Vocos does not fit F5-TTS "
                         f"({mel_mod.N_MELS} mels at {mel_mod.SAMPLE_RATE} Hz)")
    return cfg


# --- demo weights ----------------------------------------------------------------------------------
#: Tiny demo backbone: same keys and head as the real model, ~160 k parameters instead of 13.5 M.
DEMO_CONFIG = VocosConfig(dim=64, intermediate_dim=192, num_layers=2)
_DEMO_LOG_MAG_TOP, _DEMO_LOG_MAG_TILT = 2.0, 4.0  # log-magnitude bias: e^2 at DC falling by e^-4 to 12 kHz
#: Phase weights' std is this * pi / sqrt(dim): small frame-to-frame feature changes then move the
#: phases by radians, so the output does not repeat every hop (a 93.75 Hz buzz) but sounds like noise.
_DEMO_PHASE_GAIN = 16.0


def feature_extractor_buffers(cfg: VocosConfig) -> dict[str, torch.Tensor]:
    """The training feature extractor's buffers as the published file holds them (window, filterbank)."""
    return {
        "feature_extractor.mel_spec.spectrogram.window": torch.hann_window(cfg.n_fft),
        "feature_extractor.mel_spec.mel_scale.fb": mel_mod.mel_filterbank(
            n_freqs=cfg.n_fft // 2 + 1, n_mels=cfg.input_channels, sample_rate=cfg.sample_rate,
            f_max=float(cfg.sample_rate // 2)),
    }


def demo_state_dict(cfg: VocosConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights for `cfg` in the published layout (feature-extractor buffers included).

    Vocos' own initialisation (truncated normal 0.02, zero biases, unit LayerNorms, gamma
    1 / num_layers), except the head: a falling log-magnitude bias and phase weights large enough
    that phases wander from frame to frame, so the output is quiet broadband noise, not clicks.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # module construction draws from the global RNG: leave it as it was
        model = Vocos(cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("window"):
            value = tensor.clone()
        elif name.endswith("gamma"):
            value = torch.full_like(tensor, cfg.layer_scale_init_value or 1.0 / cfg.num_layers)
        elif ".norm." in name or "final_layer_norm" in name:
            value = torch.ones_like(tensor) if name.endswith("weight") else torch.zeros_like(tensor)
        elif name.endswith("bias"):
            value = torch.zeros_like(tensor)
        else:
            value = torch.nn.init.trunc_normal_(torch.empty_like(tensor), std=0.02, generator=gen)
        state[name] = value
    bins = cfg.n_fft // 2 + 1
    bias = state["head.out.bias"]
    bias[:bins] = _DEMO_LOG_MAG_TOP - _DEMO_LOG_MAG_TILT * torch.linspace(0, 1, bins)
    bias[bins:] = (torch.rand(bins, generator=gen) * 2 - 1) * torch.pi
    weight = state["head.out.weight"]
    weight[bins:] = torch.randn(bins, cfg.dim, generator=gen) * (_DEMO_PHASE_GAIN * torch.pi / cfg.dim ** 0.5)
    state = {**feature_extractor_buffers(cfg), **state}  # the published file lists these first
    return {k: v.contiguous() for k, v in state.items()}


def write_demo_vocos(directory: str | Path, seed: int = 0, tiny: bool = True) -> None:
    """Write `config.yaml` + `pytorch_model.bin` with deterministic random weights in the real layout.

    tiny: a small backbone (DEMO_CONFIG); False: the published size (13.5 M parameters, 54 MB).
    Both take 100 mels and use the published head (n_fft 1024, hop 256); the audio is noise.
    """
    import yaml

    cfg = DEMO_CONFIG if tiny else VocosConfig()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_yaml(), sort_keys=False), encoding="utf-8")
    torch.save(demo_state_dict(cfg, seed), directory / WEIGHTS_FILE)
