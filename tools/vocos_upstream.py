"""Tie tts/f5/vocos.py to the upstream Vocos code (run outside CI, where torchaudio is installed).

    python tools/vocos_upstream.py --vocos-src DIR manifest tests/data/vocos_manifest.json
    python tools/vocos_upstream.py --vocos-src DIR parity

DIR holds the upstream `vocos` package (github.com/gemelo-ai/vocos). `manifest` builds the model
of the published `charactr/vocos-mel-24khz` config.yaml with upstream's own `Vocos.from_hparams`
and writes every state-dict key with its shape and dtype: the keys `Vocos.from_pretrained` loads
strictly from `pytorch_model.bin`. `parity` loads the same random full-size weights into the
upstream model and ours and compares `decode` on random mels (CPU, and CUDA when present).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tts.f5 import vocos as ours  # noqa: E402

TOLERANCE = 1e-4


def upstream_model(vocos_src: Path):
    """Upstream Vocos built from the published config (written from our VocosConfig defaults)."""
    import yaml

    sys.path.insert(0, str(vocos_src))
    if "encodec" not in sys.modules:  # imported at module level by vocos; unused by the mel model
        stub = types.ModuleType("encodec")
        stub.EncodecModel = object
        sys.modules["encodec"] = stub
    from vocos.pretrained import Vocos as UpstreamVocos

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(ours.VocosConfig().to_yaml(), sort_keys=False))
        return UpstreamVocos.from_hparams(str(path)).eval()


def write_manifest(vocos_src: Path, out: Path) -> None:
    model = upstream_model(vocos_src)
    state = model.state_dict()
    manifest = {
        "what": "state-dict keys of charactr/vocos-mel-24khz pytorch_model.bin, from upstream Vocos.from_hparams",
        "generated_by": "tools/vocos_upstream.py manifest",
        "config": ours.VocosConfig().to_yaml(),
        "ignored_prefixes": list(ours.IGNORED_PREFIXES),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()},
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out}: {len(state)} tensors, {manifest['num_parameters']} parameters")


def parity(vocos_src: Path) -> int:
    upstream = upstream_model(vocos_src)
    state = ours.demo_state_dict(ours.VocosConfig(), seed=1)
    upstream.load_state_dict(state, strict=True)  # the published-layout dict fits upstream exactly
    mine = ours.Vocos(ours.VocosConfig())
    mine.load_checkpoint_state(state)
    mine.eval()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        upstream.to(device)
        mine.to(device)
        for frames in (2, 17, 300):
            mel = (torch.randn(2, 100, frames, generator=gen) * 2 - 5).to(device)
            a, b = mine.decode(mel), upstream.decode(mel)
            assert a.shape == b.shape == (2, (frames - 1) * 256), (a.shape, b.shape)
            diff = float((a - b).abs().max())
            worst = max(worst, diff)
            peak = float(b.abs().max())
            print(f"  {device} T={frames:<4} out {tuple(a.shape)} max |diff| {diff:.3g} (peak {peak:.3g})")
        if device == "cpu":  # also through upstream's own feature extractor -> decode (copy-synthesis)
            wav = torch.randn(1, 24000, generator=gen) * 0.1
            from tts.f5.mel import log_mel_spectrogram

            diff = float((mine.decode(log_mel_spectrogram(wav)) - upstream(wav)).abs().max())
            worst = max(worst, diff)
            print(f"  cpu copy-synthesis (our mel + decode vs upstream forward) max |diff| {diff:.3g}")
    print(f"worst {worst:.3g}: {'PASS' if worst <= TOLERANCE else 'FAIL'} (tolerance {TOLERANCE})")
    return 0 if worst <= TOLERANCE else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocos-src", type=Path, required=True, help="folder holding the upstream `vocos` package")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("manifest").add_argument("out", type=Path)
    sub.add_parser("parity")
    args = parser.parse_args()
    if args.cmd == "manifest":
        write_manifest(args.vocos_src, args.out)
        return 0
    return parity(args.vocos_src)


if __name__ == "__main__":
    sys.exit(main())
