"""The studio page (Gradio Blocks): Clone, Voice creation, Voices, History, Script, Batch, Listening test and Server tabs.

`build_demo(runtime)` lays the page out and wires plain handler functions to one `StudioRuntime`.
Generated audio plays through the page's own Web Audio player (`studio/static/player.js`), fed by
the streaming endpoint in `studio/ui_stream.py`; `launch_kwargs(runtime)` gives `launch()` the
routes and file permissions the page needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from studio.api import api_routes
from studio.limits import ClientSlots, LimitError, current_limits, login_required
from studio.metrics import metrics_routes
from studio.ui_files import page_copy
from studio.ui_generate import (GENDERS, LEVELS, InputProblem, clone_request, design_request, f5_params,
                                load_prompt, read_text_file, run_generation, spark_params)
from studio.ui_qa import qa_tabs, rater_routes
from studio.ui_script import script_tab
from studio.ui_runtime import FAMILIES, NotReady, StudioRuntime
from studio.ui_views import (HISTORY_HEADERS, STATS_HEADERS, banner_html, history_rows, metrics_html,
                             model_note_html, server_md, stats_rows)
from studio.slots import GENERATE_CONCURRENCY as SLOTS_CONCURRENCY
from studio.voices import VOICE_SAMPLE_RATE, VoiceError

STATIC = Path(__file__).resolve().parent / "static"
TITLE = "Voice Studio"
#: Status polling (s): quick while the server starts, relaxed once it is ready.
POLL_STARTING_S, POLL_READY_S = 1.0, 5.0


#: Generations at once (env STUDIO_CONCURRENCY), page and HTTP API together (studio/slots.py); further
#: page requests wait in Gradio's queue.
GENERATE_CONCURRENCY = SLOTS_CONCURRENCY
#: Everything else (voices, history, status) is light; this many run at once per event.
LIGHT_CONCURRENCY = 16
MAX_QUEUE = 256
HISTORY_ROWS = 200
HISTORY_WIDTHS = ["150px", "110px", "85px", "80px", "240px", "80px", "80px", "70px", "70px", "80px", "110px",
                  "70px", "210px"]
LOG_LINES = 200
FORMATS = ("wav", "flac", "mp3")
CONSENT = ("**Consent:** clone only voices you have the right to use: your own, or a speaker who agreed. "
           "Do not use cloned speech to deceive or impersonate.")
LANGUAGES = ("**Languages:** English and Chinese (the models' training languages). Other scripts are accepted "
             "but will sound wrong.")
REF_TEXT_INFO = ("F5-TTS needs it: left empty, it is filled in by speech recognition when the clip is uploaded "
                 "(edit it if it is wrong). Spark-TTS can clone from the audio alone.")
REF_TEXT_LABEL = "Reference text: what the prompt clip says"
CHECKS_LABEL = "Objective checks"
#: Prompts are read at 16 kHz for transcription (the `asr` model's rate).
TRANSCRIBE_RATE = 16000
CHECKS_INFO = ("After generating: word/character error rate of the output read back by speech recognition, "
               "and speaker similarity to the prompt.")
DEFAULTS = {"nfe": 32, "cfg": 2.0, "sway": -1.0, "speed": 1.0, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
            "max_new_tokens": 3000}


def page_js() -> str:
    """The load-time script: the stylesheet and the player (a JS function body for `demo.load`)."""
    css = (STATIC / "studio.css").read_text("utf-8")
    player = (STATIC / "player.js").read_text("utf-8")
    return ("() => {\n  if (!document.getElementById('studio-css')) {\n"
            "    const st = document.createElement('style'); st.id = 'studio-css';\n"
            f"    st.textContent = {css!r};\n    document.head.appendChild(st);\n  }}\n{player}\n}}")


def player_html(key: str) -> str:
    return (f'<div class="studio-player" id="studio-player-{key}">'
            f'<div class="studio-player-title">Live player</div>'
            f'<div class="studio-player-status" id="studio-player-{key}-status" data-state="idle">'
            "Generated audio plays here as soon as its first chunk arrives.</div>"
            f'<div class="studio-player-meter"><div class="studio-player-bar" id="studio-player-{key}-bar"></div>'
            "</div></div>")


def begin_js(key: str, job_index: int) -> str:
    return (f"(...args) => window.studioPlayer ? window.studioPlayer.begin('{key}', args, {job_index}) : args")


def fill_js(key: str) -> str:
    return f"() => {{ if (window.studioPlayer) window.studioPlayer.fill('{key}'); }}"


def stop_js(key: str) -> str:
    return f"(job) => [window.studioPlayer ? window.studioPlayer.stop('{key}') : '']"


@dataclass
class OutputPanel:
    player: gr.HTML
    audio: gr.Audio
    metrics: gr.HTML
    picture: gr.Image
    fmt: gr.Radio
    download: gr.DownloadButton
    record: gr.State
    seed: gr.State
    figures: gr.JSON  # hidden: the metrics as data, for gradio_client callers of /clone and /create_voice

    @property
    def outputs(self) -> list:
        """What a generation returns at once; the picture follows in a second step (it takes ~0.3 s)."""
        return [self.audio, self.metrics, self.download, self.record, self.seed, self.figures]


def output_panel(key: str) -> OutputPanel:
    player = gr.HTML(player_html(key), elem_id=f"studio-player-box-{key}")
    audio = gr.Audio(label="Result (replay)", type="filepath", interactive=False, autoplay=False,
                     elem_id=f"{key}-result")
    metrics = gr.HTML(elem_id=f"{key}-metrics")
    picture = gr.Image(label="Waveform and spectrogram", type="filepath", interactive=False, height=280,
                       elem_id=f"{key}-picture")
    with gr.Row():
        fmt = gr.Radio(list(FORMATS), value="wav", label="Download as", elem_id=f"{key}-format", scale=2)
        download = gr.DownloadButton("Download", visible=False, elem_id=f"{key}-download", scale=1)
    figures = gr.JSON(label="Metrics (JSON)", visible=False, elem_id=f"{key}-figures")
    return OutputPanel(player, audio, metrics, picture, fmt, download, gr.State(None), gr.State(None), figures)


# --- handlers: plain functions over the runtime ---------------------------------------------------
def client_key(request: gr.Request | None) -> str:
    """Who a page request comes from, for the per-client limit: the signed-in user, else the address."""
    if request is None:
        return "local"
    user = getattr(request, "username", None)
    if user:
        return f"user:{user}"
    client = getattr(request, "client", None)
    return f"address:{getattr(client, 'host', None) or 'unknown'}"


def user_error(message: str, title: str = "Cannot do that") -> gr.Error:
    """A message for the person at the page (no traceback in the server log: nothing is broken)."""
    return gr.Error(message, title=title, print_exception=False)


class Handlers:
    """Every event handler of the page: plain functions of their inputs over one StudioRuntime.
    Problems the user can fix become `gr.Error` messages; nothing here holds per-user state."""

    def __init__(self, rt: StudioRuntime, autostart: bool):
        self.rt = rt
        self.autostart = autostart
        self.demo: gr.Blocks | None = None
        self.client_slots = ClientSlots()
        #: prompt transcripts filled by speech recognition, by the clip's sha1: (text, demo weights)
        self.transcripts: dict[str, tuple[str, bool]] = {}

    # status -------------------------------------------------------------------------------------
    def on_load(self):
        if self.autostart and not self.rt.started:
            from studio.ui_runtime import RuntimeOptions

            self.rt.start(RuntimeOptions.from_env())
        self._attach_to_launched_app()
        return (*self.tick("f5"), *self.voice_views(), *self.history_view(), storage_note_md(self.rt))

    def _attach_to_launched_app(self) -> None:
        """When something other than `app.main()` launched the page (Gradio's reload mode swaps in a
        re-executed `demo`), give the running app the data folders and the player's routes. Both are
        looked up per request, so adding them late takes effect. Idempotent and cheap."""
        from studio.ui_stream import ROUTE_PREFIX

        demo = self.demo
        if demo is None:
            return
        for path in self.rt.allowed_paths():
            if path not in demo.allowed_paths:
                demo.allowed_paths.append(path)
        app = getattr(demo, "app", None)
        if app is not None and not any(getattr(r, "path", "").startswith(ROUTE_PREFIX) for r in app.router.routes):
            app.router.routes[0:0] = (self.rt.jobs.routes() + rater_routes(self.rt) + api_routes(self.rt)
                                      + metrics_routes(self.rt) + private_call_routes(demo))

    def tick(self, model: str):
        st = self.rt.status()
        interval = POLL_READY_S if st["state"] in ("ready", "failed") else POLL_STARTING_S
        return (banner_html(st), model_note_html(st, model if model in FAMILIES else "f5"),
                model_note_html(st, "spark"), gr.Timer(value=interval))

    def model_changed(self, model: str):
        st = self.rt.status()
        return (model_note_html(st, model), gr.Group(visible=model == "f5"), gr.Group(visible=model == "spark"))

    # generation ---------------------------------------------------------------------------------
    def _run(self, job_id: str, build, fmt: str, request: gr.Request | None = None):
        job = self.rt.jobs.open(job_id)
        try:
            if job.cancel.is_set():
                job.finish("cancelled", "stopped before it started")
                gr.Info("Stopped before the generation started.")
                return (None, metrics_html({}, seed=None, demo=None, mode="offline", status="cancelled"),
                        gr.DownloadButton(visible=False), None, None, {"status": "cancelled"})
            req = build()
            for w in req.warnings:
                gr.Warning(w)
            # at most STUDIO_MAX_CLIENT_REQUESTS at once per visitor (user name with --auth, else address)
            with self.client_slots.hold(client_key(request)):
                outcome = run_generation(self.rt, job, req)
        except (InputProblem, NotReady, LimitError) as exc:
            job.finish("error", str(exc))
            raise user_error(str(exc), "Cannot generate") from None
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - SynthesisError and the unexpected: the user sees why
            from studio.client import SynthesisError

            job.finish("error", str(exc))
            if isinstance(exc, SynthesisError):
                raise user_error(f"The server could not generate this: {exc}", title="Generation failed") from None
            raise gr.Error(f"Generation failed unexpectedly ({type(exc).__name__}: {exc}). See the Server tab.",
                           title="Generation failed") from exc
        rec = outcome.record
        if outcome.status == "cancelled":
            gr.Info("Stopped. The audio that arrived before the stop is shown.")
        audio_path = self.export(rec, "wav") if rec.get("audio") else None
        seed = rec.get("seed")
        html = metrics_html(outcome.metrics, seed=seed, demo=rec.get("demo_weights"), mode=rec["mode"],
                            status=outcome.status, job=job.id, notes=(rec.get("info") or {}).get("notes"))
        figures = {"status": outcome.status, "id": rec["id"], "model": rec["model"], "mode": rec["mode"],
                   "seed": seed, "demo_weights": rec.get("demo_weights"), "sample_rate": outcome.sample_rate,
                   "metrics": outcome.metrics, "notes": (rec.get("info") or {}).get("notes") or []}
        return (audio_path, html, self.download_button(rec, fmt), rec["id"], seed, figures)

    def picture(self, record_id):
        """Waveform + spectrogram of a history record's audio (drawn once, kept under history/plots/)."""
        import soundfile as sf

        from studio.ui_plots import waveform_png

        if not record_id:
            return None
        try:
            rec = self.rt.history.get(record_id)
        except KeyError:
            return None
        src = self.rt.history.file(rec.get("audio"))
        if src is None:
            return None
        out = self.rt.history.root / "plots" / f"{rec['id']}.png"
        if not out.is_file():
            wav, sr = sf.read(src, dtype="float32")
            waveform_png(wav, sr, out)
        return page_copy(out)

    def clone(self, ref_audio, ref_text, text, model, mode, nfe, cfg, sway, speed, temperature, top_k, top_p,
              max_new_tokens, seed, fmt, voice_key, checks=True, job_id="", request: gr.Request = None):
        def build():
            params = (f5_params(nfe, cfg, sway, speed, seed) if model == "f5"
                      else spark_params(temperature, top_k, top_p, max_new_tokens, seed))
            voice = None
            if voice_key:
                try:
                    voice = self.rt.voices.get(voice_key).label
                except VoiceError:
                    voice = None
            return clone_request(model=model, mode=mode, ref_audio_path=ref_audio, ref_text=ref_text, text=text,
                                 params=params, voice=voice, checks=bool(checks))
        return self._run(job_id, build, fmt, request)

    def design(self, text, gender, pitch, speed_level, mode, temperature, top_k, top_p, max_new_tokens, seed, fmt,
               checks=True, job_id="", request: gr.Request = None):
        def build():
            return design_request(mode=mode, text=text, gender=gender, pitch=pitch, speed=speed_level,
                                  params=spark_params(temperature, top_k, top_p, max_new_tokens, seed),
                                  checks=bool(checks))
        return self._run(job_id, build, fmt, request)

    def stop(self, job_id: str):
        self.rt.jobs.cancel(job_id)

    def load_text(self, path):
        try:
            return read_text_file(path)
        except InputProblem as exc:
            raise user_error(str(exc), title="Cannot read the file") from None

    # downloads ----------------------------------------------------------------------------------
    def export(self, rec: dict, fmt: str) -> str | None:
        """The record's audio as 16-bit `fmt` under history/exports/ (made once, atomically)."""
        import soundfile as sf

        from studio.audio_io import save_audio

        src = self.rt.history.file(rec.get("audio"))
        if src is None:
            return None
        out = self.rt.history.root / "exports" / f"voice-studio-{rec['id']}.{fmt}"
        if not out.is_file():
            wav, sr = sf.read(src, dtype="float32")
            tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
            try:
                save_audio(tmp, wav, sr)
            except ValueError as exc:
                raise user_error(str(exc), title="Cannot export") from None
            os.replace(tmp, out)
        return page_copy(out)

    def download_button(self, rec: dict, fmt: str):
        if fmt not in FORMATS:
            fmt = "wav"
        path = self.export(rec, fmt) if rec and rec.get("audio") else None
        return gr.DownloadButton(f"Download {fmt.upper()}", value=path, visible=path is not None)

    def reformat(self, record_id, fmt):
        if not record_id:
            return gr.DownloadButton(visible=False)
        try:
            rec = self.rt.history.get(record_id)
        except KeyError:
            return gr.DownloadButton(visible=False)
        return self.download_button(rec, fmt)

    # voices -------------------------------------------------------------------------------------
    def voice_choices(self) -> list[tuple[str, str]]:
        return [(v.label, v.key) for v in self.rt.voices.list()]

    def voice_views(self, selected: str | None = None):
        voices = self.rt.voices.list()
        rows = [[v.name, "sample (read-only)" if v.read_only else "saved", v.seconds, v.transcript,
                 (v.created or "").replace("T", " ").rstrip("Z")] for v in voices]
        choices = [(v.label, v.key) for v in voices]
        keys = {k for _, k in choices}
        return (rows, gr.Dropdown(choices=choices, value=selected if selected in keys else None),
                gr.Dropdown(choices=choices))

    # transcript fill ----------------------------------------------------------------------------
    def transcribe_prompt(self, ref_audio, model="f5", ref_text="", only_if_empty=False):
        """The prompt clip's transcript from the `asr` model: (text, a note for under the field).

        On upload or recording (`only_if_empty`): only for F5 with an empty field, and quietly ("", "")
        when no speech recognition is served; the page then puts the text in the field only if the
        person has not typed one meanwhile. Transcripts are cached per clip (by its bytes). A transcript
        from the demo model is said to be noise in the note."""
        import hashlib

        from studio.objective import DEMO_TRANSCRIPT_NOTE, fill_transcript

        if only_if_empty and (model != "f5" or (ref_text or "").strip() or not ref_audio):
            return "", ""
        if not ref_audio:
            raise user_error("Upload or record a prompt clip first.", title="Nothing to transcribe")
        key = hashlib.sha1(Path(ref_audio).read_bytes()).hexdigest()
        hit = self.transcripts.get(key)
        if hit is None:
            try:
                wav = load_prompt(ref_audio, TRANSCRIBE_RATE)
                text, info, _ = fill_transcript(self.rt.client(), wav, TRANSCRIBE_RATE)
            except (InputProblem, ValueError, NotReady) as exc:
                if only_if_empty:
                    return "", ""
                raise user_error(str(exc), title="Cannot transcribe") from None
            hit = self.transcripts[key] = (text, bool(info.get("demo_weights")))
        text, demo = hit
        note = (f"Transcript {DEMO_TRANSCRIPT_NOTE}. Replace it with what the clip really says." if demo else
                "Transcript filled in by speech recognition: check it against the clip.")
        return text, f'<p class="studio-ref-note" data-demo="{str(demo).lower()}">{note}</p>'

    def pick_voice(self, key):
        """Clone tab's library picker: the clip and its transcript into the inputs."""
        if not key:
            return gr.Audio(), gr.Textbox()
        try:
            v = self.rt.voices.get(key)
        except VoiceError as exc:
            raise user_error(str(exc)) from None
        return page_copy(v.audio_path), v.transcript

    def show_voice(self, key):
        if not key:
            return None, "", ""
        try:
            v = self.rt.voices.get(key)
        except VoiceError as exc:
            raise user_error(str(exc)) from None
        return page_copy(v.audio_path), v.transcript, v.name if not v.read_only else ""

    def save_voice(self, name, audio_path, transcript):
        from studio.audio_io import AudioInputError, load_audio

        if not audio_path:
            raise user_error("Upload or record the clip to save (or copy the Clone tab's prompt).", title="No clip")
        try:
            sanitized = self.rt.voices.save(name, load_audio(audio_path, VOICE_SAMPLE_RATE), VOICE_SAMPLE_RATE,
                                            transcript or "")
        except (VoiceError, AudioInputError) as exc:
            raise user_error(str(exc), title="Cannot save the voice") from None
        if sanitized.name != (name or "").strip():
            gr.Info(f"Saved as {sanitized.name!r} (names keep letters, digits and - _ . ( ) ').")
        else:
            gr.Info(f"Saved voice {sanitized.name!r}.")
        return self.voice_views(sanitized.key)

    def rename_voice(self, key, new_name):
        if not key:
            raise user_error("Pick a saved voice to rename.")
        try:
            v = self.rt.voices.rename(key, new_name)
        except VoiceError as exc:
            raise user_error(str(exc), title="Cannot rename") from None
        gr.Info(f"Renamed to {v.name!r}.")
        return self.voice_views(v.key)

    def delete_voice(self, key):
        if not key:
            raise user_error("Pick a saved voice to delete.")
        try:
            where = self.rt.voices.delete(key)
        except VoiceError as exc:
            raise user_error(str(exc), title="Cannot delete") from None
        gr.Info(f"Deleted. A copy is kept in {where.parent} in case you need it back.")
        return self.voice_views(None)

    def use_voice(self, key):
        if not key:
            raise user_error("Pick a voice to use.")
        try:
            v = self.rt.voices.get(key)
        except VoiceError as exc:
            raise user_error(str(exc)) from None
        return (page_copy(v.audio_path), v.transcript, gr.Dropdown(choices=self.voice_choices(), value=v.key),
                gr.Tabs(selected="clone"))

    # history ------------------------------------------------------------------------------------
    def history_view(self):
        from studio.ui_plots import history_png

        records = self.rt.history.records(limit=HISTORY_ROWS)
        plot = history_png(records, self.rt.history.root / "plots" / "recent.png")
        return page_copy(plot), history_rows(records), [r["id"] for r in records]

    def history_select(self, ids, fmt, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if ids is None or row is None or not 0 <= row < len(ids):
            return None, None, gr.DownloadButton(visible=False), None
        try:
            rec = self.rt.history.get(ids[row])
        except KeyError:
            raise user_error("That generation is no longer in the history.") from None
        audio = self.export(rec, "wav") if rec.get("audio") else None
        detail = {k: v for k, v in rec.items() if k != "info"}
        detail["server_info"] = rec.get("info")
        return audio, detail, self.download_button(rec, fmt), rec["id"]

    # server -------------------------------------------------------------------------------------
    def server_view(self):
        st = self.rt.status()
        rows, note = [], ""
        if st["state"] == "ready":
            try:
                rows = stats_rows(self.rt.client().statistics())
            except Exception as exc:  # noqa: BLE001 - show why instead of failing the tab
                note = f"\n\nStatistics unavailable: {exc}"
        log = "\n".join(reversed(self.rt.log_tail(LOG_LINES))) or (
            "(an external server's log is not visible from here)" if st["external"] else "(no log yet)")
        return server_md(st) + note, rows, log


# --- the page -------------------------------------------------------------------------------------
def build_demo(rt: StudioRuntime, *, autostart: bool = True) -> gr.Blocks:
    """The studio page over `rt`. With `autostart`, the first page load starts a runtime nobody started
    (for `gradio app.py`); `python app.py` starts it before launching."""
    h = Handlers(rt, autostart)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nClone a voice from a short prompt clip with **F5-TTS** or **Spark-TTS**, served by "
                    "NVIDIA Triton. Every generation shows its latency, first-chunk latency and real-time factor.")
        banner = gr.HTML(banner_html(rt.status()), elem_id="studio-banner")
        storage = gr.Markdown(storage_note_md(rt), elem_id="studio-storage-note")
        timer = gr.Timer(POLL_STARTING_S)
        with gr.Tabs(selected="clone", elem_id="studio-tabs") as tabs:
            # ---- Clone --------------------------------------------------------------------------
            with gr.Tab("Clone", id="clone", elem_id="tab-clone"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        gr.Markdown(CONSENT, elem_id="consent")
                        voice_pick = gr.Dropdown(choices=h.voice_choices(), value=None, label="Voice library",
                                                 info="Pick a saved or sample voice, or upload / record below.",
                                                 elem_id="clone-voice")
                        ref_audio = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                             label="Prompt clip (3-12 s of clear speech)", elem_id="clone-ref-audio")
                        ref_text = gr.Textbox(label=REF_TEXT_LABEL, lines=2,
                                              info=REF_TEXT_INFO, elem_id="clone-ref-text")
                        ref_note = gr.HTML("", elem_id="clone-ref-note")
                        asr_heard = gr.Textbox(visible=False, elem_id="clone-asr-heard")
                        transcribe = gr.Button("Transcribe the prompt clip", size="sm", elem_id="clone-transcribe")
                        text = gr.Textbox(label="Text to speak", lines=6, max_lines=20,
                                          placeholder="Type or paste the text; long text is split into sentences.",
                                          elem_id="clone-text")
                        text_file = gr.File(label="...or load a .txt file", file_types=[".txt"], height=120,
                                            elem_id="clone-text-file")
                        gr.Markdown(LANGUAGES)
                    with gr.Column(scale=1):
                        model = gr.Radio([(v[0], k) for k, v in FAMILIES.items()], value="f5", label="Model",
                                         elem_id="clone-model")
                        model_note = gr.HTML(model_note_html(rt.status(), "f5"), elem_id="clone-model-note")
                        mode = gr.Radio([("Streaming", "streaming"), ("Offline", "offline")], value="streaming",
                                        label="Mode", info="Streaming starts playing after the first chunk.",
                                        elem_id="clone-mode")
                        checks = gr.Checkbox(value=True, label=CHECKS_LABEL, info=CHECKS_INFO, elem_id="clone-checks")
                        with gr.Accordion("Advanced", open=False, elem_id="clone-advanced"):
                            with gr.Group(visible=True) as f5_group:
                                nfe = gr.Slider(4, 64, value=DEFAULTS["nfe"], step=1, label="NFE steps",
                                                info="32: best quality; 16: fast.", elem_id="clone-nfe")
                                cfg = gr.Slider(0, 5, value=DEFAULTS["cfg"], step=0.1, label="CFG strength")
                                sway = gr.Slider(-1, 1, value=DEFAULTS["sway"], step=0.1, label="Sway sampling")
                                speed = gr.Slider(0.5, 2.0, value=DEFAULTS["speed"], step=0.05, label="Speed",
                                                  info="Above 1 speaks faster.")
                            with gr.Group(visible=False) as spark_group:
                                temperature = gr.Slider(0.1, 1.5, value=DEFAULTS["temperature"], step=0.05,
                                                        label="Temperature")
                                top_k = gr.Slider(1, 200, value=DEFAULTS["top_k"], step=1, label="Top-k",
                                                  info="1 = greedy.")
                                top_p = gr.Slider(0.05, 1.0, value=DEFAULTS["top_p"], step=0.01, label="Top-p")
                                max_tokens = gr.Slider(50, 3000, value=DEFAULTS["max_new_tokens"], step=50,
                                                       label="Max new tokens (50 per second of speech)")
                            with gr.Row():
                                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)",
                                                 elem_id="clone-seed", scale=3)
                                reuse_seed = gr.Button("Use last seed", size="sm", scale=1)
                        with gr.Row():
                            gen = gr.Button("Generate", variant="primary", elem_id="clone-generate")
                            stop = gr.Button("Stop", variant="stop", elem_id="clone-stop")
                        out = output_panel("clone")
                        job = gr.Textbox(visible=False, elem_id="clone-job")
            # ---- Voice creation -----------------------------------------------------------------
            with gr.Tab("Voice creation (Spark)", id="design", elem_id="tab-design"):
                gr.Markdown("Make a new voice without a prompt clip: Spark-TTS picks a speaker from gender, pitch "
                            "and speaking rate. " + LANGUAGES)
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        d_text = gr.Textbox(label="Text to speak", lines=5, elem_id="design-text")
                        d_gender = gr.Radio(list(GENDERS), value="female", label="Gender", elem_id="design-gender")
                        d_pitch = gr.Radio(list(LEVELS), value="moderate", label="Pitch", elem_id="design-pitch")
                        d_speed = gr.Radio(list(LEVELS), value="moderate", label="Speed", elem_id="design-speed")
                        d_mode = gr.Radio([("Streaming", "streaming"), ("Offline", "offline")], value="streaming",
                                          label="Mode", elem_id="design-mode")
                        d_checks = gr.Checkbox(value=True, label=CHECKS_LABEL, info=CHECKS_INFO.replace(
                            ", and speaker similarity to the prompt", ""), elem_id="design-checks")
                        with gr.Accordion("Advanced", open=False):
                            d_temperature = gr.Slider(0.1, 1.5, value=DEFAULTS["temperature"], step=0.05,
                                                      label="Temperature")
                            d_top_k = gr.Slider(1, 200, value=DEFAULTS["top_k"], step=1, label="Top-k")
                            d_top_p = gr.Slider(0.05, 1.0, value=DEFAULTS["top_p"], step=0.01, label="Top-p")
                            d_max_tokens = gr.Slider(50, 3000, value=DEFAULTS["max_new_tokens"], step=50,
                                                     label="Max new tokens")
                            d_seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
                    with gr.Column(scale=1):
                        d_note = gr.HTML(model_note_html(rt.status(), "spark"), elem_id="design-model-note")
                        with gr.Row():
                            d_gen = gr.Button("Generate", variant="primary", elem_id="design-generate")
                            d_stop = gr.Button("Stop", variant="stop", elem_id="design-stop")
                        d_out = output_panel("design")
                        d_job = gr.Textbox(visible=False, elem_id="design-job")
            # ---- Voices -------------------------------------------------------------------------
            with gr.Tab("Voices", id="voices", elem_id="tab-voices"):
                gr.Markdown("Saved voices live in this studio's data folder (`voices/`); the shipped sample voices "
                            "are read-only. " + CONSENT)
                v_table = gr.Dataframe(headers=["Name", "Kind", "Seconds", "Transcript", "Created (UTC)"],
                                       interactive=False, wrap=True, elem_id="voices-table")
                with gr.Row(equal_height=False):
                    with gr.Column():
                        gr.Markdown("### Save a voice")
                        v_name = gr.Textbox(label="Name", elem_id="voices-name")
                        v_audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Prompt clip",
                                           elem_id="voices-audio")
                        v_text = gr.Textbox(label="Transcript (what the clip says)", lines=2, elem_id="voices-text")
                        with gr.Row():
                            v_copy = gr.Button("Copy the Clone tab's prompt", elem_id="voices-copy")
                            v_save = gr.Button("Save voice", variant="primary", elem_id="voices-save")
                    with gr.Column():
                        gr.Markdown("### Use or manage")
                        v_sel = gr.Dropdown(choices=h.voice_choices(), label="Voice", elem_id="voices-select")
                        v_preview = gr.Audio(label="Preview", type="filepath", interactive=False,
                                             elem_id="voices-preview")
                        v_transcript = gr.Textbox(label="Transcript", interactive=False)
                        v_use = gr.Button("Use in Clone", variant="primary", elem_id="voices-use")
                        with gr.Row():
                            v_new = gr.Textbox(label="New name", scale=3, elem_id="voices-new-name")
                            v_rename = gr.Button("Rename", scale=1, elem_id="voices-rename")
                        v_delete = gr.Button("Delete (kept in voices/.trash)", variant="stop", elem_id="voices-delete")
            # ---- History ------------------------------------------------------------------------
            with gr.Tab("History", id="history", elem_id="tab-history") as tab_history:
                gr.Markdown("Every generation in this data folder (`history/`), newest first. Click a row to play "
                            "or download it.")
                hist_plot = gr.Image(label="Latency and RTF, recent generations", type="filepath",
                                     interactive=False, height=260, elem_id="history-plot")
                hist_refresh = gr.Button("Refresh", size="sm", elem_id="history-refresh")
                hist_table = gr.Dataframe(headers=HISTORY_HEADERS, interactive=False, wrap=True, max_height=420,
                                          column_widths=HISTORY_WIDTHS, elem_id="history-table")
                hist_ids = gr.State([])
                with gr.Row(equal_height=False):
                    with gr.Column():
                        hist_audio = gr.Audio(label="Selected generation", type="filepath", interactive=False,
                                              elem_id="history-audio")
                        with gr.Row():
                            hist_fmt = gr.Radio(list(FORMATS), value="wav", label="Download as")
                            hist_dl = gr.DownloadButton("Download", visible=False, elem_id="history-download")
                        hist_record = gr.State(None)
                    hist_detail = gr.JSON(label="Inputs, parameters and metrics", elem_id="history-detail")
            # ---- Script: multi-voice dialogues and narrations (studio/ui_script.py) ---------------
            script_tab(rt, [hist_plot, hist_table, hist_ids], h.history_view)
            # ---- Batch and Listening test (studio/ui_qa.py) --------------------------------------
            qa_tabs(rt)
            # ---- Server -------------------------------------------------------------------------
            with gr.Tab("Server", id="server", elem_id="tab-server") as tab_server:
                srv_refresh = gr.Button("Refresh", size="sm", elem_id="server-refresh")
                srv_md = gr.Markdown(elem_id="server-state")
                srv_stats = gr.Dataframe(headers=STATS_HEADERS, interactive=False, label="Per-model statistics "
                                         "(cumulative since the server started)", elem_id="server-stats")
                srv_log = gr.Textbox(label="Recent server log lines, newest first", lines=16, max_lines=16,
                                     interactive=False, elem_id="server-log")

        # ---- wiring ---------------------------------------------------------------------------------
        light = dict(concurrency_limit=LIGHT_CONCURRENCY, api_visibility="private")
        quiet = dict(light, show_progress="hidden")
        voice_outs = [v_table, v_sel, voice_pick]
        hist_outs = [hist_plot, hist_table, hist_ids]
        demo.load(None, js=page_js())
        demo.load(h.on_load, inputs=None, outputs=[banner, model_note, d_note, timer, *voice_outs, *hist_outs,
                                                   storage], **quiet)
        timer.tick(h.tick, inputs=[model], outputs=[banner, model_note, d_note, timer], concurrency_limit=None,
                   show_progress="hidden", api_visibility="private")
        model.change(h.model_changed, inputs=[model], outputs=[model_note, f5_group, spark_group], **quiet)
        text_file.upload(h.load_text, inputs=[text_file], outputs=[text], **light)
        voice_pick.input(h.pick_voice, inputs=[voice_pick], outputs=[ref_audio, ref_text], **light)
        for ev in (ref_audio.upload, ref_audio.stop_recording, ref_audio.clear):
            ev(lambda: None, inputs=None, outputs=[voice_pick], **quiet)
        for ev in (ref_audio.upload, ref_audio.stop_recording):
            # heard text goes to a hidden box; the field takes it only if still empty when it arrives
            ev(lambda a, m, t: h.transcribe_prompt(a, m, t, only_if_empty=True), inputs=[ref_audio, model, ref_text],
               outputs=[asr_heard, ref_note], **light
               ).then(None, inputs=[asr_heard, ref_text], outputs=[ref_text],
                      js="(heard, current) => (current && current.trim()) ? current : heard")
        transcribe.click(h.transcribe_prompt, inputs=[ref_audio, model], outputs=[ref_text, ref_note], **light)
        reuse_seed.click(lambda s: s if s is not None else -1, inputs=[out.seed], outputs=[seed], **quiet)

        gen_inputs = [ref_audio, ref_text, text, model, mode, nfe, cfg, sway, speed, temperature, top_k, top_p,
                      max_tokens, seed, out.fmt, voice_pick, checks, job]
        wire_generation(h, "clone", gen, stop, h.clone, gen_inputs, out, job, hist_outs, "clone")
        out.fmt.change(h.reformat, inputs=[out.record, out.fmt], outputs=[out.download], **quiet)

        d_inputs = [d_text, d_gender, d_pitch, d_speed, d_mode, d_temperature, d_top_k, d_top_p, d_max_tokens,
                    d_seed, d_out.fmt, d_checks, d_job]
        wire_generation(h, "design", d_gen, d_stop, h.design, d_inputs, d_out, d_job, hist_outs, "create_voice")
        d_out.fmt.change(h.reformat, inputs=[d_out.record, d_out.fmt], outputs=[d_out.download], **quiet)

        v_save.click(h.save_voice, inputs=[v_name, v_audio, v_text], outputs=voice_outs, **light)
        v_copy.click(lambda a, t: (a, t), inputs=[ref_audio, ref_text], outputs=[v_audio, v_text], **quiet)
        v_sel.change(h.show_voice, inputs=[v_sel], outputs=[v_preview, v_transcript, v_new], **quiet)
        v_use.click(h.use_voice, inputs=[v_sel], outputs=[ref_audio, ref_text, voice_pick, tabs], **light)
        v_rename.click(h.rename_voice, inputs=[v_sel, v_new], outputs=voice_outs, **light)
        v_delete.click(h.delete_voice, inputs=[v_sel], outputs=voice_outs, **light)

        hist_refresh.click(h.history_view, outputs=hist_outs, **light)
        hist_table.select(h.history_select, inputs=[hist_ids, hist_fmt],
                          outputs=[hist_audio, hist_detail, hist_dl, hist_record], **light)
        hist_fmt.change(h.reformat, inputs=[hist_record, hist_fmt], outputs=[hist_dl], **quiet)

        srv_outs = [srv_md, srv_stats, srv_log]
        srv_refresh.click(h.server_view, outputs=srv_outs, **light)
        tab_history.select(h.history_view, outputs=hist_outs, **quiet)  # opening a tab refreshes it
        tab_server.select(h.server_view, outputs=srv_outs, **quiet)
        demo.queue(default_concurrency_limit=LIGHT_CONCURRENCY, max_size=MAX_QUEUE)
    h.demo = demo
    return demo


def wire_generation(h: Handlers, key: str, generate: gr.Button, stop: gr.Button, fn, inputs: list, out: OutputPanel,
                    job: gr.Textbox, hist_outs: list, api_name: str) -> None:
    """Generate -> (the browser's player starts listening first) handler -> metrics/audio; then the
    player fills in its first-sound figure, the picture is drawn, and the History tab refreshes.
    Stop tells the player to go quiet and the handler's job to cancel."""
    quiet = dict(concurrency_limit=LIGHT_CONCURRENCY, api_visibility="private", show_progress="hidden")
    generate.click(fn, inputs=inputs, outputs=out.outputs, js=begin_js(key, len(inputs) - 1), api_name=api_name,
                   show_progress_on=[out.metrics], concurrency_limit=GENERATE_CONCURRENCY, concurrency_id="generate"
                   ).then(None, js=fill_js(key)
                          ).then(h.picture, inputs=[out.record], outputs=[out.picture], **quiet
                                 ).then(h.history_view, outputs=hist_outs, **quiet)
    stop.click(h.stop, inputs=[job], outputs=None, js=stop_js(key), concurrency_limit=None, api_visibility="private")


def storage_note_md(rt: StudioRuntime) -> str:
    """On a Hugging Face Space without persistent storage: say that voices and history will not last."""
    from studio.config import ephemeral_storage_note

    note = ephemeral_storage_note(rt.options.data_dir)
    return f"**Storage:** {note}" if note else ""


def private_call_routes(demo: gr.Blocks) -> list:
    """Routes that refuse Gradio's by-name calls (`/gradio_api/call/NAME`) of the page's private events.

    Gradio hides private events (voice save, rename and delete, status polling, ...) from its API page
    and from gradio_client, but still runs them when POSTed to `/gradio_api/call/NAME`. These routes
    come before Gradio's own, so such a call gets 404; the page itself reaches its events through the
    queue by index, as before. Voices are managed over HTTP through `/v1/audio/voices` (studio/api.py,
    under the API key when one is set)."""
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def refuse(request):
        name = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        return JSONResponse({"error": f"{name!r} is not part of this page's API; /gradio_api/info lists the "
                                      "public endpoints"}, status_code=404)

    names = sorted({f.api_name for f in demo.fns.values()
                    if isinstance(f.api_name, str) and f.api_visibility == "private"})
    paths = [f"/gradio_api/call{v2}/{name}{slash}" for name in names for v2 in ("", "/v2") for slash in ("", "/")]
    return [Route(path, refuse, methods=["POST"]) for path in paths]


def launch_kwargs(rt: StudioRuntime, demo: gr.Blocks | None = None) -> dict:
    """What `demo.launch()` needs besides host/port: the streaming and rater routes, the OpenAI-compatible
    API (studio/api.py), the refusal of by-name calls to private events, and the folders it may serve."""
    # the player's routes need the page login when --auth is on; raters and the API have their own keys
    # /metrics: open to loopback or to its bearer token (studio/metrics.py), never to the page login
    routes = login_required(rt.jobs.routes()) + rater_routes(rt) + api_routes(rt) + metrics_routes(rt)
    if demo is not None:
        routes += private_call_routes(demo)
    return {"app_kwargs": {"routes": routes}, "allowed_paths": rt.allowed_paths(),
            "max_file_size": current_limits().max_upload_bytes}  # STUDIO_MAX_UPLOAD_MB (studio/limits.py)
