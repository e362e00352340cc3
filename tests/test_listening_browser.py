"""Listening tests in a real browser (Debian chromium via Playwright; marker `browser`).

The studio page runs in this process over the fake Triton client (tests/test_ui.py) with a synthetic
batch run in its store (tests/test_listening.py). A rater on a phone-sized screen joins a blind A/B
session through its shared link, plays every clip, answers every item and finishes; nothing the browser
received or requested (HTML, URLs, response headers) may name a system, a model or an output file.
Then the organiser's Listening test tab shows a session's results; its screenshot is kept as
docs/listening-results.png (the rater's phone view as docs/listening-rater.png) for the README when
STUDIO_UPDATE_DOCS=1.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from studio import listening
from tests.conftest import have_chromium
from tests.test_browser import CHROMIUM_ARGS, free_port
from tests.test_listening import SYSTEMS, make_run, mentions, secret_words

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not have_chromium(), reason="needs Debian chromium (apt-get install -y chromium)")]

DOCS = Path(__file__).resolve().parent.parent / "docs"
PHONE = dict(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from studio.store import open_store
    from studio.ui import build_demo, launch_kwargs
    from tests.test_ui import FakeRuntime

    rt = FakeRuntime(tmp_path_factory.mktemp("qa-data"))
    store = open_store(rt.options.data_dir)
    run_id = make_run(store, name="nightly-run")
    demo = build_demo(rt, autostart=False)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(rt))
    yield f"http://127.0.0.1:{port}", store, run_id
    demo.close()


def keep_shot(path: Path, name: str) -> Path:
    """The screenshot's path; with STUDIO_UPDATE_DOCS=1 it is also copied to docs/NAME (the README's pictures)."""
    if os.environ.get("STUDIO_UPDATE_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / name)
        return DOCS / name
    return path


class Traffic:
    """Everything a page asked for and got back: URLs and response headers as text."""

    def __init__(self, page):
        self.urls: list[str] = []
        self.headers: list[str] = []
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("response", lambda r: self.headers.append(f"{r.url} " + " ".join(f"{k}: {v}" for k, v in
                                                                                  r.headers.items())))


def test_rater_runs_a_blind_ab_session_on_a_phone(app, browser, tmp_path):
    url, store, run_id = app
    session = listening.create_session(store, name="nightly f5 vs spark", kind="ab", run_id=run_id,
                                       systems=list(SYSTEMS)[:2], items_per_rater=3,
                                       instructions="Pick the clip that sounds more natural.")
    context = browser.new_context(**PHONE)
    page = context.new_page()
    traffic = Traffic(page)
    html_seen: list[str] = []
    try:
        page.goto(f"{url}/qa/join/{session.join_token}")
        html_seen.append(page.content())
        page.get_by_role("button", name="Start").click()
        page.wait_for_selector("#item", timeout=20_000)
        answered = 0
        while page.locator("#done").count() == 0:
            html_seen.append(page.content())
            progress = page.locator(".progress").inner_text()
            assert progress == f"Item {answered + 1} of 3"
            submit = page.locator(".submit")
            assert submit.is_disabled(), "no answer before the clips are played"
            for clip in ("a", "b"):
                page.locator(f'.clip[data-clip="{clip}"] .play').click()
                page.wait_for_selector(f'.clip[data-clip="{clip}"][data-played="1"]', timeout=20_000)
            choice = ["A", "B", "none"][answered % 3]
            page.locator(f'input[name="choice"][value="{choice}"]').check()
            if choice == "B":
                page.locator("#reason").fill("sounds smoother")
            if answered == 0:
                page.screenshot(path=str(tmp_path / "rater-phone.png"), full_page=True)
            assert not submit.is_disabled()
            submit.click()
            answered += 1
            page.wait_for_function(f"() => !!document.getElementById('done') || "
                                   f"document.querySelector('.progress').innerText === 'Item {answered + 1} of 3'",
                                   timeout=20_000)
        html_seen.append(page.content())
        assert answered == 3 and "All 3 items are answered" in page.locator("#done").inner_text()
        # coming back to the link later: still done, nothing to redo
        page.goto(f"{url}/qa/join/{session.join_token}")
        assert page.locator("#done").count() == 1
    finally:
        context.close()
    recs = listening.answer_records(store, session)
    assert [r["side"] for r in recs] == ["A", "B", "none"] and recs[1]["reason"] == "sounds smoother"
    leaks = [(word, where) for word in secret_words(store)
             for where in [*html_seen, *traffic.urls, *traffic.headers] if mentions(word, where)]
    assert not leaks, f"the rater's browser saw {leaks[0][0]!r} in: {leaks[0][1][:300]}"
    assert any("/audio/" in u for u in traffic.urls), "the clips came through the checked route"
    print(f"\n[rater] {len(traffic.urls)} requests, {len(html_seen)} pages checked; screenshot "
          f"{keep_shot(tmp_path / 'rater-phone.png', 'listening-rater.png')}")


def test_organiser_sees_progress_and_results(app, browser, tmp_path, monkeypatch):
    url, store, run_id = app
    monkeypatch.setattr(listening, "EARLY_END_TOLERANCE_S", 1e9)  # made-up raters "play" clips back to back
    session = listening.create_session(store, name="nightly MOS", kind="mos", run_id=run_id, systems=list(SYSTEMS),
                                       items_per_rater=12, raters=5, instructions="Rate how natural each clip is.")
    rng = random.Random(7)
    bias = {s: b for s, b in zip(SYSTEMS, (1.0, -0.6, 0.4))}  # made-up system differences for a readable plot
    for r in listening.raters_of(store, session):
        while (view := listening.rater_view(store, r["token"])).item is not None:
            for clip in listening.CLIPS["mos"]:
                listening.clip_file(store, r["token"], view.item.id, clip)
                listening.record_played(store, r["token"], view.item.id, clip)
            system = store.query_one("SELECT system_a FROM rater_items WHERE id = ?", (view.item.id,))[0]
            score = min(5, max(1, round(3.2 + bias[system] + rng.gauss(0, 0.8))))
            listening.submit_answer(store, r["token"], view.item.id, score=score)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("#studio-banner", timeout=60_000)
        page.get_by_role("tab", name="Listening test").click()
        page.locator("#qa-new").get_by_text("New session").first.click()  # fold the form away
        page.locator("#qa-session-select input").click()
        page.get_by_role("option", name="nightly MOS").click()
        page.wait_for_function("() => (document.querySelector('#qa-progress')?.innerText || '').includes('rater 5')",
                               timeout=20_000)
        assert page.locator("#qa-links a[data-rater]").count() == 5
        page.locator("#qa-results").click()
        page.wait_for_selector("#qa-plot img", timeout=30_000)
        page.wait_for_function("() => (document.querySelector('#qa-summary')?.innerText || '').includes('60 answers')",
                               timeout=20_000)
        table = page.locator("#qa-results-table").inner_text()
        assert all(s in table for s in SYSTEMS)
        assert "Mean X - Y" in page.locator("#qa-results-pairs").inner_text()
        assert "Krippendorff" in page.locator("#qa-summary").inner_text()
        assert page.locator("#qa-json").is_visible() and page.locator("#qa-csv").is_visible()
        time.sleep(0.5)  # let the image finish decoding before the picture is taken
        shot = tmp_path / "organiser-results.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        context.close()
    print(f"\n[organiser] screenshot {keep_shot(shot, 'listening-results.png')}")


def test_batch_tab_and_session_form_in_the_page(app, browser, tmp_path):
    """The organiser's clicks: paste a test set, two files: systems, Run; progress reaches the end; a row's
    outputs play side by side; then an A/B session made with the form gets its rater links."""
    from tests.test_listening_ui import files_system

    url, store, _ = app
    systems = [files_system(tmp_path / "take_one", freq=300), files_system(tmp_path / "take_two", freq=600)]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("#studio-banner", timeout=60_000)
        page.get_by_role("tab", name="Batch").click()
        page.locator("#batch-testset-text textarea").fill(
            "id,prompt,reference_text,target_text\nr1,en_female,,First line.\nr2,en_male,,Second line.")
        page.locator("#batch-systems textarea").fill("\n".join(systems))
        page.locator("#batch-name textarea, #batch-name input[type=text]").first.fill("page run")
        page.locator("#batch-run").click()
        page.wait_for_selector('#batch-state[data-done="4"][data-total="4"]', timeout=60_000)
        page.wait_for_function("() => document.querySelector('#batch-state').dataset.status === 'done'",
                               timeout=30_000)
        # Run put the run into the outputs picker; its table is redrawn when the run ends
        page.wait_for_function("() => ((document.querySelector('#batch-outputs')?.innerText || '')"
                               ".match(/done 0.3 s/g) || []).length === 4", timeout=20_000)
        page.locator("#batch-outputs [data-testid='cell-1-0']").click()
        page.wait_for_selector("#batch-audio-1 audio, #batch-audio-1 [data-testid='waveform-controls']",
                               state="attached", timeout=20_000)
        assert "Second line." in page.locator("#batch-row-text").inner_text()
        assert page.locator("#batch-prompt-audio").is_visible() and page.locator("#batch-audio-0").is_visible()
        assert page.locator("#batch-outputs").inner_text().count("done 0.3 s") == 4, "every output, once finished"
        page.screenshot(path=str(tmp_path / "batch.png"), full_page=True)

        page.get_by_role("tab", name="Listening test").click()
        page.locator("#qa-name textarea, #qa-name input[type=text]").first.fill("page ab")
        page.locator("#qa-kind input[value='ab']").check()
        page.locator("#qa-run input").click()
        page.get_by_role("option", name="page run").click()
        page.wait_for_function("() => document.querySelectorAll('#qa-systems input:checked').length === 2",
                               timeout=20_000)
        page.locator("#qa-raters input").fill("2")
        page.locator("#qa-create").click()
        page.wait_for_function("() => document.querySelectorAll('#qa-links a[data-rater]').length === 2",
                               timeout=20_000)
        join = page.locator("#qa-join-link").get_attribute("href")
        assert join.startswith(url + "/qa/join/")
    finally:
        context.close()
    s = listening.get_session(store, "page ab")
    assert s.kind == "ab" and sorted(s.systems) == sorted(systems) and len(listening.raters_of(store, s)) == 2
    print(f"\n[batch tab] screenshot {keep_shot(tmp_path / 'batch.png', 'batch-tab.png')}")
