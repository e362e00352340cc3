"""The studio page in a real browser (Debian chromium driven by Playwright; marker `browser`).

Two page backends:
- `fake_url`: the page in this process over a fake Triton client (tests/test_ui.py), so the page's
  own mechanics (Web Audio player, Stop, voices, history, errors) are checked in seconds;
- `real_url`: `python app.py --demo-weights` on free ports with a temporary data directory: the
  whole path, browser -> Gradio -> gRPC -> tritonserver -> the models (demo weights) and back.

Screenshots of each tab go to the test's tmp directory (the path is printed).
Chromium is Debian's (`apt-get install -y chromium`); never `playwright install`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, have_chromium

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not have_chromium(), reason="needs Debian chromium (apt-get install -y chromium)")]

ROOT = Path(__file__).resolve().parent.parent
PROMPT_EN = SAMPLES / "voices" / "en_female.wav"
PROMPT_EN_TEXT = (SAMPLES / "voices" / "en_female.txt").read_text("utf-8").strip()
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
#: A first real start writes demo weights and loads every model into a fresh tritonserver.
REAL_START_TIMEOUT_S = 900
REAL_GENERATION_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- helpers: one browser, and a page object that knows the studio's elements -----------------------
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield b
        b.close()


class StudioPage:
    def __init__(self, page, shots: Path):
        self.page, self.shots = page, shots
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))

    def open(self, url: str, ready_timeout_s: float = 60) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("#studio-banner", timeout=60_000)
        self.page.wait_for_function("() => !!window.studioPlayer", timeout=30_000)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            state = self.page.locator("#studio-banner [data-state]").first.get_attribute("data-state")
            if state == "ready":
                return
            if state not in ("starting", None):
                raise AssertionError("the server did not start: " + self.page.locator("#studio-banner").inner_text())
            time.sleep(1.0)
        raise AssertionError("the server was not ready in time: " + self.page.locator("#studio-banner").inner_text())

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()
        time.sleep(0.3)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def upload(self, elem: str, path: Path) -> None:
        self.page.locator(f"#{elem} input[type=file]").set_input_files(str(path))
        self.page.wait_for_selector(f"#{elem} audio, #{elem} [data-testid='waveform-controls']", timeout=30_000,
                                    state="attached")

    def fill(self, elem: str, text: str) -> None:
        self.page.locator(f"#{elem} textarea, #{elem} input[type=text]").first.fill(text)

    def radio(self, elem: str, value: str) -> None:
        self.page.locator(f"#{elem} input[value='{value}']").check()

    def wait_text(self, selector: str, text: str, timeout_s: float = 20) -> None:
        """Until the element's visible text contains `text`."""
        self.page.wait_for_function(
            "([sel, t]) => { const e = document.querySelector(sel); return !!e && e.innerText.includes(t); }",
            arg=[selector, text], timeout=timeout_s * 1000)

    def wait_chunks(self, key: str, n: int, timeout_s: float) -> None:
        self.page.wait_for_function(
            "([k, n]) => { const s = window.studioPlayer.stats(k); return !!s && s.chunks >= n; }",
            arg=[key, n], timeout=timeout_s * 1000)

    def set_nfe(self, steps: int) -> None:
        """F5's NFE slider (in the Advanced accordion), as a person would set it."""
        if not self.page.locator("#clone-nfe").is_visible():
            self.page.locator("#clone-advanced").click()
        box = self.page.locator("#clone-nfe input[type=number]")
        box.wait_for(state="visible", timeout=10_000)
        for _ in range(20):  # Gradio mounts an accordion's children as it opens: retry until it sticks
            box.fill(str(steps))
            box.press("Tab")  # Gradio's number box commits on blur
            time.sleep(0.2)
            if self.page.locator("#clone-nfe input[type=range]").input_value() == str(steps):
                return
        raise AssertionError("the NFE slider did not take the value")

    def metric(self, key: str, name: str) -> str:
        cell = self.page.locator(f"#{key}-metrics [data-metric='{name}']")
        return cell.inner_text() if cell.count() else ""

    def player(self, key: str) -> dict | None:
        return self.page.evaluate("k => window.studioPlayer.stats(k)", key)

    def generate(self, key: str, timeout_s: float = 60) -> dict:
        """Click Generate, wait for the handler's metrics and the player's end; return both."""
        before = self.metric(key, "latency_s")
        self.page.locator(f"#{key}-generate").click()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = self.metric(key, "latency_s")
            stats = self.player(key)
            if now and now != before and re.search(r"\d", now) and stats and stats["ended"] is not None:
                break
            err = self.error_text()
            if err:
                raise AssertionError(f"the page reported an error: {err}")
            time.sleep(0.2)
        else:
            raise AssertionError(f"no result within {timeout_s} s; player: {self.player(key)}")
        # the first sound may come a moment after the handler answered; the player then fills it in
        self.page.wait_for_function("k => { const s = window.studioPlayer.stats(k); return s && s.played; }",
                                    arg=key, timeout=10_000)
        self.page.wait_for_function(
            "k => /\\d/.test(document.querySelector(`#${k}-metrics [data-metric='first_sound_ms']`).textContent)",
            arg=key, timeout=10_000)
        return {"latency_s": self.metric(key, "latency_s"), "rtf": self.metric(key, "rtf"),
                "first_chunk_s": self.metric(key, "first_chunk_s"), "audio_s": self.metric(key, "audio_s"),
                "seed": self.metric(key, "seed"), "first_sound_ms": self.metric(key, "first_sound_ms"),
                "demo_weights": self.metric(key, "demo_weights"), "player": self.player(key)}

    def result_duration(self, key: str) -> float:
        """Seconds of the replay player's audio, from the WAV file it fetched (header sizes)."""
        self.page.wait_for_selector(f"#{key}-result a[data-testid='download-link']", state="attached", timeout=20_000)
        href = self.page.locator(f"#{key}-result a[data-testid='download-link']").get_attribute("href")
        return self.page.evaluate("""async (url) => {
            const b = new DataView(await (await fetch(url)).arrayBuffer());
            const rate = b.getUint32(24, true), align = b.getUint16(32, true);
            let pos = 12;  // walk the RIFF chunks to 'data'
            while (pos + 8 <= b.byteLength) {
              const id = [0, 1, 2, 3].map((i) => String.fromCharCode(b.getUint8(pos + i))).join('');
              const size = b.getUint32(pos + 4, true);
              if (id === 'data') return size / align / rate;
              pos += 8 + size + (size & 1);
            }
            return 0; }""", href)

    def error_text(self) -> str:
        toasts = self.page.locator(".toast-body.error, [data-testid='toast-body'].error")
        return toasts.first.inner_text() if toasts.count() else ""

    def wait_toast(self, needle: str, timeout_s: float = 20) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t in self.page.locator("[data-testid='toast-body'], .toast-body").all():
                text = t.inner_text()
                if needle.lower() in text.lower():
                    return text
            time.sleep(0.2)
        raise AssertionError(f"no message containing {needle!r} appeared")

    def close_toasts(self) -> None:
        for btn in self.page.locator("[data-testid='toast-close']").all():
            try:
                btn.click(timeout=1000)
            except Exception:  # noqa: BLE001 - a toast that closed itself meanwhile
                pass


def assert_played(result: dict, what: str) -> None:
    p = result["player"]
    assert p["chunks"] >= 1 and p["seconds"] > 0.1, f"{what}: no audio reached the player: {p}"
    assert p["played"] and p["peak"] > 0, f"{what}: the player produced no sound: {p}"
    assert p["firstSoundMs"] is not None and 0 <= p["firstSoundMs"] < 2000, p
    for key in ("latency_s", "rtf", "first_chunk_s", "audio_s", "seed", "first_sound_ms"):
        assert re.search(r"\d", result[key]), f"{what}: metric {key} shows {result[key]!r}"
    print(f"\n[{what}] latency {result['latency_s']}, first chunk {result['first_chunk_s']}, RTF {result['rtf']}, "
          f"first chunk -> first sound {p['firstSoundMs']:.1f} ms (browser; output latency "
          f"{p['outputLatencyMs'] or 0:.1f} ms of it), chunks {p['chunks']}")


# --- the page over a fake client: the page's own mechanics ------------------------------------------
@pytest.fixture(scope="module")
def fake_app(tmp_path_factory):
    from studio.ui import build_demo, launch_kwargs
    from tests.test_ui import FakeClient, FakeRuntime

    rt = FakeRuntime(tmp_path_factory.mktemp("fake-data"), FakeClient(chunks=3, chunk_s=0.6, delay_s=0.3))
    demo = build_demo(rt, autostart=False)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs(rt))
    yield f"http://127.0.0.1:{port}/", rt
    demo.close()


@pytest.fixture()
def studio(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = StudioPage(context.new_page(), tmp_path)
    yield page
    print(f"\nscreenshots: {tmp_path}")
    context.close()


def test_fake_clone_streaming_plays_through_web_audio(fake_app, studio):
    url, rt = fake_app
    studio.open(url)
    studio.upload("clone-ref-audio", PROMPT_EN)
    studio.fill("clone-ref-text", PROMPT_EN_TEXT)
    studio.fill("clone-text", "Hello from the fake studio.")
    result = studio.generate("clone")
    assert_played(result, "fake F5 streaming")
    assert result["player"]["chunks"] == 3
    assert "DEMO" in result["demo_weights"]
    assert studio.result_duration("clone") == pytest.approx(1.8, abs=0.05)
    assert rt.fake.calls[-1]["stream"] and rt.fake.calls[-1]["params"]["nfe_steps"] == 32
    studio.page.wait_for_selector("#clone-picture img", timeout=20_000)
    assert studio.page.locator("#clone-download").is_visible()
    studio.shot("clone-after-generation")


def test_fake_offline_spark_and_voice_creation(fake_app, studio):
    url, rt = fake_app
    studio.open(url)
    studio.upload("clone-ref-audio", PROMPT_EN)
    studio.fill("clone-text", "Spark can clone from audio alone.")
    studio.radio("clone-model", "spark")
    studio.radio("clone-mode", "offline")
    result = studio.generate("clone")
    assert_played(result, "fake Spark offline")
    assert rt.fake.calls[-1]["model"] == "spark" and not rt.fake.calls[-1]["stream"]
    studio.tab("Voice creation (Spark)")
    studio.fill("design-text", "A brand new voice.")
    studio.radio("design-gender", "male")
    studio.radio("design-pitch", "high")
    result = studio.generate("design")
    assert_played(result, "fake voice creation")
    assert rt.fake.calls[-1]["params"]["gender"] == "male" and rt.fake.calls[-1]["params"]["pitch_level"] == "high"
    studio.shot("design")


def test_fake_stop_cancels(fake_app, studio):
    url, rt = fake_app
    studio.open(url)
    rt.fake.delay_s = 1.0
    try:
        studio.upload("clone-ref-audio", PROMPT_EN)
        studio.fill("clone-ref-text", PROMPT_EN_TEXT)
        studio.fill("clone-text", "This one gets stopped.")
        studio.page.locator("#clone-generate").click()
        studio.wait_chunks("clone", 1, 20)
        studio.page.locator("#clone-stop").click()
        studio.page.wait_for_selector("#clone-metrics [data-status='cancelled']", timeout=20_000)
        stats = studio.player("clone")
        assert stats["state"] == "stopped" and stats["chunks"] < 3
        assert rt.history.records()[0]["status"] == "cancelled"
    finally:
        rt.fake.delay_s = 0.3


def wait_field(studio, elem: str, ok, timeout_s: float = 30) -> str:
    """Until the text field's value satisfies `ok`; returns the value."""
    box = studio.page.locator(f"#{elem} textarea, #{elem} input[type=text]").first
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = box.input_value()
        if ok(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"#{elem} holds {box.input_value()!r}")


def test_fake_friendly_errors(fake_app, studio):
    from tests.test_ui import FakeClient

    url, rt = fake_app
    studio.open(url)
    studio.fill("clone-text", "No prompt clip yet.")
    studio.page.locator("#clone-generate").click()
    studio.wait_toast("Upload or record a prompt clip")
    studio.close_toasts()
    studio.upload("clone-ref-audio", PROMPT_EN)
    # F5 with an empty reference text: the upload fills it from speech recognition (the fake's words),
    # and the note under the field says the (demo) model wrote it
    wait_field(studio, "clone-ref-text", lambda v: v == FakeClient.HEARD)
    assert "DEMO" in studio.page.locator("#clone-ref-note").inner_text()
    studio.shot("clone-transcript-filled")
    served = rt.fake.served
    rt.fake.served = tuple(m for m in served if m not in ("asr", "speaker_sim"))
    try:
        studio.fill("clone-ref-text", "")
        studio.page.locator("#clone-generate").click()
        studio.wait_toast("F5-TTS needs the prompt's transcript")
    finally:
        rt.fake.served = served
    assert studio.player("clone")["ended"]["status"] == "error"
    studio.shot("clone-error")


def test_fake_microphone_recording(fake_app, studio):
    url, rt = fake_app
    studio.open(url)
    box = studio.page.locator("#clone-ref-audio")
    box.locator("button[aria-label='Record audio']").click()
    box.get_by_role("button", name="Record", exact=True).click()
    time.sleep(2.5)
    box.get_by_role("button", name="Stop", exact=True).first.click()
    studio.page.wait_for_selector("#clone-ref-audio audio, #clone-ref-audio [data-testid='waveform-controls']",
                                  state="attached", timeout=30_000)
    studio.fill("clone-ref-text", "A fake microphone beep.")
    studio.fill("clone-text", "Cloned from the microphone.")
    result = studio.generate("clone")
    assert_played(result, "fake microphone prompt")
    assert rt.fake.calls[-1]["ref"] > 24000, "the recording reached the model as the prompt"


def test_fake_voices_history_and_server_tabs(fake_app, studio):
    url, rt = fake_app
    studio.open(url)
    studio.upload("clone-ref-audio", PROMPT_EN)  # a prompt on the Clone tab, copied over to save it
    studio.fill("clone-ref-text", PROMPT_EN_TEXT)
    studio.tab("Voices")
    studio.fill("voices-name", "Test Voice 1")
    studio.page.locator("#voices-copy").click()
    studio.page.wait_for_function("t => document.querySelector('#voices-text textarea').value === t",
                                  arg=PROMPT_EN_TEXT, timeout=20_000)
    studio.page.locator("#voices-save").click()
    studio.wait_text("#voices-table", "Test Voice 1")
    assert [v.name for v in rt.voices.list() if not v.read_only] == ["Test Voice 1"]
    studio.shot("voices")
    # choose it and use it in Clone
    studio.page.locator("#voices-select input").click()
    studio.page.get_by_role("option", name="Test Voice 1").click()
    studio.page.wait_for_selector("#voices-preview audio", state="attached", timeout=20_000)
    studio.page.locator("#voices-use").click()
    studio.page.wait_for_function("t => document.querySelector('#clone-ref-text textarea').value === t",
                                  arg=PROMPT_EN_TEXT, timeout=20_000)
    studio.page.wait_for_selector("#tab-clone", state="visible", timeout=10_000)
    studio.fill("clone-text", "Using a saved voice.")
    result = studio.generate("clone")
    assert_played(result, "fake saved voice")
    assert rt.history.records()[0]["voice"] == "Test Voice 1"
    # history: the row is there, and selecting it loads its audio
    studio.tab("History")
    # the table refreshes after the generation is recorded (earlier tests' rows are there before it):
    # wait for this row before opening it
    studio.wait_text("#history-table", "Using a saved voice", 30)
    studio.page.locator("#history-table [data-testid='cell-0-1']").click()
    studio.page.wait_for_selector("#history-audio a[data-testid='download-link']", state="attached", timeout=20_000)
    studio.page.wait_for_function("() => (document.querySelector('#history-detail')?.innerText || '')"
                                  ".includes('Test Voice 1')", timeout=20_000)
    assert "Test Voice 1" in studio.page.locator("#history-detail").inner_text()
    assert studio.page.locator("#history-plot img").count() == 1
    studio.shot("history")
    studio.tab("Server")
    studio.wait_text("#server-stats", "f5_tts")
    assert "fake log line" in studio.page.locator("#server-log textarea").input_value()
    studio.shot("server")


def test_fake_two_users_generate_at_once(fake_app, browser, tmp_path):
    """Generations of two pages overlap (the queue admits several), and a third page stays live."""
    url, rt = fake_app
    # generations of ~3 s (3 chunks of 1 s): the second click lands well inside the first even on a
    # loaded machine, and a light event queued behind a generation would take longer than one
    before, rt.fake.delay_s = rt.fake.delay_s, 1.0
    pages = []
    for i in range(3):
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        pages.append((ctx, StudioPage(ctx.new_page(), tmp_path)))
    try:
        for _, p in pages:
            p.open(url)
        for _, p in pages[:2]:
            p.upload("clone-ref-audio", PROMPT_EN)
            p.fill("clone-ref-text", PROMPT_EN_TEXT)
            p.fill("clone-text", "Two users at once.")
        for _, p in pages[:2]:
            p.page.locator("#clone-generate").click()
        t0 = time.monotonic()
        pages[2][1].tab("Server")  # a light event (server_view) while both generate
        pages[2][1].wait_text("#server-stats", "f5_tts", 10)
        light_s = time.monotonic() - t0
        for _, p in pages[:2]:
            p.page.wait_for_selector("#clone-metrics [data-metric='latency_s']", timeout=30_000)
        a, b = sorted(rt.fake.calls[-2:], key=lambda c: c["start"])
        print(f"\n[two users] generations overlapped by {a['end'] - b['start']:.2f} s; another page answered "
              f"in {light_s:.2f} s")
        assert b["start"] < a["end"], "the two generations ran one after the other"
        assert light_s < 3 * rt.fake.delay_s, "a light event waited behind the generations"
    finally:
        rt.fake.delay_s = before
        for ctx, _ in pages:
            ctx.close()


# --- the real thing: python app.py --demo-weights ----------------------------------------------------
@pytest.fixture(scope="module")
def real_url(tmp_path_factory):
    data = tmp_path_factory.mktemp("app-data")
    port, grpc_port = free_port(), free_port()
    log = open(data / "app.log", "wb")
    cmd = [sys.executable, "app.py", "--demo-weights", "--no-download", "--data-dir", str(data), "--port", str(port),
           "--http-port", str(free_port()), "--grpc-port", str(grpc_port), "--instances", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("app.py did not serve its page:\n" + (data / "app.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url, data, f"127.0.0.1:{grpc_port}"
    finally:
        proc.send_signal(signal.SIGTERM)  # app.py stops its tritonserver on SIGTERM
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


@pytest.fixture()
def real(browser, tmp_path, real_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = StudioPage(context.new_page(), tmp_path)
    page.data_dir, page.grpc_url = real_url[1], real_url[2]
    page.open(real_url[0], ready_timeout_s=REAL_START_TIMEOUT_S)
    yield page
    print(f"\nscreenshots: {tmp_path}")
    context.close()


def real_history(real) -> list[dict]:
    from studio.history import HistoryStore

    return HistoryStore(real.data_dir).records()


def test_real_page_comes_up_with_demo_banner(real):
    assert real.page.locator("#studio-demo-banner").is_visible()
    assert "noise" in real.page.locator("#studio-demo-banner").inner_text()
    real.shot("real-clone-tab")


def test_real_transcript_fill(real):
    """Uploading a prompt with F5 selected and no transcript fills the field with exactly what the asr
    model answers for that clip (asked here directly over gRPC), marked as the demo model's."""
    from studio.audio_io import load_audio
    from studio.client import StudioClient

    real.upload("clone-ref-audio", PROMPT_EN)
    value = wait_field(real, "clone-ref-text", bool, timeout_s=120)
    with StudioClient(real.grpc_url) as client:
        expected, info = client.transcribe(load_audio(PROMPT_EN, 16000), 16000)
    assert value == expected.strip() and info["demo_weights"]
    assert "DEMO" in real.page.locator("#clone-ref-note").inner_text()
    real.shot("real-transcript-filled")


@pytest.mark.parametrize("model", ["f5", "spark"])
@pytest.mark.parametrize("mode", ["streaming", "offline"])
def test_real_clone(real, model, mode):
    real.upload("clone-ref-audio", PROMPT_EN)
    real.fill("clone-ref-text", PROMPT_EN_TEXT)
    real.fill("clone-text", "The studio speaks through Triton.")
    real.radio("clone-model", model)
    real.radio("clone-mode", mode)
    if model == "f5":
        real.set_nfe(4)  # demo weights: quality is moot, time is not
    result = real.generate("clone", timeout_s=REAL_GENERATION_TIMEOUT_S)
    assert_played(result, f"real {model} {mode}")
    last = real_history(real)[0]
    assert (last["model"], last["mode"], last["status"]) == (model, mode, "ok")
    if model == "f5":
        assert last["params"]["nfe_steps"] == 4
    assert "DEMO" in result["demo_weights"]
    assert real.result_duration("clone") > 0.1
    real.shot(f"real-{model}-{mode}")


def test_real_voice_creation(real):
    real.tab("Voice creation (Spark)")
    real.fill("design-text", "A voice made from levels.")
    result = real.generate("design", timeout_s=REAL_GENERATION_TIMEOUT_S)
    assert_played(result, "real Spark voice creation")


def test_real_stop_cancels(real):
    real.upload("clone-ref-audio", PROMPT_EN)
    real.fill("clone-ref-text", PROMPT_EN_TEXT)
    real.fill("clone-text", " ".join(["This is a long text that keeps the model busy for a while."] * 12))
    real.radio("clone-mode", "streaming")
    real.set_nfe(4)
    real.page.locator("#clone-generate").click()
    real.wait_chunks("clone", 1, REAL_GENERATION_TIMEOUT_S)
    real.page.locator("#clone-stop").click()
    real.page.wait_for_selector("#clone-metrics [data-status='cancelled']", timeout=60_000)
    assert real.player("clone")["state"] == "stopped"
    assert real_history(real)[0]["status"] == "cancelled"


def test_real_voice_history_server(real):
    real.tab("Voices")
    real.fill("voices-name", "Real voice")
    real.upload("voices-audio", PROMPT_EN)
    real.fill("voices-text", PROMPT_EN_TEXT)
    real.page.locator("#voices-save").click()
    real.wait_text("#voices-table", "Real voice")
    real.page.locator("#voices-select input").click()
    real.page.get_by_role("option", name="Real voice").click()
    real.page.wait_for_selector("#voices-preview audio", state="attached", timeout=20_000)
    real.page.locator("#voices-use").click()
    real.page.wait_for_function("t => document.querySelector('#clone-ref-text textarea').value === t",
                                arg=PROMPT_EN_TEXT, timeout=20_000)
    real.fill("clone-text", "A saved voice, reused.")
    real.radio("clone-mode", "offline")
    real.set_nfe(4)
    assert_played(real.generate("clone", timeout_s=REAL_GENERATION_TIMEOUT_S), "real saved voice")
    real.tab("History")
    # the table refreshes after the generation is recorded: wait for this row before opening it
    real.wait_text("#history-table", "A saved voice", 30)
    real.page.locator("#history-table [data-testid='cell-0-1']").click()
    real.page.wait_for_function("() => (document.querySelector('#history-detail')?.innerText || '')"
                                ".includes('Real voice')", timeout=20_000)
    assert "Real voice" in real.page.locator("#history-detail").inner_text()
    real.shot("real-history")
    real.tab("Server")
    real.wait_text("#server-stats", "f5_tts", 30)
    assert real.page.locator("#server-log textarea").input_value().strip()
    real.shot("real-server")
