"""The rater's side of a listening test: plain server-rendered pages and JSON routes on the page's own server.

    GET  /qa/join/{join_token}                 "Start" page of a session's shared link (a browser that
                                                joined before is sent back to its own link, by cookie)
    POST /qa/join/{join_token}                 makes a new rater, then redirects to their link
    GET  /qa/r/{token}                         the rater's page: their first unanswered item, or "done"
    GET  /qa/r/{token}/audio/{item_id}/{clip}  one clip (a, b or ref) of one of the rater's items, re-encoded
    POST /qa/r/{token}/played                  {"item", "clip"}: the player reached the clip's end
    POST /qa/r/{token}/answer                  {"item", "choice" | "score", "reason"?}: one answer

Why not a Gradio page: a rater must learn nothing about the systems. Gradio pages load a config with
every component and file URL of the page; these pages hold exactly one item, by opaque id, and work
on a phone (no framework, ~2 KB of script). Every rule (token, own item, played before rating, score
range, one answer per item) is checked in `studio/listening.py`; the page's script only mirrors them.
JSON errors are {"error": message} with the status of the ListeningError.
"""

from __future__ import annotations

import asyncio
import html
import json
from typing import Callable

from studio import listening
from studio.store import Store

ROUTE_PREFIX = "/qa"
#: Cookie remembering which rater a browser became through a join link (per session), so opening
#: the shared link again resumes instead of making a second rater.
JOIN_COOKIE = "qa_rater_{session_id}"
JOIN_COOKIE_MAX_AGE_S = 90 * 24 * 3600
#: Headers of every rater response: nothing cached or indexed, and no Referer leaves the page.
PRIVATE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}
MAX_BODY_BYTES = 8192

MOS_LABELS = {5: "Excellent", 4: "Good", 3: "Fair", 2: "Poor", 1: "Bad"}
SMOS_LABELS = {5: "Same speaker", 4: "Very similar", 3: "Somewhat similar", 2: "Slightly similar",
               1: "Not similar at all"}
QUESTIONS = {
    "ab": "Which one sounds better?",
    "mos": "How natural does this speech sound?",
    "smos": "How similar is the sample's voice to the reference voice?",
}
HOW_TO = {
    "ab": "Play A and B to the end (as often as you like), then choose.",
    "mos": "Play the sample to the end, then rate it.",
    "smos": "Play the reference voice, then the sample, each to the end; then rate how similar the voices are "
            "(not the words or the quality).",
}
CLIP_LABELS = {"ab": {"a": "A", "b": "B"}, "mos": {"a": "Sample"}, "smos": {"ref": "Reference voice", "a": "Sample"}}

STYLE = """
*{box-sizing:border-box}body{margin:0;font:17px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#111827;background:#f9fafb}main{max-width:560px;margin:0 auto;padding:16px}
h1{font-size:22px;margin:4px 0 8px}.progress{color:#4b5563;margin:0 0 6px}
.bar{height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden;margin-bottom:14px}
.bar>div{height:100%;background:#2563eb}.card{background:#fff;border:1px solid #e5e7eb;border-radius:12px;
padding:14px;margin:12px 0}.instructions{white-space:pre-wrap}.how{color:#374151;margin:0 0 10px}
.clip{display:flex;align-items:center;gap:12px;margin:10px 0}.play{flex:0 0 auto;min-width:150px;
min-height:48px;font-size:17px;border-radius:10px;border:2px solid #2563eb;background:#eff6ff;color:#1e3a8a}
.play:disabled{opacity:.45}.clip .meter{flex:1;height:8px;background:#e5e7eb;border-radius:4px;overflow:hidden}
.meter>div{height:100%;width:0;background:#2563eb}.clip .state{min-width:64px;font-size:14px;color:#6b7280}
.clip[data-played="1"] .state{color:#15803d}fieldset{border:none;padding:0;margin:0}
fieldset:disabled{opacity:.5}legend{font-weight:600;margin-bottom:8px}
.options label{display:flex;align-items:center;gap:10px;min-height:48px;padding:6px 12px;margin:6px 0;
border:1px solid #d1d5db;border-radius:10px;background:#fff}.options input{width:22px;height:22px}
textarea{width:100%;font:inherit;padding:8px;border:1px solid #d1d5db;border-radius:10px;margin-top:6px}
.submit{width:100%;min-height:52px;font-size:18px;border:none;border-radius:12px;background:#2563eb;
color:#fff;margin-top:12px}.submit:disabled{background:#9ca3af}#msg{min-height:1.5em;margin:10px 0}
#msg.bad{color:#b91c1c;font-weight:600}.done{font-size:19px}
"""

SCRIPT = """
(() => {
  const root = document.getElementById('item');
  if (!root) return;
  const base = root.dataset.base, item = root.dataset.item, kind = root.dataset.kind;
  const needed = root.dataset.clips.split(' ');
  const played = new Set(root.dataset.played.split(' ').filter(Boolean));
  const form = document.getElementById('answer'), msg = document.getElementById('msg');
  const say = (text, bad) => { msg.textContent = text; msg.className = bad ? 'bad' : ''; };
  async function post(path, body) {
    const r = await fetch(base + path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                        body: JSON.stringify(body)});
    const j = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(j.error || ('The server answered ' + r.status));
    return j;
  }
  const players = {};
  function refresh() {
    const ready = needed.every((c) => played.has(c));
    form.querySelector('fieldset').disabled = !ready;
    form.querySelector('.submit').disabled = !ready || !form.querySelector('input[type=radio]:checked');
    for (const c of needed) {
      const box = document.querySelector(`.clip[data-clip="${c}"]`);
      box.dataset.played = played.has(c) ? '1' : '0';
      if (played.has(c)) box.querySelector('.state').textContent = 'played';
    }
    // SMOS: the sample only after the reference
    if (kind === 'smos') document.querySelector('.clip[data-clip="a"] .play').disabled = !played.has('ref');
  }
  for (const c of needed) {
    const box = document.querySelector(`.clip[data-clip="${c}"]`);
    const audio = new Audio();
    audio.preload = 'none';
    players[c] = audio;
    const meter = box.querySelector('.meter > div'), state = box.querySelector('.state');
    audio.addEventListener('timeupdate', () => {
      if (audio.duration) meter.style.width = (100 * audio.currentTime / audio.duration) + '%';
    });
    audio.addEventListener('playing', () => { state.textContent = 'playing'; });
    audio.addEventListener('error',
                           () => say('This clip could not be loaded. Try again, or tell the organiser.', true));
    audio.addEventListener('ended', async () => {
      meter.style.width = '100%';
      state.textContent = played.has(c) ? 'played' : 'saving';
      try {
        const j = await post('/played', {item: item, clip: c});
        j.played.forEach((p) => played.add(p));
        say('');
      } catch (e) { say(e.message, true); state.textContent = 'play again'; }
      refresh();
    });
    box.querySelector('.play').addEventListener('click', () => {
      for (const other of Object.values(players)) if (other !== audio) other.pause();
      if (!audio.src) audio.src = `${base}/audio/${item}/${c}`;
      audio.currentTime = 0;
      audio.play().catch((e) => say('Could not play: ' + e.message, true));
    });
  }
  form.addEventListener('change', refresh);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const picked = form.querySelector('input[type=radio]:checked');
    if (!picked) { say('Choose an answer first.', true); return; }
    const body = {item: item};
    if (kind === 'ab') { body.choice = picked.value; body.reason = form.querySelector('textarea').value; }
    else body.score = Number(picked.value);
    form.querySelector('.submit').disabled = true;
    try { await post('/answer', body); say('Saved.'); location.replace(base); }
    catch (e) { say(e.message, true); refresh(); }
  });
  refresh();
})();
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer">'
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><main>{body}</main>{tail}</body></html>")


def message_page(title: str, text: str) -> str:
    return page(title, f'<h1>{esc(title)}</h1><div class="card"><p>{esc(text)}</p></div>')


def options_html(kind: str) -> str:
    if kind == "ab":
        choices = [("A", "A sounds better"), ("none", "No preference"), ("B", "B sounds better")]
        radios = "".join(f'<label><input type="radio" name="choice" value="{v}"> {esc(t)}</label>' for v, t in choices)
        return (f'<div class="options">{radios}</div><label for="reason">Why? (optional)</label>'
                f'<textarea id="reason" name="reason" rows="2" maxlength="{listening.MAX_REASON_CHARS}"></textarea>')
    labels = MOS_LABELS if kind == "mos" else SMOS_LABELS
    radios = "".join(f'<label><input type="radio" name="score" value="{n}"> {n} &ndash; {esc(labels[n])}</label>'
                     for n in range(listening.SCORE_MAX, listening.SCORE_MIN - 1, -1))
    return f'<div class="options">{radios}</div>'


def rater_page(view: listening.RaterView, base: str) -> str:
    """The rater's page for `view`: their current item, or the thank-you note. `base` is the rater's
    link path (/qa/r/TOKEN). Nothing here names a system, a model or a file."""
    done = view.answered
    bar = f'<div class="bar"><div style="width:{100 * done / max(1, view.total):.0f}%"></div></div>'
    instructions = (f'<div class="card instructions">{esc(view.instructions)}</div>' if view.instructions else "")
    if view.item is None:
        body = (f'<h1>Listening test</h1><p class="progress">{done} of {view.total} answered</p>{bar}'
                f'<div class="card done" id="done">All {view.total} items are answered and saved. Thank you! '
                "You can close this page.</div>")
        return page("Listening test: done", body)
    item = view.item
    clips = "".join(
        f'<div class="clip" data-clip="{c}" data-played="{int(c in item.played)}">'
        f'<button type="button" class="play">&#9654; {esc(CLIP_LABELS[view.kind][c])}</button>'
        f'<div class="meter"><div></div></div><span class="state">{"played" if c in item.played else ""}</span></div>'
        for c in item.clips)
    body = (f'<h1>Listening test</h1><p class="progress">Item {done + 1} of {view.total}</p>{bar}{instructions}'
            f'<section class="card" id="item" data-base="{esc(base)}" data-item="{esc(item.id)}" '
            f'data-kind="{view.kind}" data-clips="{" ".join(item.clips)}" '
            f'data-played="{" ".join(sorted(item.played))}">'
            f'<p class="how">{esc(HOW_TO[view.kind])}</p>{clips}'
            f'<form id="answer"><fieldset disabled><legend>{esc(QUESTIONS[view.kind])}</legend>'
            f'{options_html(view.kind)}</fieldset>'
            '<button type="submit" class="submit" disabled>Save and continue</button></form>'
            '<p id="msg" role="status" aria-live="polite"></p></section>')
    return page("Listening test", body, SCRIPT)


def join_page(action: str) -> str:
    body = ('<h1>Listening test</h1><div class="card"><p>You will hear short speech clips and answer a question '
            'about each. Use headphones in a quiet place. Your answers are saved as you go: you can stop and come '
            'back to this link later.</p>'
            f'<form method="post" action="{esc(action)}"><button class="submit" type="submit">Start</button></form>'
            '</div>')
    return page("Listening test", body)


def routes(get_store: Callable[[], Store]) -> list:
    """Starlette routes for FastAPI(routes=...) (Gradio: `app_kwargs={"routes": ...}`). `get_store` gives the
    data directory's store at request time (the page is built before the runtime's options are final)."""
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
    from starlette.routing import Route

    def error_json(exc: listening.ListeningError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=PRIVATE_HEADERS)

    async def body_of(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise listening.ListeningError("That request is too large.")
        try:
            data = json.loads(raw or b"null")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise listening.ListeningError("Send a JSON object.")
        return data

    async def rater_html(request: Request):
        token = request.path_params["token"]
        try:
            view = await asyncio.to_thread(listening.rater_view, get_store(), token)
        except listening.ListeningError as exc:
            return HTMLResponse(message_page("Listening test", str(exc)), status_code=exc.status,
                                headers=PRIVATE_HEADERS)
        return HTMLResponse(rater_page(view, f"{request.scope.get('root_path', '')}{ROUTE_PREFIX}/r/{token}"),
                            headers=PRIVATE_HEADERS)

    async def audio(request: Request):
        p = request.path_params
        try:
            path = await asyncio.to_thread(listening.clip_file, get_store(), p["token"], p["item_id"], p["clip"])
            data = await asyncio.to_thread(listening.clip_wav_bytes, path)
        except listening.ListeningError as exc:
            return error_json(exc)
        # bytes, not FileResponse: no file name, modification time or ETag derived from the file
        return Response(data, media_type="audio/wav", headers=PRIVATE_HEADERS)

    async def played(request: Request):
        try:
            data = await body_of(request)
            clips = await asyncio.to_thread(listening.record_played, get_store(), request.path_params["token"],
                                            data.get("item"), data.get("clip"))
        except listening.ListeningError as exc:
            return error_json(exc)
        return JSONResponse({"ok": True, "played": sorted(clips)}, headers=PRIVATE_HEADERS)

    async def answer(request: Request):
        try:
            data = await body_of(request)
            view = await asyncio.to_thread(
                lambda: listening.submit_answer(get_store(), request.path_params["token"], data.get("item"),
                                                choice=data.get("choice"), score=data.get("score"),
                                                reason=data.get("reason")))
        except listening.ListeningError as exc:
            return error_json(exc)
        return JSONResponse({"ok": True, "answered": view.answered, "total": view.total,
                             "done": view.item is None}, headers=PRIVATE_HEADERS)

    def _joined_token(request: Request, session: listening.Session) -> str | None:
        """This browser's rater in `session`, if it joined before and the rater still exists."""
        token = request.cookies.get(JOIN_COOKIE.format(session_id=session.id))
        if not token:
            return None
        row = get_store().query_one("SELECT 1 FROM raters WHERE token = ? AND session_id = ?", (token, session.id))
        return token if row else None

    async def join_get(request: Request):
        join_token = request.path_params["join_token"]
        try:
            session = await asyncio.to_thread(listening.session_by_join_token, get_store(), join_token)
        except listening.ListeningError as exc:
            return HTMLResponse(message_page("Listening test", str(exc)), status_code=exc.status,
                                headers=PRIVATE_HEADERS)
        root = request.scope.get("root_path", "")
        token = await asyncio.to_thread(_joined_token, request, session)
        if token:
            return RedirectResponse(f"{root}{ROUTE_PREFIX}/r/{token}", status_code=303, headers=PRIVATE_HEADERS)
        # a page with a button, not a rater at once: link previews and prefetchers only GET
        return HTMLResponse(join_page(f"{root}{ROUTE_PREFIX}/join/{join_token}"), headers=PRIVATE_HEADERS)

    async def join_post(request: Request):
        join_token = request.path_params["join_token"]
        store = get_store()
        try:
            session = await asyncio.to_thread(listening.session_by_join_token, store, join_token)
            token = await asyncio.to_thread(_joined_token, request, session)
            if token is None:
                token = (await asyncio.to_thread(listening.join, store, join_token)).token
        except listening.ListeningError as exc:
            return HTMLResponse(message_page("Listening test", str(exc)), status_code=exc.status,
                                headers=PRIVATE_HEADERS)
        root = request.scope.get("root_path", "")
        resp = RedirectResponse(f"{root}{ROUTE_PREFIX}/r/{token}", status_code=303, headers=PRIVATE_HEADERS)
        resp.set_cookie(JOIN_COOKIE.format(session_id=session.id), token, max_age=JOIN_COOKIE_MAX_AGE_S,
                        path=f"{root}{ROUTE_PREFIX}", httponly=True, samesite="lax")
        return resp

    p = ROUTE_PREFIX
    return [Route(f"{p}/join/{{join_token}}", join_get, methods=["GET"]),
            Route(f"{p}/join/{{join_token}}", join_post, methods=["POST"]),
            Route(f"{p}/r/{{token}}", rater_html, methods=["GET"]),
            Route(f"{p}/r/{{token}}/audio/{{item_id}}/{{clip}}", audio, methods=["GET"]),
            Route(f"{p}/r/{{token}}/played", played, methods=["POST"]),
            Route(f"{p}/r/{{token}}/answer", answer, methods=["POST"])]
