"""Compare tts/f5/mel.py with torchaudio (upstream's mel), where torchaudio is installed.

Run outside CI (the project never depends on torchaudio):
    python tools/check_mel_torchaudio.py [--vocos-src DIR]

Checks, on CPU and on CUDA when present:
1. `mel_filterbank()` vs `torchaudio.functional.melscale_fbanks(513, 0, 12000, 100, 24000, norm=None, mel_scale="htk")`
   and vs the `fb` buffer of torchaudio's MelSpectrogram built with f_max=None (confirms f_max = sample_rate // 2).
2. `log_mel_spectrogram(wav)` vs F5-TTS's `get_vocos_mel_spectrogram` recipe: torchaudio
   `MelSpectrogram(sample_rate=24000, n_fft=1024, win_length=1024, hop_length=256, n_mels=100, power=1,
   center=True, normalized=False, norm=None)` then `clamp(min=1e-5).log()`.
3. with --vocos-src (a folder holding the upstream `vocos` package): Vocos' own `MelSpectrogramFeatures`.
Prints the largest absolute differences; exits 1 if any exceeds 1e-4 (the project's "same audio" tolerance).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tts.f5 import mel  # noqa: E402

TOLERANCE = 1e-4


def test_signals(device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(3 * 24000 + 77) / 24000
    f0 = 120 + 20 * torch.sin(2 * torch.pi * 0.7 * t)
    phase = 2 * torch.pi * torch.cumsum(f0, 0) / 24000
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 8)) * 0.5 * (1 + torch.sin(2 * torch.pi * 4 * t)) ** 2
    return {
        "white noise 0.1": (0.1 * torch.randn(2, 24000 * 2, generator=gen)).to(device),
        "speech-like": (0.1 * voiced + 0.003 * torch.randn(t.size(0), generator=gen))[None].to(device),
        "quiet 1e-4 noise": (1e-4 * torch.randn(1, 12345, generator=gen)).to(device),
        "full-scale square": torch.sign(torch.sin(2 * torch.pi * 300 * t))[None].to(device),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocos-src", type=Path, help="folder holding the upstream `vocos` package (optional)")
    args = parser.parse_args()
    import torchaudio

    print(f"torch {torch.__version__}, torchaudio {torchaudio.__version__}")
    worst = 0.0

    def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        nonlocal worst
        diff = float((a.double() - b.double()).abs().max())
        worst = max(worst, diff)
        print(f"  {name:<58} max |diff| = {diff:.3g}  {'ok' if diff <= TOLERANCE else 'FAIL'}")

    ta_fb = torchaudio.functional.melscale_fbanks(513, 0.0, 12000.0, 100, 24000, norm=None, mel_scale="htk")
    report("filterbank vs melscale_fbanks", mel.mel_filterbank(), ta_fb)
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=24000, n_fft=1024, win_length=1024, hop_length=256, n_mels=100, power=1,
        center=True, normalized=False, norm=None)
    print(f"  torchaudio MelScale f_max with f_max=None: {transform.mel_scale.f_max}")
    report("filterbank vs MelSpectrogram.mel_scale.fb", mel.mel_filterbank(), transform.mel_scale.fb)
    report("window vs MelSpectrogram.spectrogram.window", torch.hann_window(1024), transform.spectrogram.window)

    features = None
    if args.vocos_src:
        sys.path.insert(0, str(args.vocos_src))
        if "encodec" not in sys.modules:  # vocos imports encodec at module level; the mel path never uses it
            stub = types.ModuleType("encodec")
            stub.EncodecModel = object
            sys.modules["encodec"] = stub
        from vocos.feature_extractors import MelSpectrogramFeatures

        features = MelSpectrogramFeatures(sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, padding="center")

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"device {device}:")
        ref = transform.to(device)
        for name, wav in test_signals(device).items():
            ours = mel.log_mel_spectrogram(wav)
            theirs = ref(wav).clamp(min=1e-5).log()
            assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
            report(f"log-mel, {name} {tuple(wav.shape)} vs F5 recipe", ours, theirs)
            if features is not None:
                report(f"log-mel, {name} vs vocos MelSpectrogramFeatures", ours, features.to(device)(wav))
    print(f"worst {worst:.3g}: {'PASS' if worst <= TOLERANCE else 'FAIL'} (tolerance {TOLERANCE})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
