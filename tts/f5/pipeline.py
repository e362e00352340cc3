"""F5-TTS inference pipeline: reference preparation, chunk plan, batched synthesis, serving order.

One request = a prompt clip (24 kHz mono), its transcript, a target text and options. The prompt
is prepared as upstream's app does (`reference.prepare_prompt`). The target text is cut into
chunks by a pure function of (text, transcript, prepared prompt length, speed, mode): offline
follows upstream's `infer_process` plan exactly; streaming first cuts a short first clause so it
can answer fast, then applies the same rule to the rest. Chunk i uses seed `seed + i`. Chunks of
any requests are synthesised together in one batch; per-item masks make each item's audio
independent of its batch mates (DESIGN.md tolerance), so a streamed chunk equals the same chunk
text synthesised alone with its seed.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.profiler import record_function

from tts.audio import F5_CROSSFADE_S, F5_SAMPLE_RATE, join_chunks
from tts.devices import bind_thread, resolve
from tts.f5 import mel as mel_mod
from tts.f5 import reference as ref_mod
from tts.f5 import text as text_mod
from tts.f5.checkpoint import load_dit
from tts.f5.config import load_config
from tts.f5.fast import FastSampler, fast_options_from_env, vocode_batch
from tts.f5.sampler import make_noise, sample
from tts.f5.vocos import Vocos

HOP = mel_mod.HOP_LENGTH
#: Upstream's chunk budget: a chunk plus the prompt should stay under ~22 s of speech (prepared
#: prompts are at most 12.05 s, so the budget never reaches zero).
MAX_SPEECH_S = 22.0
#: The first chunk is at most one clause of about this many seconds, so streaming answers fast.
FIRST_CHUNK_S = 2.0
#: Upstream slows chunks under 10 UTF-8 bytes to speed 0.3 so a word or two is not rushed.
SHORT_TEXT_BYTES, SHORT_TEXT_SPEED = 10, 0.3
MAX_PROMPT_S = ref_mod.MAX_PROMPT_S
CROSSFADE_SAMPLES = int(F5_CROSSFADE_S * F5_SAMPLE_RATE)  # 0.15 s * 24000 = 3600
PROMPT_CACHE_SIZE = 64

# Accepted option ranges; outside them a request is refused with a message naming the option.
NFE_RANGE = (1, 128)
SPEED_RANGE = (0.3, 3.0)
CFG_RANGE = (0.0, 10.0)
SWAY_RANGE = (-1.0, 1.0)


@dataclass(frozen=True)
class F5Options:
    """Per-request sampling options (DESIGN.md defaults)."""

    nfe_steps: int = 32  # Euler steps; 16 with EPSS is the fast setting
    cfg_strength: float = 2.0  # classifier-free guidance weight
    sway_coef: float = -1.0  # sway sampling coefficient applied on top of the timestep table
    speed: float = 1.0  # > 1 speaks faster: duration divided by speed
    seed: int | None = None  # None = random; the used seed is returned
    use_prompt_cache: bool = True  # False recomputes the reference mel (cold prompt)

    def validated(self) -> "F5Options":
        def check(name, value, lo, hi):
            if not np.isfinite(value) or not lo <= value <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}; got {value}")
        check("nfe_steps", self.nfe_steps, *NFE_RANGE)
        check("speed", self.speed, *SPEED_RANGE)
        check("cfg_strength", self.cfg_strength, *CFG_RANGE)
        check("sway_coef", self.sway_coef, *SWAY_RANGE)
        if self.seed is not None and not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed must be a non-negative 64-bit integer; got {self.seed}")
        return self


@dataclass
class PreparedReference:
    """A processed prompt clip: what every chunk of a request conditions on."""

    mel: torch.Tensor  # [T_ref, 100] log-mel, T_ref = wav_len // 256 + 1
    wav_len: int  # samples after preparation (silences handled, 50 ms of silence appended)
    rms: float  # RMS before normalisation (output is scaled back by rms / 0.1 when it was quieter)
    clipped: bool  # True if the clip was cut to stay within 12 s
    notes: list[str] = field(default_factory=list)  # what preparation changed (over 0.1 s)

    @property
    def frames(self) -> int:
        """Frames the generated mel is cut at (upstream: samples // hop)."""
        return self.wav_len // HOP

    @property
    def seconds(self) -> float:
        return self.wav_len / F5_SAMPLE_RATE


@dataclass
class ChunkJob:
    """One text chunk of one request, ready to synthesise."""

    text_ids: list[int]
    text: str  # the chunk's target text
    ref: PreparedReference
    total_frames: int  # reference + generated frames
    seed: int
    options: F5Options
    index: int
    count: int


@dataclass
class F5Request:
    """A validated request: its chunk jobs plus what the response info needs."""

    jobs: list[ChunkJob]
    seed: int
    notes: list[str] = field(default_factory=list)
    prompt_cached: bool = False


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def chunk_budget(ref_text: str, ref_seconds: float, speed: float) -> int:
    """Upstream `infer_process`'s `max_chars`: UTF-8 bytes of target text per chunk.

    The prompt's speaking rate (bytes of the transcript as `reference.fix_reference_text` leaves
    it, per second of the prepared prompt) times the seconds left under 22 s, times the speed.
    """
    return int(utf8_len(ref_text) / ref_seconds * (MAX_SPEECH_S - ref_seconds) * speed)


def plan_chunks(ref_text: str, ref_seconds: float, target_text: str, speed: float, streaming: bool = False) -> list[str]:
    """Cut `target_text` into chunks: a pure function of the texts, the prompt length, speed and mode.

    `ref_text` is the transcript after `text.fix_reference_text`, `ref_seconds` the prepared
    prompt's length. Offline: upstream's `chunk_text` with `chunk_budget`, exactly. Streaming: the
    first clause, cut at a word boundary if it exceeds ~2 s of speech at the prompt's speaking rate,
    then the same rule for the rest.
    """
    max_chars = chunk_budget(ref_text, ref_seconds, speed)
    if not streaming:
        return text_mod.split_sentences(target_text, max_chars)
    bytes_per_s = max(utf8_len(ref_text), 1) / max(ref_seconds, 0.1)
    first_budget = max(int(bytes_per_s * FIRST_CHUNK_S * speed), SHORT_TEXT_BYTES)
    clauses = text_mod.split_sentences(target_text.strip(), 0)  # budget 0: one clause per piece
    if not clauses:
        return []
    first, rest = _cut_head(clauses[0], first_budget)
    rest_text = " ".join(p for p in [rest] + clauses[1:] if p) if _is_spaced(target_text) else \
        "".join(p for p in [rest] + clauses[1:] if p)
    chunks = [first] + (text_mod.split_sentences(rest_text, max_chars) if rest_text.strip() else [])
    return [c for c in (c.strip() for c in chunks) if c]


def _is_spaced(text: str) -> bool:
    """Texts written with spaces between words (English) are re-joined with spaces."""
    return " " in text.strip()


def _cut_head(clause: str, budget: int) -> tuple[str, str]:
    """Split a clause into (head within `budget` bytes, rest), at a space when there is one; the clause
    stays whole when the rest would be under SHORT_TEXT_BYTES or have nothing to speak."""
    if utf8_len(clause) <= budget:
        return clause, ""
    head, used = "", 0
    for ch in clause:
        used += utf8_len(ch)
        if used > budget:
            break
        head += ch
    cut = head.rfind(" ")
    if cut > 0:
        head = head[:cut]
    rest = clause[len(head):].strip()
    # a head with nothing to say, or a rest too short to stand alone ("me.", a lone "。"), keeps the
    # clause whole: a fragment that small would be its own chunk, slowed to speed 0.3 or empty
    if not head.strip() or utf8_len(rest) < SHORT_TEXT_BYTES or not text_mod.speakable(rest):
        return clause, ""
    return head.strip(), rest


def chunk_frames(ref: PreparedReference, ref_text: str, chunk_text: str, speed: float, n_ids: int) -> int:
    """Total frames (prompt + generated) for a chunk, from the UTF-8 byte ratio divided by speed."""
    chunk_bytes = utf8_len(chunk_text)
    local_speed = SHORT_TEXT_SPEED if chunk_bytes < SHORT_TEXT_BYTES else speed
    duration = ref.frames + int(ref.frames / max(utf8_len(ref_text), 1) * chunk_bytes / local_speed)
    # upstream CFM.sample: at least the text / prompt length plus one frame, so something is generated
    return max(duration, max(n_ids, ref.mel.shape[0]) + 1)


class F5Pipeline:
    """Loads DiT + Vocos once and synthesises batches of chunk jobs."""

    def __init__(self, checkpoint: Path, vocab: Path, vocos_dir: Path, model_name: str = "F5TTS_v1_Base",
                 device: str = "cpu", dtype: torch.dtype = torch.float32, max_batch: int = 8,
                 runtime: str = "torch", engines_dir: str | Path | None = None):
        """runtime: "torch" (default), or "trtllm" (the DiT and Vocos as TensorRT engines from
        `engines_dir`, see `tts.f5.trt_runner`; "onnx" runs the same wiring on onnxruntime, for CPU
        checks). Everything but those two forwards is the same code in every runtime."""
        self.device, self.dtype, self.max_batch = resolve(device), dtype, max_batch
        bind_thread(self.device)  # the building thread serves too (the execute-at-a-time order)
        self.runtime = runtime
        self.vocab = text_mod.load_vocab(vocab)
        self.config = load_config(model_name, Path(checkpoint).parent, len(self.vocab))
        self.dit = load_dit(Path(checkpoint), self.config, self.device if runtime == "torch" else "cpu", dtype)
        self.vocos = Vocos.from_dir(Path(vocos_dir), device=self.device, dtype=torch.float32)
        if runtime != "torch":
            from tts.f5.trt_runner import built_settings, load_engine_modules

            if engines_dir is None:
                raise ValueError(f"runtime {runtime!r} needs the engines folder (build_engines --out)")
            self.dit, self.vocos = load_engine_modules(runtime, engines_dir, model_name, self.dit, self.vocos,
                                                       self.device)
            # never more chunks per call than the engines' optimisation profile holds
            self.max_batch = min(self.max_batch, built_settings(engines_dir).get("max_batch") or self.max_batch)
        # The CUDA fast path (bucketed CUDA graphs over the same ODE step); STUDIO_F5_FAST=0 turns it off.
        fast = fast_options_from_env(max_batch)
        self.fast = (FastSampler(self.dit, fast)
                     if runtime == "torch" and self.device.type == "cuda" and fast.mode != "off" else None)
        self._cache: OrderedDict[str, PreparedReference] = OrderedDict()
        self._cache_lock = threading.Lock()

    def warmup(self) -> dict:
        """Everything a first request would otherwise pay, at start-up: the text front end's
        dictionaries (rjieba and pypinyin load theirs on the first Chinese text: 266 ms on the CPU
        here, a 151 ms request in a 32-request GPU run), the mel's first STFT on this device, and
        the fast path's compilation and CUDA-graph capture (its stats are returned)."""
        text_mod.text_to_units("\u4eca\u5929\u5929\u6c14\u5f88\u597d, and a few English words.")
        with torch.inference_mode():
            mel_mod.log_mel_spectrogram(torch.zeros(1, F5_SAMPLE_RATE, device=self.device))
        return self.fast.warmup() if self.fast is not None else {}

    # -- requests -------------------------------------------------------------------------------
    def prepare_reference(self, wav: np.ndarray, use_cache: bool = True) -> tuple[PreparedReference, bool]:
        """Check, prepare (upstream's silence handling), RMS-normalise and mel a prompt clip.

        Cached by a hash of the raw samples, so the cache, the duration estimate and the notes
        agree whatever the surface sent."""
        wav = np.ascontiguousarray(wav, dtype=np.float32).reshape(-1)
        key = hashlib.sha1(wav.tobytes()).hexdigest()
        if use_cache:
            with self._cache_lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit, True
        ref_mod.check_reference(wav, F5_SAMPLE_RATE)
        prep = ref_mod.prepare_prompt(wav, F5_SAMPLE_RATE, MAX_PROMPT_S)
        norm_wav, rms = ref_mod.normalize_rms(prep.wav)
        with torch.inference_mode():
            audio = torch.from_numpy(np.ascontiguousarray(norm_wav, dtype=np.float32))[None].to(self.device)
            mel = mel_mod.log_mel_spectrogram(audio)[0].transpose(0, 1).contiguous()  # [T, 100]
        prepared = PreparedReference(mel=mel.float(), wav_len=len(norm_wav), rms=float(rms), clipped=prep.clipped,
                                     notes=list(prep.notes))
        with self._cache_lock:
            self._cache[key] = prepared
            while len(self._cache) > PROMPT_CACHE_SIZE:
                self._cache.popitem(last=False)
        return prepared, False

    def make_request(self, ref_wav: np.ndarray, ref_text: str, target_text: str, options: F5Options,
                     streaming: bool = False) -> F5Request:
        """Validate a request and build its chunk jobs (raises ValueError with a readable message).

        `streaming` picks the chunk plan (see `plan_chunks`)."""
        options = options.validated()
        target_text = text_mod.validate_text(target_text, "target text")
        ref_text = text_mod.validate_text(ref_text, "reference text")
        ref, cached = self.prepare_reference(ref_wav, options.use_prompt_cache)
        chunks = plan_chunks(text_mod.fix_reference_text(ref_text), ref.seconds, target_text, options.speed, streaming)
        ref_text = text_mod.prepare_reference_text(ref_text)
        if not chunks:
            raise ValueError("the target text has nothing to speak")
        seed = int(options.seed) if options.seed is not None else secrets.randbelow(2**31)
        jobs = []
        for i, chunk in enumerate(chunks):
            ids = text_mod.encode(ref_text + chunk, self.vocab)
            frames = chunk_frames(ref, ref_text, chunk, options.speed, len(ids))
            jobs.append(ChunkJob(ids, chunk, ref, frames, seed + i, options, i, len(chunks)))
        return F5Request(jobs, seed, list(ref.notes), cached)

    # -- synthesis ------------------------------------------------------------------------------
    @torch.inference_mode()
    def synthesize(self, jobs: list[ChunkJob]) -> list[np.ndarray]:
        """Synthesise chunk jobs as batches grouped by sampling options; returns 24 kHz float32 audio."""
        out: list[np.ndarray | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            o = job.options
            groups.setdefault((o.nfe_steps, o.cfg_strength, o.sway_coef), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.max_batch):
                part = idx[start:start + self.max_batch]
                for i, wav in zip(part, self._synthesize_batch([jobs[i] for i in part])):
                    out[i] = wav
        return out  # type: ignore[return-value]

    def _synthesize_batch(self, jobs: list[ChunkJob]) -> list[np.ndarray]:
        o = jobs[0].options
        if self.fast is not None:  # host inputs straight into the fast path's packed buffers
            with record_function("f5.inputs"):
                noises = [make_noise(j.seed, j.total_frames, self.config.mel_dim) for j in jobs]  # on the host
            with record_function("f5.sample"):
                mels = self.fast.sample_items([j.text_ids for j in jobs], [j.ref.mel for j in jobs],
                                              [j.total_frames for j in jobs], noises, o.nfe_steps, o.cfg_strength,
                                              o.sway_coef)
        else:
            with record_function("f5.inputs"):
                args = self._batch_inputs(jobs)
            with record_function("f5.sample"):
                mel = sample(self.dit, *args, o.nfe_steps, o.cfg_strength, o.sway_coef)
            mels = [mel[i] for i in range(len(jobs))]
        with record_function("f5.vocode"):
            gens = [m[j.ref.frames: j.total_frames].float().transpose(0, 1) for m, j in zip(mels, jobs)]  # [100, T]
            # Vocos per item on the CPU (exact); batched with per-item masks on CUDA (equal within 1e-4)
            if self.runtime != "torch":  # the engine vocodes the padded batch with per-item lengths
                wavs = self.vocos.decode_items(gens)
            else:
                wavs = (vocode_batch(self.vocos, gens) if self.fast is not None
                        else [self.vocos.decode(g[None])[0] for g in gens])
        with record_function("f5.to_host"):
            waves = []
            for j, wav in zip(jobs, wavs):
                if j.ref.rms < ref_mod.TARGET_RMS:
                    wav = wav * (j.ref.rms / ref_mod.TARGET_RMS)
                waves.append(wav.float().cpu().numpy().astype(np.float32))
        return waves

    def _batch_inputs(self, jobs: list[ChunkJob]) -> tuple:
        """(cond, text_ids, ref_lens, total_lens, noise) for `sample`: tensors on the pipeline's
        device, the two length vectors on the host."""
        dev, n_mels = self.device, self.config.mel_dim
        batch, frames = len(jobs), max(j.total_frames for j in jobs)
        # The ODE state stays float32 whatever the weights' dtype (bf16 noise would be rounded).
        cond = torch.zeros(batch, frames, n_mels, device=dev, dtype=torch.float32)
        noise = torch.zeros(batch, frames, n_mels, device=dev, dtype=torch.float32)
        max_ids = max(len(j.text_ids) for j in jobs)
        text_ids = torch.full((batch, max_ids), -1, dtype=torch.long)
        for i, j in enumerate(jobs):
            cond[i, : j.ref.mel.shape[0]] = j.ref.mel
            noise[i, : j.total_frames] = make_noise(j.seed, j.total_frames, n_mels, dev, torch.float32)
            text_ids[i, : len(j.text_ids)] = torch.tensor(j.text_ids, dtype=torch.long)
        # lengths stay on the host: the fast path plans its packing from them without a device sync
        ref_lens = torch.tensor([j.ref.mel.shape[0] for j in jobs])
        total_lens = torch.tensor([j.total_frames for j in jobs])
        return cond, text_ids.to(dev), ref_lens, total_lens, noise


def chunk_info(req: F5Request, job: ChunkJob, compute_ms: float, demo_weights: bool) -> dict:
    """The DESIGN.md `info` object for one chunk (running totals: the last chunk's are the request's)."""
    return {"sample_rate": F5_SAMPLE_RATE, "seed": req.seed, "demo_weights": demo_weights,
            "compute_ms": round(compute_ms, 3), "chunk_index": job.index, "chunks": job.count,
            "final": job.index == job.count - 1, "overlap_samples": CROSSFADE_SAMPLES if job.index > 0 else 0,
            "prompt_cached": req.prompt_cached, "notes": req.notes,
            "prompt_seconds": round(job.ref.seconds, 4), "chunk_text": job.text}


def synthesize_offline(pipeline: F5Pipeline, request: F5Request) -> tuple[np.ndarray, dict]:
    """All chunks as one batch, joined with the shared cross-fade (for the CLI and tests)."""
    from tts.f5.engine import serve  # the serving order lives there (it imports this module)

    chunks, infos = [], []
    serve(pipeline, [(0, request, False)], lambda k, i, wav, info: (chunks.append(wav), infos.append(info)),
          demo_weights=False)
    return join_chunks(chunks, [info["overlap_samples"] for info in infos]), infos[-1]


def with_options(request: F5Request, **changes) -> F5Request:
    """A copy of a request with changed options on each job (used by tests)."""
    jobs = [replace(j, options=replace(j.options, **changes)) for j in request.jobs]
    return replace(request, jobs=jobs)
