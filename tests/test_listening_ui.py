"""The page's Batch and Listening test tabs (studio/ui_qa.py) without a browser: a batch run started from the
tab (a files: system and a model system over the fake client), its progress and outputs, and an organiser's
session from creation to exported results. The browser side is tests/test_listening_browser.py."""

from __future__ import annotations

import json
import random
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from studio import listening
from studio.ui_qa import QAHandlers, page_origin
from tests.test_ui import FakeClient, FakeRuntime

TESTSET = "id,prompt,reference_text,target_text\nr1,en_female,,First line.\nr2,en_male,,Second line.\n"


class BatchFakeClient(FakeClient):
    """The fake client with the batch runner's keyword (a per-request timeout)."""

    def synthesize(self, *args, timeout_s=None, **kwargs):
        return super().synthesize(*args, **kwargs)


def files_system(folder: Path, rows=("r1", "r2"), freq=440.0) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(0.3 * 16000)) / 16000
    for row in rows:
        sf.write(folder / f"{row}.wav", (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
    return f"files:{folder}"


def path_of(update) -> str:
    """The file of a component update (Gradio 6 hands back FileData dicts)."""
    value = update.value
    return value["path"] if isinstance(value, dict) else str(value)


def wait_for(job, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while job.thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not job.thread.is_alive(), "the batch did not finish"


@pytest.fixture(autouse=True)
def instant_playback(monkeypatch):
    monkeypatch.setattr(listening, "EARLY_END_TOLERANCE_S", 1e9)  # clips "played" back to back


@pytest.fixture()
def q(tmp_path):
    return QAHandlers(FakeRuntime(tmp_path / "data", BatchFakeClient(chunks=1, chunk_s=0.3, delay_s=0.01)))


def test_batch_tab_runs_shows_progress_and_browses_outputs(q, tmp_path):
    import gradio as gr

    systems = "\n".join([files_system(tmp_path / "sysA"), "f5:nfe_steps=4", ""])
    name, progress, timer, runs = q.batch_clicked(None, TESTSET, systems, "tab run", 2)
    assert name == "tab run" and timer.active and runs.value == "tab run"
    wait_for(q.jobs[name])
    *_, current, timer = q.pick_run(name)
    assert current == gr.skip() and timer == gr.skip(), "picking a finished run does not start polling"
    html, timer, table, rows = q.batch_tick(name, name)
    assert not timer.active, "polling stops when the run ends"
    assert rows == ["r1", "r2"], "and the outputs table of the run is redrawn once"
    assert 'data-done="4" data-total="4" data-failed="0"' in html and "done" in html
    table, row_ids, _ = q.outputs_view(name)
    assert row_ids == ["r1", "r2"]
    assert table.value["headers"][:2] == ["Row", "Target text"] and table.value["headers"][3] == "f5:nfe_steps=4"
    assert [row[2:] for row in table.value["data"]] == [["done 0.3 s", "done 0.3 s"]] * 2

    class Select:
        index = [1, 0]

    *players, text = q.select_row(name, row_ids, Select())
    assert "Second line." in text
    assert players[0].visible and Path(path_of(players[0])).is_file(), "the row's prompt"
    shown = [p for p in players[1:] if p.visible]
    assert len(shown) == 2 and all(Path(path_of(p)).is_file() for p in shown)
    assert all(not path_of(p).startswith(str(q.rt.options.data_dir)) for p in shown), "cache copies, not data"
    # a session over it shows the model system's timings beside the (still empty) ratings
    q.create_session("timings", "mos", name, ["f5:nfe_steps=4"], 2, 1, "", FakeRequest())
    *_, objective, _, _, _ = q.results("timings")
    assert objective.visible and objective.value["headers"][:3] == ["System", "latency_s (mean)",
                                                                     "first_chunk_s (mean)"]
    assert [row[0] for row in objective.value["data"]] == ["f5:nfe_steps=4"]
    # resuming a finished run by name has nothing left to do
    q.batch_clicked(None, "", "", "tab run", 1)
    wait_for(q.jobs[name])
    assert 'data-done="4"' in q.progress_html(name)


def test_batch_tab_reports_problems(q, tmp_path):
    import gradio as gr

    with pytest.raises(gr.Error, match="no run called 'nothing'"):
        q.batch_clicked(None, "", "f5", "nothing", 1)
    with pytest.raises(gr.Error, match="missing column"):
        q.batch_clicked(None, "id,prompt\nr1,en_female", "f5", "bad", 1)
    with pytest.raises(gr.Error, match="nfe_steps"):
        q.batch_clicked(None, TESTSET, "f5:nfe_steps=0", "bad", 1)
    starting = QAHandlers(FakeRuntime(tmp_path / "d2", state="starting"))
    with pytest.raises(gr.Error, match="still starting"):
        starting.batch_clicked(None, TESTSET, "f5", "later", 1)
    with pytest.raises(gr.Error, match="No run started"):
        q.stop_batch("nope")


class FakeRequest:
    headers = {"host": "studio.example:7860"}


def test_listening_tab_from_session_to_exports(q, tmp_path):
    import gradio as gr

    systems = [files_system(tmp_path / "old_tts", freq=300), files_system(tmp_path / "new_tts", freq=500)]
    name, *_ = q.batch_clicked(None, TESTSET, "\n".join(systems), "ab run", 1)
    wait_for(q.jobs[name])
    group = q.run_systems(name)
    assert [v for _, v in group.choices] == systems and group.value == systems
    with pytest.raises(gr.Error, match="mention"):
        q.create_session("s", "ab", name, systems, 4, 2, "new_tts is the new one", FakeRequest())
    dropdown, links, progress = q.create_session("ab session", "ab", name, systems, 4, 2, "Headphones, please.",
                                                 FakeRequest())
    assert dropdown.value == "ab session"
    assert links.count("data-rater=") == 2 and 'href="http://studio.example:7860/qa/r/' in links
    assert 'href="http://studio.example:7860/qa/join/' in links
    assert [row[2:4] for row in progress.value["data"]] == [[0, 2], [0, 2]]
    links, progress = q.add_links("ab session", 1, FakeRequest())
    assert links.count("data-rater=") == 3
    store = q.store()
    s = listening.get_session(store, "ab session")
    rng = random.Random(2)
    for r in listening.raters_of(store, s):
        while (view := listening.rater_view(store, r["token"])).item is not None:
            for clip in listening.CLIPS["ab"]:
                listening.clip_file(store, r["token"], view.item.id, clip)
                listening.record_played(store, r["token"], view.item.id, clip)
            listening.submit_answer(store, r["token"], view.item.id, choice=rng.choice(listening.AB_CHOICES))
    summary, table, pairs, objective, plot, json_btn, csv_btn = q.results("ab session")
    assert not pairs.visible, "A/B has its own table"
    assert not objective.visible, "files: outputs carry no timings"
    assert "6 answers" in summary and table.value["data"][0][:2] == sorted(systems)
    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    data = json.loads(Path(path_of(json_btn)).read_text())
    assert data["answers"] == 6 and len(data["records"]) == 6
    names = zipfile.ZipFile(path_of(csv_btn)).namelist()
    assert {"ab.csv", "answers.csv", "ratings.csv"} <= set(names)


def test_page_origin():
    assert page_origin(None) == ""
    assert page_origin(FakeRequest()) == "http://studio.example:7860"

    class Proxied:
        headers = {"Host": "10.0.0.2", "X-Forwarded-Host": "qa.example.org", "X-Forwarded-Proto": "https",
                   "X-Forwarded-Prefix": "/studio/"}

    assert page_origin(Proxied()) == "https://qa.example.org/studio"


def test_rater_routes_are_mounted_on_the_page(tmp_path):
    from studio.ui import launch_kwargs

    rt = FakeRuntime(tmp_path / "data")
    paths = [r.path for r in launch_kwargs(rt)["app_kwargs"]["routes"]]
    assert "/qa/r/{token}" in paths and "/qa/r/{token}/audio/{item_id}/{clip}" in paths
    assert not any(str(rt.options.data_dir) in p for p in launch_kwargs(rt)["allowed_paths"]), \
        "the data folder is never served directly"


def test_history_and_voice_files_reach_the_page_as_cache_copies(tmp_path):
    """Nothing of the data folder is served directly, so every file a handler hands the page is a copy in
    Gradio's own upload cache (which Gradio serves and accepts back as an input)."""
    from gradio.utils import get_upload_folder

    from studio.ui import Handlers
    from tests.test_ui import PROMPT

    rt = FakeRuntime(tmp_path / "data")
    h = Handlers(rt, autostart=False)
    cache = Path(get_upload_folder()).resolve()
    audio, _, download, record_id, *_ = h.clone(
        str(PROMPT), "The quiet harbour.", "Hello.", "f5", "offline", 8, 2.0, -1.0, 1.0, 0.8, 50, 0.95, 3000, 1,
        "wav", None, "")
    plot, _, _ = h.history_view()
    clip, _, _ = h.show_voice("sample:en_female")
    for path in (audio, h.picture(record_id), plot, clip, path_of(download)):
        assert Path(path).resolve().is_relative_to(cache), path
    assert Path(path_of(download)).name == f"voice-studio-{record_id}.wav", "downloads keep their name"
    assert all(not Path(p).resolve().is_relative_to((tmp_path / "data").resolve()) for p in rt.allowed_paths())
