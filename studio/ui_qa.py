"""The page's QA tabs: **Batch** (test set x systems -> stored outputs) and **Listening test** (the organiser's view).

Batch: a test set (uploaded CSV/TSV or pasted rows) and systems (one per line, `studio/systems.py`
grammar) start a run of `studio/batch.py` in a background thread; a timer polls its progress (outputs
done / total, ETA, failures); the outputs of any run can be browsed row by row, one player per system.

Listening test: make an A/B, MOS or SMOS session from a run (`studio/listening.py`), share its join link
or per-rater links (served by `studio/qa_routes.py`, never through Gradio), watch answers per rater,
and see the results (table and plot from `studio/qa_stats.py`) with JSON and CSV exports.

Handlers are plain methods of `QAHandlers` over the page's StudioRuntime; problems become `gr.Error`.
Audio and pictures from the data folder reach the organiser's page as Gradio cache copies
(`studio/ui_files.py`).
"""

from __future__ import annotations

import html
import shutil
import threading
import time

import gradio as gr

from studio import listening
from studio.qa_routes import ROUTE_PREFIX
from studio.ui_files import page_copy

#: Players shown side by side for one batch row (systems beyond this are listed, not played).
MAX_SYSTEM_PLAYERS = 6
#: Progress polling while a batch runs, and the listening progress refresh (s).
BATCH_POLL_S, LISTENING_POLL_S = 1.0, 5.0
LIGHT = dict(concurrency_limit=16, api_visibility="private")
QUIET = dict(LIGHT, show_progress="hidden")
SYSTEMS_PLACEHOLDER = "f5:nfe_steps=16\nspark:temperature=0.6\nfiles:/path/to/folder_of_ROW_ID.wav"
TESTSET_PLACEHOLDER = ("id,prompt,reference_text,target_text\n"
                       "r1,en_female,,The quick brown fox jumps over the lazy dog.")
KIND_CHOICES = [("A/B preference", "ab"), ("MOS: naturalness 1-5", "mos"), ("SMOS: speaker similarity 1-5", "smos")]
DEFAULT_INSTRUCTIONS = ("Listen with headphones in a quiet place. Play each clip to the end before answering; "
                        "you may replay as often as you like.")


def user_error(message: str, title: str = "Cannot do that") -> gr.Error:
    return gr.Error(message, title=title, print_exception=False)


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def running(job) -> bool:
    """Whether a `studio.batch.BatchJob` still has its thread going."""
    return job is not None and job.thread.is_alive()


class QAHandlers:
    """Batch and listening-test handlers over one StudioRuntime (the store lives in its data folder)."""

    def __init__(self, rt):
        self.rt = rt
        self.jobs: dict = {}  # run name -> studio.batch.BatchJob started from this page
        self._lock = threading.Lock()

    def store(self):
        from studio.store import open_store

        return open_store(self.rt.options.data_dir)

    # --- batch: starting and watching a run -----------------------------------------------------------
    def run_names(self) -> list[str]:
        return [r["name"] for r in self.store().query("SELECT name FROM batch_runs ORDER BY id DESC")]

    def start_batch(self, file, pasted, systems_text, name, concurrency, checks=False):
        """Check everything, create (or resume) the run, start it in a thread; returns the run's name."""
        from studio.batch import BatchInputError, BatchJob, parse_test_set, prepare_run, read_test_set

        systems = [line.strip() for line in (systems_text or "").splitlines() if line.strip()]
        try:
            if file:
                test_set = read_test_set(file)
            elif (pasted or "").strip():
                test_set = parse_test_set(pasted, source="pasted")
            else:
                test_set = None  # resume an existing run by name
            with self._lock:
                if running(self.jobs.get((name or "").strip())):
                    raise BatchInputError(f"run {name.strip()!r} is running already; wait for it or stop it")
            run = prepare_run(self.store(), name, test_set, systems, self.rt.voices, concurrency=int(concurrency))
        except BatchInputError as exc:
            raise user_error(str(exc), "Cannot start the batch") from None
        families = sorted({s.family for s in run.systems if not s.is_files})
        streams = {s.family: s.stream for s in run.systems if not s.is_files}
        client = None
        if checks and not families:  # files: systems only: the checks still need the check models' client
            client = self.rt.client()
        if families:
            from studio.ui_runtime import NotReady

            try:
                for family in families:
                    self.rt.require(family, streams[family])
                client = self.rt.client()
            except NotReady as exc:
                raise user_error(str(exc), "Cannot start the batch") from None
        with self._lock:
            self.jobs[run.name] = BatchJob(self.store(), run, client, voices=self.rt.voices,
                                           checks=bool(checks)).start()
        return run.name

    def stop_batch(self, name):
        job = self.jobs.get(name or "")
        if not running(job):
            raise user_error("No run started from this page is running.")
        job.stop()
        gr.Info("Stopping after the outputs in flight; start the same run name again to resume.")

    def progress_html(self, name) -> str:
        """The run's progress: outputs done / total, failures, ETA, and per-system counts from the store."""
        from studio.batch import run_summary

        if not name:
            return "<p>No run yet.</p>"
        try:
            summary = run_summary(self.store(), name)
        except KeyError:
            return f"<p>No run called {esc(name)}.</p>"
        job = self.jobs.get(name)
        p = job.progress() if job else {}
        total = len(summary["systems"]) * summary["rows"]
        done = sum(c["done"] for c in summary["systems"].values())
        failed = sum(c["failed"] for c in summary["systems"].values())
        status = "running" if running(job) else summary["status"]
        eta = p.get("eta_s")
        head = (f'<div id="batch-state" data-status="{esc(status)}" data-done="{done}" data-total="{total}" '
                f'data-failed="{failed}"><b>{esc(name)}</b>: {esc(status)}. {done}/{total} outputs done '
                f"({summary['rows']} rows x {len(summary['systems'])} systems), {failed} failed")
        if running(job) and eta is not None:
            head += f", about {eta:.0f} s left"
        if p.get("elapsed_s") is not None and job:
            head += f", {p['elapsed_s']:.0f} s elapsed"
        head += ".</div>"
        meter = (f'<div style="height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden;margin:6px 0">'
                 f'<div style="height:100%;width:{100 * done / max(1, total):.0f}%;background:#2563eb"></div></div>')
        rows = "".join(f"<tr><td><code>{esc(spec)}</code></td><td>{c['done']}/{c['rows']}</td>"
                       f"<td>{c['failed']}</td></tr>" for spec, c in summary["systems"].items())
        table = (f'<table class="studio-metrics"><tr><th>System</th><th>Done</th><th>Failed</th></tr>{rows}</table>')
        fails = "".join(f"<li><code>{esc(f['system'])}</code> / {esc(f['row_id'])}: {esc(f['error'])}</li>"
                        for f in summary["failures"][:10])
        errors = f"<p><b>Failures</b></p><ul>{fails}</ul>" if fails else ""
        if job and job.error:
            errors += f'<p style="color:#b91c1c"><b>The run stopped with an error:</b> {esc(job.error)}</p>'
        return head + meter + table + errors

    def batch_clicked(self, file, pasted, systems_text, name, concurrency, checks=False):
        started = self.start_batch(file, pasted, systems_text, name, concurrency, checks)
        return (started, self.progress_html(started), gr.Timer(active=True),
                gr.Dropdown(choices=self.run_names(), value=started))

    def batch_tick(self, name, shown):
        """Progress while the run goes; when it ends, polling stops and the outputs table (if it shows this
        run) is refreshed once. While it runs the table is left alone: Refresh redraws it on demand."""
        if running(self.jobs.get(name or "")):
            return self.progress_html(name), gr.Timer(active=True), gr.skip(), gr.skip()
        table, rows = (self.outputs_view(shown)[:2] if shown and shown == name else (gr.skip(), gr.skip()))
        return self.progress_html(name), gr.Timer(active=False), table, rows

    # --- batch: browsing outputs --------------------------------------------------------------------------
    def outputs_view(self, name):
        """The run's rows: id, target text and each system's status; plus the row ids for selection."""
        from studio.batch import run_outputs, run_summary

        if not name:
            return gr.Dataframe(value=[], headers=["Row", "Target text"]), [], self.progress_html(None)
        try:
            summary = run_summary(self.store(), name)
        except KeyError:
            raise user_error(f"No run called {name!r}.") from None
        systems = list(summary["systems"])
        outputs = run_outputs(self.store(), name)
        by_row: dict[str, dict] = {}
        rows_info = self.store().query("SELECT row_id, target_text FROM batch_rows WHERE run_id = ? ORDER BY position",
                                       (summary["id"],))
        for o in outputs:
            by_row.setdefault(o["row_id"], {})[o["system"]] = o
        table = []
        for r in rows_info:
            cells = [r["row_id"], r["target_text"] if len(r["target_text"]) <= 60 else r["target_text"][:57] + "..."]
            for spec in systems:
                o = by_row.get(r["row_id"], {}).get(spec)
                if o is None:
                    cells.append("")
                elif o["status"] == "done":
                    secs = (o["metrics"] or {}).get("audio_s")
                    cells.append(f"done {secs:.1f} s" if isinstance(secs, (int, float)) else "done")
                else:
                    cells.append("failed")
            table.append(cells)
        headers = ["Row", "Target text"] + systems
        return (gr.Dataframe(value=table, headers=headers), [r["row_id"] for r in rows_info],
                self.progress_html(name))

    def pick_run(self, name):
        """A run chosen in the outputs picker: its table and progress; a run still going (say, after the
        page was reloaded) becomes the one the timer polls again."""
        table, rows, progress = self.outputs_view(name)
        if running(self.jobs.get(name or "")):
            return table, rows, progress, name, gr.Timer(active=True)
        return table, rows, progress, gr.skip(), gr.skip()

    def select_row(self, name, row_ids, evt: gr.SelectData):
        """Players for one row: its prompt, then each system's output (labels name the system)."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not name or not row_ids or row is None or not 0 <= row < len(row_ids):
            return [gr.Audio(visible=False)] * (MAX_SYSTEM_PLAYERS + 1) + [""]
        from studio.batch import run_summary

        store = self.store()
        summary = run_summary(store, name)
        row_id = row_ids[row]
        info = store.query_one("SELECT * FROM batch_rows WHERE run_id = ? AND row_id = ?", (summary["id"], row_id))
        try:
            prompt = page_copy(listening.prompt_file(store, summary["id"], row_id))
        except listening.ListeningError:
            prompt = None
        players = [gr.Audio(value=prompt, label=f"{row_id}: prompt", visible=prompt is not None)]
        outs = {o["system"]: o for o in store.query("SELECT * FROM batch_outputs WHERE run_id = ? AND row_id = ?",
                                                     (summary["id"], row_id))}
        systems = list(summary["systems"])
        for i in range(MAX_SYSTEM_PLAYERS):
            if i >= len(systems):
                players.append(gr.Audio(value=None, visible=False))
                continue
            o = outs.get(systems[i])
            path = store.file(o["audio_path"]) if o is not None and o["status"] == "done" else None
            label = systems[i] + ("" if path else (" (failed)" if o is not None else " (not yet)"))
            players.append(gr.Audio(value=page_copy(path), label=label, visible=True))
        extra = "" if len(systems) <= MAX_SYSTEM_PLAYERS else (
            f"{len(systems) - MAX_SYSTEM_PLAYERS} more systems are not shown here.")
        text = (f"**{esc(row_id)}**: {esc(info['target_text'])}" if info is not None else "") + (
            f"\n\n{extra}" if extra else "")
        return players + [text]

    # --- listening tests --------------------------------------------------------------------------------
    def session_names(self) -> list[str]:
        return [s.name for s in listening.list_sessions(self.store())]

    def run_systems(self, run_name):
        """The chosen run's systems (those with finished outputs), all ticked."""
        if not run_name:
            return gr.CheckboxGroup(choices=[], value=[])
        store = self.store()
        run = store.query_one("SELECT id FROM batch_runs WHERE name = ?", (run_name,))
        if run is None:
            return gr.CheckboxGroup(choices=[], value=[])
        done = listening.done_outputs(store.connection(), run["id"])
        specs = listening.run_systems(store, run["id"])
        choices = [(f"{s} ({len(done.get(s, ()))} outputs)", s) for s in specs]
        return gr.CheckboxGroup(choices=choices, value=[s for s in specs if done.get(s)])

    def create_session(self, name, kind, run_name, systems, items, raters, instructions, request: gr.Request):
        store = self.store()
        run = store.query_one("SELECT id FROM batch_runs WHERE name = ?", (run_name or "",))
        if run is None:
            raise user_error("Pick the batch run whose outputs the raters will hear.", "Cannot create the session")
        try:
            session = listening.create_session(store, name=name, kind=kind, run_id=run["id"], systems=systems or [],
                                               items_per_rater=items, instructions=instructions, raters=raters)
        except listening.ListeningError as exc:
            raise user_error(str(exc), "Cannot create the session") from None
        gr.Info(f"Session {session.name!r} created. Share its links below.")
        return (gr.Dropdown(choices=self.session_names(), value=session.name),
                *self.session_view(session.name, request))

    def _session(self, name) -> listening.Session:
        try:
            return listening.get_session(self.store(), name)
        except listening.ListeningError as exc:
            raise user_error(str(exc)) from None

    def session_view(self, name, request: gr.Request | None = None):
        """Links and progress of a session."""
        if not name:
            return "<p>Create or pick a session.</p>", gr.Dataframe(value=[])
        s = self._session(name)
        origin = page_origin(request)
        raters = listening.raters_of(self.store(), s)
        join = f"{origin}{ROUTE_PREFIX}/join/{s.join_token}"
        links = "".join(
            f'<tr><td>{esc(r["label"])}</td><td><a href="{esc(origin)}{ROUTE_PREFIX}/r/{esc(r["token"])}" '
            f'target="_blank" rel="noreferrer" data-rater="{r["slot"]}">{esc(origin)}{ROUTE_PREFIX}/r/{esc(r["token"])}'
            f'</a></td><td>{r["answered"]}/{r["total"]}</td></tr>' for r in raters)
        body = (f'<div id="qa-session" data-kind="{esc(s.kind)}"><p><b>{esc(s.name)}</b>: '
                f'{esc(listening.KINDS[s.kind])}, {s.items_per_rater} items per rater, systems '
                + ", ".join(f"<code>{esc(x)}</code>" for x in s.systems) + "</p>"
                f'<p>Join link (each visitor becomes a new rater): <a id="qa-join-link" href="{esc(join)}" '
                f'target="_blank" rel="noreferrer">{esc(join)}</a></p>'
                + (f'<table class="studio-metrics"><tr><th>Rater</th><th>Personal link</th><th>Answered</th></tr>'
                   f"{links}</table>" if raters else "<p>No raters yet.</p>") + "</div>")
        progress = [[r["label"], r["via"], r["answered"], r["total"],
                     (r["last"] or "").replace("T", " ").rstrip("Z")] for r in raters]
        return body, gr.Dataframe(value=progress, headers=["Rater", "Via", "Answered", "Items", "Last answer (UTC)"])

    def session_progress(self, name):
        """Only the progress table (the timer's refresh leaves the links alone, so copying one is not
        interrupted)."""
        if not name:
            return gr.skip()
        return self.session_view(name)[1]

    def refresh_sessions(self, name, request: gr.Request):
        """Session choices (another organiser may have made one) and the chosen session's view."""
        names = self.session_names()
        return (gr.Dropdown(choices=names, value=name if name in names else None),
                *self.session_view(name if name in names else None, request))

    def add_links(self, name, count, request: gr.Request):
        if not name:
            raise user_error("Pick a session first.")
        try:
            listening.add_raters(self.store(), self._session(name), int(count or 0))
        except (listening.ListeningError, ValueError) as exc:
            raise user_error(str(exc)) from None
        return self.session_view(name, request)

    def results(self, name):
        """Results table, plot and exports (JSON; CSV tables zipped) of a session."""
        if not name:
            raise user_error("Pick a session to see its results.")
        s = self._session(name)
        store = self.store()
        folder = store.root / "listening" / f"session-{s.id}" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        files = listening.export(store, s, folder)
        rep = listening.report(store, s)
        headers, rows = listening.results_table(rep, s.kind)
        archive = shutil.make_archive(str(folder / f"{files['json'].stem}-csv"), "zip", files["csv_dir"])
        summary = (f"**{rep['answers']} answers** from {len(listening.raters_of(store, s))} raters. "
                   + ("Intervals: 95 % two-way bootstrap over raters and items; pairs below: Wilcoxon signed-rank "
                      "over shared items, Holm-corrected." if s.kind != "ab" else
                      "p: exact sign test over preferences (no-preference answers left out), Holm-corrected."))
        if listening.agreement_line(rep):
            summary += f" {listening.agreement_line(rep)}."
        pair_headers, pair_rows = listening.pairs_table(rep)
        pairs = gr.Dataframe(value=pair_rows, headers=pair_headers, visible=s.kind != "ab" and bool(pair_rows))
        obj_headers, obj_rows = listening.objective_table(rep)
        objective = gr.Dataframe(value=obj_rows, headers=obj_headers, visible=bool(obj_rows))
        return (summary, gr.Dataframe(value=rows, headers=headers), pairs, objective, page_copy(files["plot"]),
                gr.DownloadButton("Download JSON", value=page_copy(files["json"]), visible=True),
                gr.DownloadButton("Download CSV (zip)", value=page_copy(archive), visible=True))


def page_origin(request: gr.Request | None) -> str:
    """scheme://host[:port] the organiser reached the page at (proxies' forwarded headers first), for
    absolute links they can copy. Empty (relative links) when unknown."""
    if request is None:
        return ""
    headers = {k.lower(): v for k, v in dict(getattr(request, "headers", {}) or {}).items()}
    host = (headers.get("x-forwarded-host") or headers.get("host") or "").split(",")[0].strip()
    if not host:
        return ""
    proto = (headers.get("x-forwarded-proto") or "http").split(",")[0].strip()
    prefix = (headers.get("x-forwarded-prefix") or "").rstrip("/")
    return f"{proto}://{host}{prefix}"


# --- layout ---------------------------------------------------------------------------------------------------
def qa_tabs(rt) -> QAHandlers:
    """The Batch and Listening test tabs, laid out and wired (call inside the page's gr.Tabs)."""
    q = QAHandlers(rt)
    with gr.Tab("Batch", id="batch", elem_id="tab-batch") as tab_batch:
        gr.Markdown("Generate a **test set** with several **systems** for listening tests. Test set columns: "
                    "`id, prompt, reference_text, target_text[, seed]`; `prompt` is a voice name from the library "
                    "or an audio file's absolute path on this machine. Systems, one per line: `f5:nfe_steps=16`, "
                    "`spark:temperature=0.6`, `files:FOLDER` (ready-made `ROW_ID.wav` files). Starting an existing "
                    "run name resumes it.")
        with gr.Row(equal_height=False):
            with gr.Column():
                b_file = gr.File(label="Test set (CSV / TSV)", file_types=[".csv", ".tsv", ".txt"], type="filepath",
                                 height=110, elem_id="batch-testset-file")
                b_text = gr.Textbox(label="...or paste the rows (with the header)", lines=5,
                                    placeholder=TESTSET_PLACEHOLDER, elem_id="batch-testset-text")
            with gr.Column():
                b_systems = gr.Textbox(label="Systems (one per line)", lines=4, placeholder=SYSTEMS_PLACEHOLDER,
                                       elem_id="batch-systems")
                with gr.Row():
                    b_name = gr.Textbox(label="Run name", placeholder="e.g. nfe-sweep-1", elem_id="batch-name",
                                        scale=3)
                    b_conc = gr.Slider(1, 8, value=2, step=1, label="Generations at once", scale=2,
                                       elem_id="batch-concurrency")
                    b_checks = gr.Checkbox(value=False, label="Objective checks", scale=2, elem_id="batch-checks",
                                           info="WER/CER and speaker similarity of every new output")
                with gr.Row():
                    b_run = gr.Button("Run", variant="primary", elem_id="batch-run")
                    b_stop = gr.Button("Stop", variant="stop", elem_id="batch-stop")
        b_progress = gr.HTML(q.progress_html(None), elem_id="batch-progress")
        b_current = gr.State(None)
        b_timer = gr.Timer(BATCH_POLL_S, active=False)
        gr.Markdown("### Outputs")
        with gr.Row():
            b_runs = gr.Dropdown(choices=[], label="Run", elem_id="batch-runs", scale=4)
            b_refresh = gr.Button("Refresh", size="sm", elem_id="batch-refresh", scale=1)
        b_table = gr.Dataframe(headers=["Row", "Target text"], interactive=False, wrap=True, max_height=360,
                               elem_id="batch-outputs")
        b_rows = gr.State([])
        b_row_text = gr.Markdown(elem_id="batch-row-text")
        with gr.Row(equal_height=False):
            b_players = [gr.Audio(type="filepath", interactive=False, visible=False, elem_id="batch-prompt-audio")]
            b_players += [gr.Audio(type="filepath", interactive=False, visible=False, elem_id=f"batch-audio-{i}")
                          for i in range(MAX_SYSTEM_PLAYERS)]

    with gr.Tab("Listening test", id="listening", elem_id="tab-listening") as tab_listening:
        gr.Markdown("Blind listening tests over a batch run. Raters open their link on any device (a plain page, no "
                    "sign-in): they hear each item in their own random order, never see system or file names, must "
                    "play every clip to the end before answering, and can leave and resume. Answers are final.")
        with gr.Accordion("New session", open=True, elem_id="qa-new"):
            with gr.Row():
                l_name = gr.Textbox(label="Session name (only you see it)", elem_id="qa-name")
                l_kind = gr.Radio(KIND_CHOICES, value="mos", label="Kind", elem_id="qa-kind")
            with gr.Row():
                l_run = gr.Dropdown(choices=[], label="Batch run", elem_id="qa-run")
                l_systems = gr.CheckboxGroup(choices=[], label="Systems", elem_id="qa-systems")
            with gr.Row():
                l_items = gr.Number(value=20, precision=0, minimum=1, label="Items per rater", elem_id="qa-items")
                l_raters = gr.Number(value=0, precision=0, minimum=0, label="Rater links to make now (0: join link "
                                     "only)", elem_id="qa-raters")
            l_instr = gr.Textbox(value=DEFAULT_INSTRUCTIONS, lines=2, label="Instructions shown to raters (must not "
                                 "name a system or model)", elem_id="qa-instructions")
            l_create = gr.Button("Create session", variant="primary", elem_id="qa-create")
        with gr.Row():
            l_session = gr.Dropdown(choices=[], label="Session", elem_id="qa-session-select", scale=4)
            l_refresh = gr.Button("Refresh", size="sm", elem_id="qa-refresh", scale=1)
        l_links = gr.HTML(elem_id="qa-links")
        with gr.Row():
            l_add_n = gr.Number(value=1, precision=0, minimum=1, label="More rater links", elem_id="qa-add-n", scale=1)
            l_add = gr.Button("Add links", elem_id="qa-add", scale=1)
        l_progress = gr.Dataframe(headers=["Rater", "Via", "Answered", "Items", "Last answer (UTC)"],
                                  interactive=False, label="Progress (refreshes every few seconds)",
                                  elem_id="qa-progress")
        l_timer = gr.Timer(LISTENING_POLL_S)
        gr.Markdown("### Results")
        l_results = gr.Button("Show results", variant="primary", elem_id="qa-results")
        l_summary = gr.Markdown(elem_id="qa-summary")
        l_table = gr.Dataframe(interactive=False, wrap=True, elem_id="qa-results-table")
        l_pairs = gr.Dataframe(interactive=False, wrap=True, visible=False, label="Pairs of systems",
                               elem_id="qa-results-pairs")
        l_objective = gr.Dataframe(interactive=False, wrap=True, visible=False, elem_id="qa-results-objective",
                                   label="Objective figures of the rated outputs (from the batch run)")
        l_plot = gr.Image(type="filepath", interactive=False, label="Results", elem_id="qa-plot", height=360)
        with gr.Row():
            l_json = gr.DownloadButton("Download JSON", visible=False, elem_id="qa-json")
            l_csv = gr.DownloadButton("Download CSV (zip)", visible=False, elem_id="qa-csv")

    # --- wiring ---------------------------------------------------------------------------------------------
    runs_update = lambda: gr.Dropdown(choices=q.run_names())  # noqa: E731
    tab_batch.select(runs_update, outputs=[b_runs], **QUIET)
    b_run.click(q.batch_clicked, inputs=[b_file, b_text, b_systems, b_name, b_conc, b_checks],
                outputs=[b_current, b_progress, b_timer, b_runs], **LIGHT)
    b_stop.click(q.stop_batch, inputs=[b_current], **LIGHT)
    b_timer.tick(q.batch_tick, inputs=[b_current, b_runs], outputs=[b_progress, b_timer, b_table, b_rows],
                 concurrency_limit=None,
                 show_progress="hidden", api_visibility="private")
    for ev in (b_runs.change, b_refresh.click):
        ev(q.pick_run, inputs=[b_runs], outputs=[b_table, b_rows, b_progress, b_current, b_timer], **QUIET)
    b_table.select(q.select_row, inputs=[b_runs, b_rows], outputs=[*b_players, b_row_text], **LIGHT)

    tab_listening.select(lambda: (gr.Dropdown(choices=q.run_names()), gr.Dropdown(choices=q.session_names())),
                         outputs=[l_run, l_session], **QUIET)
    l_run.change(q.run_systems, inputs=[l_run], outputs=[l_systems], **QUIET)
    l_create.click(q.create_session, inputs=[l_name, l_kind, l_run, l_systems, l_items, l_raters, l_instr],
                   outputs=[l_session, l_links, l_progress], **LIGHT)
    l_session.change(q.session_view, inputs=[l_session], outputs=[l_links, l_progress], **QUIET)
    l_refresh.click(q.refresh_sessions, inputs=[l_session], outputs=[l_session, l_links, l_progress], **QUIET)
    l_timer.tick(q.session_progress, inputs=[l_session], outputs=[l_progress], concurrency_limit=None,
                 show_progress="hidden", api_visibility="private")
    l_add.click(q.add_links, inputs=[l_session, l_add_n], outputs=[l_links, l_progress], **LIGHT)
    l_results.click(q.results, inputs=[l_session], outputs=[l_summary, l_table, l_pairs, l_objective, l_plot, l_json, l_csv],
                      **LIGHT)
    return q


def rater_routes(rt) -> list:
    """The rater routes (`studio/qa_routes.py`) over the runtime's data folder, for the page's server."""
    from studio.qa_routes import routes
    from studio.store import open_store

    return routes(lambda: open_store(rt.options.data_dir))
