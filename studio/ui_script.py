"""The page's **Script** tab: a multi-voice script, its parsed preview, generation streamed in script order.

The script is parsed by `studio/script.py` (tags in the system grammar). Preview fills a table of
segments (segment, line, voice, family/settings, estimated length) and lists every problem by line;
Generate does the same and, only for a script without problems, generates it: segments run with
bounded concurrency and reach the page's Web Audio player (`studio/static/player.js`) through the
studio's streaming route (`studio/ui_stream.py`) in script order, each whole segment as soon as it
and every earlier one are ready, preceded by its pause. A segment frame ('S', JSON) before each
segment's audio tells the player which line is speaking when that audio starts.

Generate is also the Gradio API endpoint `/script` (inputs: script, default family, mode, speaker
pause ms, paragraph pause ms, concurrency, job id (may be empty); outputs: problems HTML, plan table,
audio, metrics HTML, two button updates, the plan + metrics + segments as JSON, and the WAV and ZIP
as files), and Preview is `/script_plan`.
"""

from __future__ import annotations

import html
import os
import threading
import time

import gradio as gr
import numpy as np

from studio.script import (DEFAULT_CONCURRENCY, DEFAULT_PARAGRAPH_PAUSE_MS, DEFAULT_SPEAKER_PAUSE_MS,
                           MAX_CONCURRENCY, MAX_PAUSE_MS, TARGET_LUFS, ScriptCancelled, ScriptError, ScriptPlan,
                           format_problems, generate_script, plan_json, plan_script, record_script, script_zip)
from studio.ui_files import page_copy
from studio.ui_stream import FRAME_META, json_frame
from studio.ui_views import STYLES

KEY = "script"
#: The player's segment frame: JSON {segment, line, voice, text} sent right before a segment's audio.
FRAME_SEGMENT = b"S"
PLAN_HEADERS = ["Segment", "Line", "Voice", "Family / settings", "Est. s", "Pause before ms", "Text"]
SEGMENT_HEADERS = ["Segment", "Line", "Voice", "Latency s", "First chunk s", "Plays from s", "Audio s", "RTF",
                   "LUFS in", "Gain dB"]
#: How long the handler waits after the last segment for the browser's first-sound report (s).
PLAYED_WAIT_S = 1.5
#: How often the watcher looks for the browser's first-sound report (s).
PLAYED_POLL_S = 0.02
EXAMPLE = ("{en_female} Good morning! Did you sleep well?\n"
           "{en_male|f5:speed=1.1} Not really; the harbour was loud all night.\n"
           "{spark:gender=female,pitch_level=high,speed_level=moderate} I heard it too.\n\n"
           "{en_female} Then let us have coffee first.\n"
           "{spark:gender=female,pitch_level=high,speed_level=moderate} Good idea.")
HELP = (
    "Start each line with a voice tag; lines without a tag continue the voice above, and a blank line starts "
    "a new paragraph.\n\n"
    "- `{Name}`: a saved or sample voice (Voices tab), with the default family below\n"
    "- `{Name|f5:nfe_steps=32}` or `{Name|spark:temperature=0.6}`: a family and settings for that line "
    "(the system grammar of batch runs)\n"
    "- `{spark:gender=female,pitch_level=high,speed_level=moderate}`: a voice created by Spark-TTS on its first "
    "line; later lines with the same tag are cloned from that first line, so it stays the same speaker\n\n"
    f"Every segment is loudness-matched to {TARGET_LUFS:g} LUFS when it is complete; playback starts with "
    "segment 1 while later ones are still generating.")


def user_error(message: str, title: str = "Cannot do that") -> gr.Error:
    return gr.Error(message, title=title, print_exception=False)


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def player_html(key: str = KEY) -> str:
    """The live player box, with the line that is speaking now."""
    return (f'<div class="studio-player" id="studio-player-{key}">'
            f'<div class="studio-player-title">Live player</div>'
            f'<div class="studio-player-status" id="studio-player-{key}-status" data-state="idle">'
            "The script plays here from its first segment on.</div>"
            f'<div class="studio-player-line" id="studio-player-{key}-line" data-segment="">&nbsp;</div>'
            f'<div class="studio-player-meter"><div class="studio-player-bar" id="studio-player-{key}-bar"></div>'
            "</div></div>")


# --- views -------------------------------------------------------------------------------------------
def plan_rows(plan: ScriptPlan) -> list[list]:
    return [[s.index, s.line, s.voice.label + (f" (cloned from segment {s.clone_of})" if s.clone_of else ""),
             s.voice.settings, round(s.est_s, 1), s.pause_before_ms, s.text] for s in plan.segments]


def problems_html(plan: ScriptPlan | None, error: str | None = None) -> str:
    """The problems by line (nothing is generated while there are any), or a one-line summary."""
    if error:
        return f'<div class="studio-box studio-error" data-kind="error" style="{STYLES["error"]}">{esc(error)}</div>'
    if plan is None:
        return ""
    if plan.problems:
        items = "".join(f'<li data-line="{line or ""}">{esc(f"line {line}: " if line else "")}{esc(msg)}</li>'
                        for line, msg in plan.problems)
        return (f'<div class="studio-box studio-error" data-kind="error" id="script-problem-list" '
                f'style="{STYLES["error"]}">'
                f"<b>{len(plan.problems)} problem{'s' if len(plan.problems) != 1 else ''}; nothing will be "
                f"generated until they are fixed:</b><ul>{items}</ul></div>")
    if not plan.segments:
        return (f'<div class="studio-box studio-info" data-kind="info" style="{STYLES["info"]}">Type a script: start a '
                "line with {Name}.</div>")
    voices = len({s.voice.identity for s in plan.segments})
    return (f'<div class="studio-box studio-ok" data-kind="ok" style="{STYLES["ok"]}">{len(plan.segments)} segments, '
            f"{voices} voice"
            f"{'s' if voices != 1 else ''}, about {plan.est_s:.0f} s of audio ({', '.join(plan.families)}).</div>")


def _num(value, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return "&mdash;"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metrics_html(metrics: dict, segments: list[dict], *, demo: bool | None, status: str, job: str) -> str:
    """The script's numbers (data-metric=NAME cells) and a row per segment."""
    rows = [("latency_s", "Latency (start to last segment ready)", _num(metrics.get("latency_s")) + " s"),
            ("first_sound_s", "First segment ready to play", _num(metrics.get("first_sound_s")) + " s"),
            ("browser_first_sound_s", "Start to first sound in the browser",
             _num(metrics.get("browser_first_sound_s")) + " s"),
            ("first_sound_ms", "First audio arrival to first sound (browser)",
             _num(metrics.get("first_sound_ms"), 1) + " ms"),
            ("audio_s", "Audio length (pauses included)", _num(metrics.get("audio_s"), 2) + " s"),
            ("rtf", "Real-time factor (latency / audio)", _num(metrics.get("rtf"))),
            ("segments", "Segments", _num(metrics.get("segments"))),
            ("concurrency", "Requests at once", _num(metrics.get("concurrency"))),
            ("demo_weights", "Weights", "DEMO (noise)" if demo else ("real" if demo is False else "&mdash;"))]
    head = "<p><b>Stopped.</b> The segments finished before the stop are kept.</p>" if status == "cancelled" else ""
    body = "".join(f'<tr><th style="text-align:left;font-weight:normal;padding:2px 12px 2px 0">{esc(label)}</th>'
                   f'<td data-metric="{key}">{value}</td></tr>' for key, label, value in rows)
    seg_head = "".join(f"<th>{esc(h)}</th>" for h in SEGMENT_HEADERS)
    seg_rows = ""
    for row in segments:
        m = row.get("metrics") or {}
        # "Plays from": when the segment was handed to the player (it and every earlier one ready), on the
        # script's clock: the segment's own first-sound time on the server's side.
        cells = [row["segment"], row["line"], esc(row["voice"]), _num(m.get("latency_s")), _num(m.get("first_chunk_s")),
                 _num(m.get("emitted_s")), _num(m.get("audio_s"), 2), _num(m.get("rtf")), _num(m.get("lufs_in"), 1),
                 _num(m.get("gain_db"), 1)]
        seg_rows += f'<tr data-segment="{row["segment"]}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    return (f'{head}<table class="studio-metrics" data-status="{esc(status)}" data-job="{esc(job)}">{body}</table>'
            f'<div style="overflow-x:auto"><table class="studio-script-segments" id="script-segment-table">'
            f"<tr>{seg_head}</tr>{seg_rows}</table></div>")


# --- handlers ---------------------------------------------------------------------------------------
class ScriptHandlers:
    """Preview and generation of scripts over one StudioRuntime."""

    def __init__(self, rt):
        self.rt = rt

    def plan(self, text, family, speaker_ms, paragraph_ms) -> ScriptPlan:
        try:
            return plan_script(text or "", self.rt.voices, default_family=family or "f5",
                               speaker_pause_ms=speaker_ms, paragraph_pause_ms=paragraph_ms)
        except ScriptError as exc:  # a bad setting (pause, family), not a line
            raise user_error(str(exc), "Check the script settings") from None

    def preview(self, text, family, speaker_ms, paragraph_ms):
        plan = self.plan(text, family, speaker_ms, paragraph_ms)
        return problems_html(plan), plan_rows(plan)

    def load_file(self, path):
        from studio.ui_generate import InputProblem, read_text_file

        try:
            return read_text_file(path)
        except InputProblem as exc:
            raise user_error(str(exc), "Cannot read the file") from None

    def stop_script(self, job_id: str):
        self.rt.jobs.cancel(job_id)

    def generate(self, text, family, mode, speaker_ms, paragraph_ms, concurrency, job_id):
        """Parse, generate (streaming every finished segment in order into the browser's job), record,
        and return the preview, the replay audio, metrics, downloads, the plan+metrics JSON and the files."""
        from studio.client import SynthesisError
        from studio.ui_runtime import NotReady

        job = self.rt.jobs.open(job_id)
        stream = mode == "streaming"
        try:
            plan = self.plan(text, family, speaker_ms, paragraph_ms)
        except gr.Error as exc:
            job.finish("error", str(exc))
            raise
        if not plan.ok:
            message = format_problems(list(plan.problems)) or "the script is empty"
            job.finish("error", message)
            raise user_error(f"Nothing was generated; the script has problems:\n{message}", "Fix the script")
        try:
            concurrency = int(concurrency or DEFAULT_CONCURRENCY)
            for fam in plan.families:
                self.rt.require(fam, stream)
            client = self.rt.client()
        except NotReady as exc:
            job.finish("error", str(exc))
            raise user_error(str(exc), "Cannot generate") from None
        if job.cancel.is_set():
            job.finish("cancelled", "stopped before it started")
            raise user_error("Stopped before the script started.", "Stopped")
        rate = plan.sample_rate
        job.push(json_frame(FRAME_META, {"model": "script", "label": f"a script of {len(plan.segments)} segments",
                                         "mode": mode}))

        def on_segment(outcome, pause: np.ndarray) -> None:
            job.push_audio(pause, rate)
            s = outcome.segment
            job.push(json_frame(FRAME_SEGMENT, {"segment": s.index, "line": s.line, "voice": s.voice.label,
                                                "text": s.text}))
            job.push_audio(outcome.audio, rate)

        started = time.perf_counter()
        heard: dict = {}
        finished = threading.Event()

        def watch_first_sound():
            # When the browser's report of its first sound reaches the server, on the script's clock,
            # so it can be set beside each segment's ready time.
            while not finished.is_set() and job.played is None:
                time.sleep(PLAYED_POLL_S)
            if job.played is not None:
                heard["browser_first_sound_s"] = round(time.perf_counter() - started, 4)

        watcher = threading.Thread(target=watch_first_sound, name="script-first-sound", daemon=True)
        watcher.start()
        status, error, result, outcomes = "ok", None, None, []
        try:
            result = generate_script(plan, client, self.rt.voices, stream=stream, concurrency=concurrency,
                                     cancel=job.cancel, on_segment=on_segment, slots=getattr(self.rt, "slots", None))
            outcomes = result.segments
        except ScriptCancelled as exc:
            status, outcomes = "cancelled", exc.done
        except ScriptError as exc:
            status, error, outcomes = "error", str(exc), exc.done
        except SynthesisError as exc:
            status, error = "error", str(exc)
        except BaseException as exc:
            finished.set()
            job.finish("error", f"{type(exc).__name__}: {exc}")
            raise
        if status == "ok":
            job.finish("ok", "", audio_s=result.metrics["audio_s"])
            job.wait_played(PLAYED_WAIT_S)
        else:
            job.finish(status, error or "stopped")
        finished.set()
        watcher.join(1.0)
        metrics = dict(result.metrics) if result else {"segments": len(outcomes)}
        metrics.update(heard)
        if job.played:
            metrics.update(job.played)
        rec = record_script(self.rt.history, text, plan, outcomes, sample_rate=rate, stream=stream, status=status,
                            metrics=metrics, error=error, concurrency=concurrency,
                            audio=result.audio if result else None)
        job.record_id = rec["id"]
        if status == "error":
            raise user_error(f"The script stopped: {error}", "Script failed")
        demo = rec.get("demo_weights")
        wav = self.export_wav(rec) if rec.get("audio") else None
        archive = self.export_zip(rec) if outcomes else None
        payload = {"record_id": rec["id"], "status": status, "plan": plan_json(plan), "metrics": metrics,
                   "segments": rec["segments"]}
        return (problems_html(plan), plan_rows(plan), wav,
                metrics_html(metrics, rec["segments"], demo=demo, status=status, job=job.id),
                gr.DownloadButton("Download WAV", value=wav, visible=wav is not None),
                gr.DownloadButton("Download ZIP (segments + lines.csv)", value=archive, visible=archive is not None),
                payload, [p for p in (wav, archive) if p])

    # downloads ----------------------------------------------------------------------------------
    def export_wav(self, rec: dict) -> str | None:
        """The whole script as 16-bit WAV under history/exports/ (made once, atomically)."""
        import soundfile as sf

        from studio.audio_io import save_audio

        src = self.rt.history.file(rec.get("audio"))
        if src is None:
            return None
        out = self.rt.history.root / "exports" / f"voice-studio-script-{rec['id']}.wav"
        if not out.is_file():
            wav, sr = sf.read(src, dtype="float32")
            tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
            save_audio(tmp, wav, sr)
            os.replace(tmp, out)
        return page_copy(out)

    def export_zip(self, rec: dict) -> str | None:
        out = self.rt.history.root / "exports" / f"voice-studio-script-{rec['id']}.zip"
        if not out.is_file():
            script_zip(self.rt.history, rec, out)
        return page_copy(out)


def script_tab(rt, hist_outs: list | None = None, history_view=None) -> ScriptHandlers:
    """Lay out the Script tab (inside the page's gr.Tabs) and wire it. `history_view` (the page's
    History refresh) runs after a generation with `hist_outs` as outputs."""
    from studio.ui import GENERATE_CONCURRENCY, LIGHT_CONCURRENCY, fill_js, stop_js

    h = ScriptHandlers(rt)
    light = dict(concurrency_limit=LIGHT_CONCURRENCY, api_visibility="private")
    quiet = dict(light, show_progress="hidden")
    with gr.Tab("Script", id="script", elem_id="tab-script"):
        gr.Markdown(HELP, elem_id="script-help")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                text = gr.Textbox(label="Script", lines=12, max_lines=40, value=EXAMPLE, elem_id="script-text")
                file = gr.File(label="...or load a .txt file", file_types=[".txt"], height=100, elem_id="script-file")
                with gr.Row():
                    family = gr.Radio([("F5-TTS", "f5"), ("Spark-TTS", "spark")], value="f5", label="Default family",
                                      info="For {Name} tags without settings.", elem_id="script-family")
                    mode = gr.Radio([("Streaming", "streaming"), ("Offline", "offline")], value="streaming",
                                    label="Requests", info="Streaming models report each segment's first chunk.",
                                    elem_id="script-mode")
                with gr.Row():
                    speaker = gr.Slider(0, MAX_PAUSE_MS, value=DEFAULT_SPEAKER_PAUSE_MS, step=50,
                                        label="Pause between speakers (ms)", elem_id="script-speaker-pause")
                    paragraph = gr.Slider(0, MAX_PAUSE_MS, value=DEFAULT_PARAGRAPH_PAUSE_MS, step=50,
                                          label="Pause between paragraphs (ms)", elem_id="script-paragraph-pause")
                    concurrency = gr.Slider(1, MAX_CONCURRENCY, value=DEFAULT_CONCURRENCY, step=1,
                                            label="Segments at once", elem_id="script-concurrency")
                with gr.Row():
                    preview = gr.Button("Preview", elem_id="script-preview")
                    generate = gr.Button("Generate", variant="primary", elem_id="script-generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="script-stop")
                problems = gr.HTML(elem_id="script-problems")
                table = gr.Dataframe(headers=PLAN_HEADERS, interactive=False, wrap=True, elem_id="script-plan",
                                     label="Segments")
            with gr.Column(scale=2):
                gr.HTML(player_html(KEY), elem_id=f"studio-player-box-{KEY}")
                audio = gr.Audio(label="Script (replay)", type="filepath", interactive=False, elem_id="script-result")
                metrics = gr.HTML(elem_id="script-metrics")
                with gr.Row():
                    dl_wav = gr.DownloadButton("Download WAV", visible=False, elem_id="script-download")
                    dl_zip = gr.DownloadButton("Download ZIP", visible=False, elem_id="script-zip")
                with gr.Accordion("Plan and metrics (JSON)", open=False):
                    details = gr.JSON(label="Plan and metrics", elem_id="script-json")
                # Hidden: the WAV and the ZIP as files, which gradio_client downloads (it does not for the
                # buttons' updates).
                files = gr.File(label="Downloads", file_count="multiple", visible=False, elem_id="script-files")
                job = gr.Textbox(visible=False, elem_id="script-job")
    inputs = [text, family, mode, speaker, paragraph, concurrency, job]
    begin = f"(...args) => window.studioPlayer ? window.studioPlayer.begin('{KEY}', args, {len(inputs) - 1}) : args"
    file.upload(h.load_file, inputs=[file], outputs=[text], **light)
    preview.click(h.preview, inputs=[text, family, speaker, paragraph], outputs=[problems, table],
                  api_name="script_plan", concurrency_limit=LIGHT_CONCURRENCY)
    # The preview answers at once beside the generation, so problems show even while it waits in the queue.
    generate.click(h.preview, inputs=[text, family, speaker, paragraph], outputs=[problems, table], **quiet)
    event = generate.click(h.generate, inputs=inputs, outputs=[problems, table, audio, metrics, dl_wav, dl_zip,
                                                               details, files],
                           js=begin, api_name="script", show_progress_on=[metrics],
                           concurrency_limit=GENERATE_CONCURRENCY, concurrency_id="generate"
                           ).then(None, js=fill_js(KEY))
    if history_view is not None and hist_outs:
        event.then(history_view, outputs=hist_outs, **quiet)
    stop.click(h.stop_script, inputs=[job], outputs=None, js=stop_js(KEY), concurrency_limit=None,
               api_visibility="private")
    return h


__all__ = ["FRAME_SEGMENT", "ScriptHandlers", "metrics_html", "plan_rows", "player_html", "problems_html",
           "script_tab"]
