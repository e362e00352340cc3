"""Deterministic demo weights for every family, written in exactly the real layout.

They are tiny random models (fixed seeds): they run through exactly the same loading and
inference code as the published checkpoints, and produce noise. Every surface says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEMO_F5_NAME = "F5TTS_Demo"  # same name as studio.weights.DEMO_F5_NAME
#: v2: the Spark speaker encoder at upstream's widths, and the objective-check models.
DEMO_MARKER = ".complete-v2"

#: Common Chinese characters whose pinyin syllables the demo vocabulary carries, so Chinese text
#: runs through the same units as with the real vocab.txt (unknown units map to id 0 anyway).
_DEMO_HANZI = ("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可"
               "她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三"
               "已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问"
               "力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代"
               "军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死"
               "常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直"
               "服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联"
               "言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派"
               "满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首"
               "单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坏兴切营推吗敬仰乙真这就对人万")
_PUNCT = "，。！？；：、“”‘’（）《》—…"


def demo_vocab() -> list[str]:
    """id 0 is a space (as in the published vocab.txt), then ASCII, CJK punctuation, pinyin syllables."""
    from pypinyin import Style, lazy_pinyin

    units = [" "] + [chr(c) for c in range(33, 127)] + list(_PUNCT)
    syllables = sorted(set(lazy_pinyin(_DEMO_HANZI, style=Style.TONE3, tone_sandhi=True)))
    seen = set(units)
    for s in syllables:
        if s not in seen:
            units.append(s)
            seen.add(s)
    return units


def write_f5(root: Path) -> list[str]:
    from tts.f5.checkpoint import DEMO_CONFIG, write_demo_dit
    from tts.f5.vocos import write_demo_vocos

    model_dir = root / DEMO_F5_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = demo_vocab()
    # Each unit on its own line; only the newline separates them (id 0 is the space line).
    (model_dir / "vocab.txt").write_text("".join(u + "\n" for u in vocab), encoding="utf-8")
    from dataclasses import replace

    write_demo_dit(model_dir, replace(DEMO_CONFIG, text_num_embeds=len(vocab)), seed=0)
    write_demo_vocos(root / "vocos-mel-24khz", seed=0)
    return [f"F5 demo weights: {model_dir} and {root / 'vocos-mel-24khz'}"]


def write_spark(root: Path) -> list[str]:
    try:
        from tts.spark.demo import write_demo_checkpoint
    except ImportError as exc:
        return [f"Spark demo weights skipped: {exc}"]
    write_demo_checkpoint(root / "Spark-TTS-0.5B", seed=0)
    return [f"Spark demo weights: {root / 'Spark-TTS-0.5B'}"]


def write_check_models(root: Path) -> list[str]:
    """Tiny Whisper and WavLM x-vector models for transcript fill and objective checks."""
    from tts.check_models_demo import WAVLM_DIR, WHISPER_DIR, write_wavlm, write_whisper

    write_whisper(root / WHISPER_DIR, "demo", seed=0)
    write_wavlm(root / WAVLM_DIR, "demo", seed=0)
    return [f"ASR demo weights: {root / WHISPER_DIR}", f"speaker-similarity demo weights: {root / WAVLM_DIR}"]


def write_all(root: Path) -> list[str]:
    """Write every family's demo weights into `root` (atomically: a temp folder renamed into place)."""
    root = Path(root).expanduser()
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = write_f5(tmp) + write_spark(tmp) + write_check_models(tmp)
    (tmp / DEMO_MARKER).write_text("\n".join(lines) + "\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return [line.replace(str(tmp), str(root)) for line in lines]
