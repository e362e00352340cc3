"""Parity of tts.f5 (DiT + sampler) against upstream F5-TTS on the same random weights. Not a test.

Run OUTSIDE the project environment (upstream's modules need x_transformers and torchdiffeq),
from the repository root:

    /work/scratch_venv/bin/pip install x_transformers torchdiffeq torch==2.13.0 numpy==1.26.4
    /work/scratch_venv/bin/python tools/parity_f5.py --upstream /work/upstream/SWivid+F5-TTS

For each config (v1 layout, v0 layout with RoPE on one head, v1 with qk RMSNorm) it writes demo
weights with `tts.f5.checkpoint.write_demo_dit`, loads that file strictly into upstream's
`CFM(DiT)` (stripping `ema_model.` and the EMA scalars as upstream's `load_checkpoint` does) and
into ours with `load_dit`, then runs upstream `CFM.sample(..., seed=s)` and our `sample` with
`make_noise(s, ...)` (the same CPU noise) for each item alone (upstream's batch-1 path) and
prints the max abs difference of the mel over each item's frames. It also runs upstream batched
(its own per-item masking) and reports how far that is from its solo runs, for information.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from make_f5_manifest import import_upstream  # noqa: E402
from tts.f5.checkpoint import DEMO_CONFIG, load_dit, write_demo_dit  # noqa: E402
from tts.f5.config import MODEL_CONFIGS, F5Config  # noqa: E402
from tts.f5.sampler import make_noise, min_total_frames, sample  # noqa: E402

#: A small config with enough depth and width to exercise every part.
PARITY_CONFIG = F5Config(dim=128, depth=4, heads=4, dim_head=32, ff_mult=2, text_dim=64, conv_layers=2,
                         text_num_embeds=300)
CONFIGS = {
    "v1": PARITY_CONFIG,
    "v0 (pe_attn_head=1, no text mask padding)": replace(PARITY_CONFIG, text_mask_padding=False, pe_attn_head=1),
    "v1 + qk rms_norm": replace(PARITY_CONFIG, qk_norm="rms_norm"),
}
FULL_NFE = 2  # steps for the full-size comparison (CPU time)
# (reference frames, text tokens, total frames, seed) per item
ITEMS = [(40, 30, 130, 11), (75, 90, 210, 12), (60, 20, 100, 13)]


def upstream_cfm(upstream: Path, cfg: F5Config, weights: Path, attn_mask_enabled: bool):
    from safetensors.torch import load_file

    UDiT, CFM = import_upstream(upstream)
    dit = UDiT(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
               mel_dim=cfg.mel_dim, text_num_embeds=cfg.text_num_embeds, text_dim=cfg.text_dim,
               text_mask_padding=cfg.text_mask_padding, qk_norm=cfg.qk_norm, conv_layers=cfg.conv_layers,
               pe_attn_head=cfg.pe_attn_head, attn_mask_enabled=attn_mask_enabled)
    cfm = CFM(transformer=dit)
    state = {k.replace("ema_model.", ""): v for k, v in load_file(str(weights)).items() if k not in ("initted", "step")}
    cfm.load_state_dict(state, strict=True)
    return cfm.eval()


def inputs(cfg: F5Config, gen: torch.Generator):
    out = []
    for ref, ntext, total, seed in ITEMS:
        mel = torch.randn(ref, cfg.mel_dim, generator=gen)
        text = torch.randint(0, cfg.text_num_embeds, (ntext,), generator=gen)
        assert total >= min_total_frames(ntext, ref)
        out.append((mel, text, ref, total, seed))
    return out


def ours_batch(dit, items, cfg, nfe, cfg_strength, sway):
    b, frames = len(items), max(it[3] for it in items)
    cond = torch.zeros(b, frames, cfg.mel_dim)
    noise = torch.zeros(b, frames, cfg.mel_dim)
    ids = torch.full((b, max(len(it[1]) for it in items)), -1, dtype=torch.long)
    for i, (mel, text, ref, total, seed) in enumerate(items):
        cond[i, :ref], ids[i, : len(text)] = mel, text
        noise[i, :total] = make_noise(seed, total, cfg.mel_dim)
    return sample(dit, cond, ids, torch.tensor([it[2] for it in items]), torch.tensor([it[3] for it in items]),
                  noise, nfe, cfg_strength, sway)


def upstream_solo(cfm, item, nfe, cfg_strength, sway):
    mel, text, ref, total, seed = item
    out, _ = cfm.sample(mel[None], text[None], total, lens=torch.tensor([ref]), steps=nfe,
                        cfg_strength=cfg_strength, sway_sampling_coef=sway, seed=seed)
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upstream", type=Path, required=True)
    ap.add_argument("--nfe", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--sway", type=float, default=-1.0)
    ap.add_argument("--full", nargs="*", default=[], metavar="MODEL",
                    help="also compare full-size random DiTs of these upstream configs (slow: ~1.3 GB each)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CONFIGS.items():
            weights = write_demo_dit(Path(tmp) / name.split()[0], cfg, seed=3)
            ours = load_dit(weights, cfg, "cpu", torch.float32)
            ref_cfm = upstream_cfm(args.upstream, cfg, weights, attn_mask_enabled=False)
            items = inputs(cfg, torch.Generator().manual_seed(5))
            for nfe in args.nfe:
                batched = ours_batch(ours, items, cfg, nfe, args.cfg, args.sway)
                for i, item in enumerate(items):
                    total = item[3]
                    up = upstream_solo(ref_cfm, item, nfe, args.cfg, args.sway)
                    solo = ours_batch(ours, [item], cfg, nfe, args.cfg, args.sway)[0]
                    d_solo = (solo[:total] - up[:total]).abs().max().item()
                    d_batch = (batched[i, :total] - up[:total]).abs().max().item()
                    worst = max(worst, d_solo, d_batch)
                    print(f"{name:45s} nfe {nfe:2d} item {i} (T={total}): ours solo vs upstream {d_solo:.2e}, "
                          f"ours batched vs upstream {d_batch:.2e}, |mel| max {up[:total].abs().max():.2f}")
            # upstream's own batch path (attention masked), for information
            up_masked = upstream_cfm(args.upstream, cfg, weights, attn_mask_enabled=True)
            nfe = args.nfe[0]
            cond = torch.zeros(len(items), max(it[2] for it in items), cfg.mel_dim)
            ids = torch.full((len(items), max(len(it[1]) for it in items)), -1, dtype=torch.long)
            for i, (mel, text, ref, total, seed) in enumerate(items):
                cond[i, :ref], ids[i, : len(text)] = mel, text
            # upstream reseeds with the same seed for every item, so use one seed for all here
            seed = items[0][4]
            same_seed = [(m, t, r, tot, seed) for (m, t, r, tot, _) in items]
            out, _ = up_masked.sample(cond, ids, torch.tensor([it[3] for it in items]),
                                      lens=torch.tensor([it[2] for it in items]), steps=nfe,
                                      cfg_strength=args.cfg, sway_sampling_coef=args.sway, seed=seed)
            for i, item in enumerate(same_seed):
                solo = upstream_solo(ref_cfm, item, nfe, args.cfg, args.sway)
                print(f"{name:45s} nfe {nfe:2d} item {i}: upstream batched (attn mask on) vs upstream solo "
                      f"{(out[i, :item[3]] - solo[:item[3]]).abs().max().item():.2e}")
        for model in args.full:
            cfg = replace(MODEL_CONFIGS[model], text_num_embeds=2545)
            weights = write_demo_dit(Path(tmp) / model, cfg, seed=4)
            ours = load_dit(weights, cfg, "cpu", torch.float32)
            ref_cfm = upstream_cfm(args.upstream, cfg, weights, attn_mask_enabled=False)
            item = inputs(cfg, torch.Generator().manual_seed(6))[0]
            up = upstream_solo(ref_cfm, item, FULL_NFE, args.cfg, args.sway)
            mine = ours_batch(ours, [item], cfg, FULL_NFE, args.cfg, args.sway)[0]
            d = (mine - up[: item[3]]).abs().max().item()
            worst = max(worst, d)
            print(f"{model} full size, nfe {FULL_NFE}, T={item[3]}: ours vs upstream {d:.2e}, "
                  f"|mel| max {up.abs().max():.2f}")
            del ours, ref_cfm
    print(f"worst ours-vs-upstream max abs difference: {worst:.2e}")


if __name__ == "__main__":
    main()
