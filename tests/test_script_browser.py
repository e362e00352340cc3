"""The Script tab in a real browser (Debian chromium via Playwright; marker `browser`), over the session's real
tritonserver on demo weights: the first sound plays before the script's last segment is generated, the player
shows which line is speaking, and a script with problems lists them by line and generates nothing."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import have_chromium
from tests.test_browser import StudioPage, browser  # noqa: F401 - the module's browser fixture
from tests.test_script import CREATED, F5_FAST, script_page  # noqa: F401 - the page over the real server

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not have_chromium(), reason="needs Debian chromium (apt-get install -y chromium)")]

#: Five segments, one at a time: the last one is generated seconds after the first is heard.
LONG_SCRIPT = "\n".join([
    f"{{en_female|{F5_FAST}}} The first line plays while the rest are generated.",
    f"{{{CREATED}}} A created voice speaks second.",
    f"{{en_male|{F5_FAST}}} Then a second saved voice.",
    "",
    f"{{{CREATED}}} The created voice again, cloned from its first line.",
    f"{{en_female|{F5_FAST}}} And the last line of the script, a little longer than the others.",
])
TIMEOUT_S = 300


@pytest.fixture()
def studio(browser, tmp_path, script_page):  # noqa: F811 - pytest fixtures by name
    url, rt, _ = script_page
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    studio_page = StudioPage(context.new_page(), tmp_path)
    studio_page.open(url, ready_timeout_s=120)
    studio_page.tab("Script")
    yield studio_page, rt
    print(f"\nscreenshots: {tmp_path}")
    context.close()


def player(sp) -> dict:
    return sp.page.evaluate("() => window.studioPlayer.stats('script')")


def set_slider(sp, elem: str, value: int) -> None:
    box = sp.page.locator(f"#{elem} input[type=number]")
    box.fill(str(value))
    box.press("Tab")  # Gradio's number box commits on blur


def test_first_sound_before_the_last_segment_is_generated(studio):
    sp, rt = studio
    sp.fill("script-text", LONG_SCRIPT)
    sp.radio("script-mode", "offline")
    set_slider(sp, "script-concurrency", 1)
    sp.page.locator("#script-generate").click()
    # the preview appears at once, beside the generation
    sp.page.wait_for_selector("#script-plan [data-testid='cell-4-0']", state="attached", timeout=60_000)
    sp.page.wait_for_function("() => { const s = window.studioPlayer.stats('script'); return s && s.played; }",
                              timeout=TIMEOUT_S * 1000)
    at_first_sound = player(sp)
    sp.page.wait_for_function("() => (document.querySelector('#studio-player-script-line')?.textContent || '')"
                              ".includes('Line 1')", timeout=10_000)
    sp.shot("script-first-sound")
    assert at_first_sound["segments"] < 5, f"every segment had arrived before the first sound: {at_first_sound}"
    # the rest arrives; the player moves on line by line
    sp.page.wait_for_function("() => { const s = window.studioPlayer.stats('script'); return s && s.ended; }",
                              timeout=TIMEOUT_S * 1000)
    sp.page.wait_for_function("() => window.studioPlayer.stats('script').speaking === 5", timeout=60_000)
    assert "Line 6" in sp.page.locator("#studio-player-script-line").inner_text()
    end = player(sp)
    assert end["ended"]["status"] == "ok" and end["segments"] == 5
    sp.page.wait_for_function(
        "() => /\\d/.test(document.querySelector(\"#script-metrics [data-metric='latency_s']\")?.textContent || '')",
        timeout=60_000)
    assert sp.page.locator("#script-download").is_visible() and sp.page.locator("#script-zip").is_visible()
    sp.shot("script-done")
    # on the server's clock: the browser's first-sound report came before the last segment was ready
    deadline = time.monotonic() + 20
    while True:
        rec = next(r for r in rt.history.records() if r["kind"] == "script")
        if "browser_first_sound_s" in rec["metrics"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    last_ready = rec["segments"][-1]["metrics"]["ready_s"]
    heard = rec["metrics"]["browser_first_sound_s"]
    print(f"\n[script] first sound reported at {heard:.2f} s; last segment ready at {last_ready:.2f} s; "
          f"first audio arrival -> sound {rec['metrics'].get('first_sound_ms')} ms")
    assert heard < last_ready
    assert [s["line"] for s in rec["segments"]] == [1, 2, 3, 5, 6]


def test_problems_are_listed_by_line_and_nothing_is_generated(studio):
    sp, rt = studio
    before = len(rt.history.records())
    sp.fill("script-text", "{en_female} Fine.\n{en_femal} Misspelled.\n{en_male|f5:nfe_steps=0} Bad setting.")
    sp.page.locator("#script-preview").click()
    sp.page.wait_for_selector("#script-problem-list li[data-line='3']", timeout=30_000)
    text = sp.page.locator("#script-problem-list").inner_text()
    assert re.search(r"line 2: unknown voice \{en_femal\}; did you mean \{en_female\}", text)
    assert "line 3:" in text and "nfe_steps" in text
    sp.page.locator("#script-generate").click()
    sp.wait_toast("line 2")
    sp.page.wait_for_function("() => { const s = window.studioPlayer.stats('script'); return s && s.ended; }",
                              timeout=30_000)
    assert player(sp)["ended"]["status"] == "error" and player(sp)["chunks"] == 0
    assert len(rt.history.records()) == before
    sp.shot("script-problems")
