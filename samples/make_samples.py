"""Make the shipped prompt clips, text sets and benchmark workload with espeak-ng + sox.

    python samples/make_samples.py            # writes samples/voices/*.wav|txt, texts_*.txt, bench_workload.jsonl

Everything here is synthesised on this machine from the sentences below (written for this project):
no recording comes from anywhere else. The clips are formant-synthesiser speech, so they sound robotic;
they exist to exercise the pipeline (prompt lengths, transcripts, both languages), not to sound human.

Needs `espeak-ng` and `sox` (Debian: `apt-get install -y espeak-ng sox`). The output is deterministic
for one espeak-ng version; the files are small and committed, so CI never has to run this.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: F5-TTS's rate; Spark (16 kHz) resamples on load, so one rate serves both models.
SAMPLE_RATE = 24000
#: Prompt clips aim at ~3 s of speech (DESIGN.md: benchmark prompts ~3 s; targets ~7 s, which the
#: sentences in TEXTS are written to take at the voice's rate).
PROMPT_SECONDS = 3.1
#: espeak-ng's default rate (words per minute) and the range it speaks intelligibly; Mandarin needs a
#: high setting because espeak-ng spaces its syllables far apart.
START_WPM, MIN_WPM, MAX_WPM = 150, 80, 400
#: Silence kept around the speech (s): prompts that start and end cleanly, as a person would trim them.
PAD_SECONDS = 0.15
#: Peak level after normalisation (dBFS): loud enough for F5's RMS floor, with headroom.
PEAK_DBFS = -3


@dataclass(frozen=True)
class Voice:
    name: str       # file stem under samples/voices/
    language: str   # "en" or "zh"
    espeak: str     # espeak-ng voice (language + variant)
    pitch: int      # espeak-ng pitch 0-99 (50 default): separates the voices audibly
    transcript: str


VOICES = (
    Voice("en_female", "en", "en-us+f3", 60, "The quiet harbour wakes up slowly before sunrise."),
    Voice("en_male", "en", "en-gb+m3", 40, "Please leave the blue folder on the kitchen table."),
    Voice("zh_female", "zh", "cmn+f2", 60, "今天天气很好，我们去公园散步吧。"),
    Voice("zh_male", "zh", "cmn+m1", 40, "这个周末我想在家里读一本书。"),
)

TEXTS = {
    "en": (
        "The library on the corner stays open late on Thursdays, so I usually go there after work to read for an hour.",
        "If the train is on time, we should arrive just before noon and still have the whole afternoon by the lake.",
        "She planted tomatoes, beans and a row of sunflowers, and by August the garden was taller than the fence.",
        "Remember to turn off the oven when the timer rings, and leave the bread on the rack to cool for a while.",
        "Our team finished the report a day early, which gave everyone a chance to check the numbers twice.",
        "The old bridge was painted bright red last spring, and now people stop in the middle to take pictures.",
        "When the wind comes from the west, the little boats stay in the harbour and the fishermen mend their nets.",
        "He practised the piano every evening for a month, and at the concert he played without a single mistake.",
    ),
    "zh": (
        "图书馆每周四晚上开到很晚，所以我下班以后常常去那里看一个小时的书。",
        "如果火车准时到达，我们中午以前就能到，下午还可以在湖边散散步。",
        "她在院子里种了番茄和豆子，还有一排向日葵，到了八月已经比围墙还高了。",
        "定时器响了以后记得关掉烤箱，再把面包放在架子上慢慢凉一会儿。",
        "我们小组提前一天完成了报告，大家都有时间把数字再仔细检查一遍。",
        "那座老桥去年春天刷成了红色，现在很多人走到桥中间停下来拍照。",
        "刮西风的时候，小船都停在港口里，渔民们就坐在岸边修补渔网。",
        "他每天晚上练一个小时钢琴，到了音乐会那天，一个错音都没有弹。",
    ),
}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        sys.exit(f"error: `{tool}` is not installed (Debian: apt-get install -y espeak-ng sox)")
    return path


def wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def speak(text: str, voice: Voice, rate_wpm: int, out: Path, work: Path) -> float:
    """espeak-ng -> sox (trim silence, pad, mono 24 kHz 16-bit, peak-normalise). Returns seconds."""
    raw = work / "raw.wav"
    subprocess.run([need("espeak-ng"), "-v", voice.espeak, "-s", str(rate_wpm), "-p", str(voice.pitch),
                    "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run([need("sox"), str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(out),
                    "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse",
                    "pad", str(PAD_SECONDS), str(PAD_SECONDS), "gain", "-n", str(PEAK_DBFS)],
                   check=True, capture_output=True)
    return wav_seconds(out)


def fit_rate(text: str, voice: Voice, seconds: float, out: Path, work: Path) -> tuple[float, int]:
    """Speak `text` at the rate that makes it last about `seconds` (duration ~ 1 / rate; two refinements)."""
    rate = START_WPM
    got = speak(text, voice, rate, out, work)
    for _ in range(2):
        rate = int(min(MAX_WPM, max(MIN_WPM, round(rate * got / seconds))))
        got = speak(text, voice, rate, out, work)
    return got, rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE, help="samples folder (default: this script's folder)")
    args = p.parse_args(argv)
    out = args.out
    (out / "voices").mkdir(parents=True, exist_ok=True)
    workload = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for voice in VOICES:
            wav = out / "voices" / f"{voice.name}.wav"
            seconds, rate = fit_rate(voice.transcript, voice, PROMPT_SECONDS, wav, work)
            (out / "voices" / f"{voice.name}.txt").write_text(voice.transcript + "\n", encoding="utf-8")
            print(f"voices/{voice.name}.wav  {seconds:.2f} s  ({voice.espeak}, {rate} wpm)")
            for i, text in enumerate(TEXTS[voice.language]):
                # The target's length at this voice's rate, so the workload states real seconds.
                target_s = speak(text, voice, rate, work / "target.wav", work)
                workload.append({
                    "id": f"{voice.name}-{i}", "language": voice.language,
                    "prompt": f"voices/{voice.name}.wav", "reference_text": voice.transcript,
                    "target_text": text, "prompt_seconds": round(seconds, 2),
                    "target_seconds_espeak": round(target_s, 2),
                })
    for lang, texts in TEXTS.items():
        (out / f"texts_{lang}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with open(out / "bench_workload.jsonl", "w", encoding="utf-8") as fh:
        for row in workload:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"texts_en.txt, texts_zh.txt, bench_workload.jsonl ({len(workload)} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
