"""F5-TTS DiT checkpoints: reading the published files, strict loading, tiny demo weights.

Key forms (upstream `infer/utils_infer.py: load_checkpoint`, `model/trainer.py`):
  * published `.safetensors`: the EMA state dict as a flat file, keys `ema_model.transformer.<DiT key>`
    plus the EMA bookkeeping scalars `initted` and `step` (F5TTS_v1_Base: 364 + 2 tensors,
    upstream issue #1292);
  * training `.pt`: a dict with `ema_model_state_dict` (same keys as above) and `model_state_dict`
    (keys `transformer.<DiT key>`), optimizer, scheduler, `update`. Old files also hold
    `mel_spec.mel_stft.*` buffers.
Loading takes the EMA weights when present, strips `ema_model.` then `transformer.`, and drops
the bookkeeping and mel buffers, leaving exactly `DiT.state_dict()` keys.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from tts.f5.config import CONFIG_FILE, F5Config
from tts.f5.dit import DiT, rope_inv_freq

EMA_PREFIX = "ema_model."
TRANSFORMER_PREFIX = "transformer."
#: The key prefix of the published safetensors files (and of `ema_model_state_dict` in `.pt` files).
FILE_PREFIX = EMA_PREFIX + TRANSFORMER_PREFIX
#: EMA / trainer bookkeeping entries that are not weights.
BOOKKEEPING_KEYS = ("initted", "step", "update")
#: Buffers of upstream's old torchaudio mel module, present in early checkpoints.
MEL_PREFIX = "mel_spec."
DEMO_FILE = "model_demo.safetensors"
#: A tiny DiT for demo weights and CPU tests (a few hundred thousand parameters).
DEMO_CONFIG = F5Config(dim=64, depth=2, heads=2, dim_head=32, ff_mult=2, text_dim=32, conv_layers=1)
MAX_LISTED_KEYS = 12  # how many offending keys an error message names


def _read_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"F5 checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pt", ".pth", ".ckpt"):
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors of several kinds
            raise ValueError(f"{path} cannot be read as a weights-only torch checkpoint: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
        for section in ("ema_model_state_dict", "model_state_dict"):
            if isinstance(data.get(section), dict):
                return data[section]
        if data and all(isinstance(v, Tensor) for v in data.values()):
            return data  # a bare state dict
        raise ValueError(f"{path} has neither 'ema_model_state_dict' nor 'model_state_dict' "
                         f"(top-level keys: {sorted(data)[:MAX_LISTED_KEYS]})")
    raise ValueError(f"unsupported F5 checkpoint type {path.suffix!r} ({path}); use .safetensors or .pt")


def to_dit_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint keys -> DiT keys: strip `ema_model.` then `transformer.`; drop bookkeeping and mel buffers."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(EMA_PREFIX):
            key = key[len(EMA_PREFIX):]
        if key in BOOKKEEPING_KEYS or key.startswith(MEL_PREFIX):
            continue
        if key.startswith(TRANSFORMER_PREFIX):
            key = key[len(TRANSFORMER_PREFIX):]
        out[key] = value
    return out


def load_dit_state_dict(path: Path) -> dict[str, Tensor]:
    """The DiT weights of a `.safetensors` or `.pt` checkpoint, keyed as `DiT.state_dict()` (on CPU)."""
    return to_dit_keys(_read_file(Path(path)))


def manifest(model: nn.Module) -> dict[str, list[int]]:
    """Every state-dict entry of a module and its shape (works on the meta device)."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def check_state_dict(state: dict[str, Tensor], expected: dict[str, list[int]], where: str = "") -> None:
    """Raise ValueError naming missing keys, unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: file {list(state[k].shape)} vs model {expected[k]}"
                   for k in set(state) & set(expected) if list(state[k].shape) != expected[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            more = f" (+{len(items) - MAX_LISTED_KEYS} more)" if len(items) > MAX_LISTED_KEYS else ""
            parts.append(f"{len(items)} {label}: {items[:MAX_LISTED_KEYS]}{more}")
    raise ValueError(f"F5 checkpoint {where} does not match the DiT config: " + "; ".join(parts)
                     + ". Check the model name (--f5-model), vocab.txt (its line count sets the text "
                       "embedding rows), or the config.json beside a custom checkpoint.")


def load_dit(path: Path, cfg: F5Config, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> DiT:
    """Build a DiT for `cfg`, load the checkpoint strictly, move it to device/dtype, eval mode, no grads."""
    state = load_dit_state_dict(Path(path))
    with torch.device("meta"):
        model = DiT(cfg)
    check_state_dict(state, manifest(model), str(path))
    inv_freq = state.get("rotary_embed.inv_freq")
    if inv_freq is not None and not torch.allclose(inv_freq.float(), rope_inv_freq(cfg.dim_head), rtol=1e-3):
        raise ValueError(f"{path}: rotary_embed.inv_freq is not the standard RoPE table for dim_head "
                         f"{cfg.dim_head} (base 10000); this DiT computes angles from that formula")
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def _demo_tensor(name: str, shape: list[int], gen: torch.Generator, cfg: F5Config) -> Tensor:
    """Small random values, non-zero everywhere, of a sensible scale for the tensor's role."""
    if name == "rotary_embed.inv_freq":
        return rope_inv_freq(cfg.dim_head)  # a fixed table, the same in every checkpoint
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("norm.weight"):  # LayerNorm / RMSNorm gains around 1
        return 1.0 + 0.1 * noise
    if name.endswith("text_embed.text_embed.weight"):
        return noise
    if name.endswith(".weight") and len(shape) >= 2:  # Linear / Conv1d: keep activations O(1)
        return noise / math.sqrt(math.prod(shape[1:]))
    return 0.05 * noise  # biases, GRN gamma / beta


def write_demo_dit(directory: Path, cfg: F5Config = DEMO_CONFIG, seed: int = 0) -> Path:
    """Write deterministic random DiT weights in the published file layout, plus `config.json`.

    Keys are `ema_model.transformer.<DiT key>` with the EMA `initted` / `step` scalars, as in the
    published safetensors. Returns the path of `model_demo.safetensors`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):  # shapes only; does not touch the global RNG
        shapes = manifest(DiT(cfg))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    tensors = {FILE_PREFIX + name: _demo_tensor(name, shapes[name], gen, cfg).contiguous()
               for name in sorted(shapes)}
    tensors["initted"] = torch.tensor(True)
    tensors["step"] = torch.tensor(0)
    path = directory / DEMO_FILE
    save_file(tensors, str(path), metadata={"format": "pt", "note": "F5-TTS demo weights: random, produce noise"})
    (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path
