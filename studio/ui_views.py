"""HTML and table views of the studio's state: banner, model notes, metrics, history rows, server stats.

Pure functions from plain data to strings/lists (no Gradio), so the page's words are testable.
Inline styles keep the banner readable even before the page's stylesheet is injected.
"""

from __future__ import annotations

import html
import math

from studio.ui_runtime import FAMILIES

_BOX = "padding:10px 14px;border-radius:8px;margin:4px 0;font-size:14px;line-height:1.45;"
STYLES = {
    "info": _BOX + "background:#eff6ff;border:1px solid #93c5fd;color:#1e3a8a;",
    "ok": _BOX + "background:#f0fdf4;border:1px solid #86efac;color:#14532d;",
    "warn": _BOX + "background:#fff7ed;border:2px solid #fb923c;color:#7c2d12;",
    "error": _BOX + "background:#fef2f2;border:2px solid #f87171;color:#7f1d1d;",
}
DEMO_NOTE = ("DEMO WEIGHTS: {labels} {verb} on tiny random weights and produce{s} noise, not speech. "
             "Real weights: start with --checkpoints DIR, or let the studio download them "
             "(python -m studio download).")


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _box(kind: str, body: str, elem: str = "") -> str:
    return f'<div class="studio-box studio-{kind}" data-kind="{kind}" {elem} style="{STYLES[kind]}">{body}</div>'


def _mark(ok: bool | None) -> str:
    return "ready" if ok else ("not served" if ok is None else "not ready")


def family_line(fam: dict) -> str:
    if not fam["served"]:
        return f"<b>{esc(fam['label'])}</b>: not served"
    modes = f"offline {_mark(fam['offline'])}, streaming {_mark(fam['streaming'])}"
    weights = {True: ", DEMO weights", False: ", real weights", None: ""}[fam["demo"]]
    return f"<b>{esc(fam['label'])}</b>: {modes}{weights}"


def banner_html(st: dict) -> str:
    """The strip at the top of every tab: server progress, model readiness, the demo-weights warning."""
    fams = st["families"]
    lines = " &nbsp;|&nbsp; ".join(family_line(f) for f in fams.values())
    state = st["state"]
    parts = []
    if state in ("not started", "starting"):
        parts.append(_box("info", f'<span class="studio-spinner"></span> <b>Starting the Triton server</b>: '
                                  f'{esc(st["message"])}<br>{lines}', 'data-state="starting"'))
    elif state == "ready":
        where = esc(st["url"] or "")
        parts.append(_box("ok", f"<b>Triton ready</b> at {where} (gRPC) on {esc(st['device'])}. {lines}",
                          'data-state="ready"'))
    else:
        parts.append(_box("error", f"<b>Triton server {esc(state)}</b>: {esc(st['message'])}<br>"
                                   "See the Server tab for its log.", f'data-state="{esc(state)}"'))
    demo = [f["label"] for f in fams.values() if f["served"] and f["demo"]]
    if demo:
        parts.append(_box("warn", "<b>" + esc(DEMO_NOTE.format(labels=" and ".join(demo),
                                                              verb="run" if len(demo) > 1 else "runs",
                                                              s="" if len(demo) > 1 else "s")) + "</b>",
                          'id="studio-demo-banner"'))
    return "".join(parts)


def model_note_html(st: dict, family: str) -> str:
    """Beside the model picker: readiness, weights, licence of the chosen model."""
    fam = st["families"][family]
    if st["state"] == "ready" or not fam["served"]:
        body = family_line(fam)
    elif st["state"] in ("not started", "starting"):
        body = f"<b>{esc(fam['label'])}</b>: waiting for the Triton server to start"
    else:
        body = f"<b>{esc(fam['label'])}</b>: unavailable, the Triton server {esc(st['state'])}"
    if fam["demo"]:
        body += " &mdash; <b>output is noise</b>"
    body += f"<br><small>Weights licence: {esc(fam['licence'])}</small>"
    kind = "warn" if fam["demo"] else ("ok" if fam["served"] and fam["offline"] and fam["streaming"] else "info")
    return _box(kind, body, f'data-model="{family}"')


def _fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&mdash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{esc(value)}{unit}"


def metrics_html(metrics: dict, *, seed, demo: bool | None, mode: str, status: str = "ok", job: str = "",
                 notes: list[str] | None = None) -> str:
    """One generation's numbers; each value cell carries data-metric=NAME for tools and tests.

    `job` (the browser's stream id) lets the page's player fill in its first-sound figure when that
    arrives after the handler answered. `notes`: the server's and client's remarks on this
    generation (`info.notes`: a clipped prompt, a reloaded front instance, ...), listed below."""
    rows = [
        ("latency_s", "Latency (request to last audio)", _fmt(metrics.get("latency_s"), " s")),
        ("first_chunk_s", "First chunk latency" + (" (offline: whole answer)" if mode == "offline" else ""),
         _fmt(metrics.get("first_chunk_s"), " s")),
        ("audio_s", "Audio length", _fmt(metrics.get("audio_s"), " s", 2)),
        ("rtf", "Real-time factor (latency / audio)", _fmt(metrics.get("rtf"), "", 3)),
        ("compute_ms", "Server compute time", _fmt(metrics.get("compute_ms"), " ms", 1)),
        ("first_sound_ms", "First chunk arrival to first sound (browser)",
         _fmt(metrics.get("first_sound_ms"), " ms", 1)),
        ("first_audio_ms", "Click to first chunk arrival (browser)", _fmt(metrics.get("first_audio_ms"), " ms", 0)),
        ("chunks", "Chunks received", _fmt(metrics.get("chunks"))),
        ("seed", "Seed used", _fmt(seed)),
        ("demo_weights", "Weights", "DEMO (noise)" if demo else ("real" if demo is False else "&mdash;")),
    ]
    if "tokens" in metrics:
        rows.append(("tokens", "Spark tokens generated", _fmt(metrics.get("tokens"))))
    if "decode_tokens_per_s" in metrics:
        rows.append(("decode_tokens_per_s", "Spark decode speed",
                     _fmt(metrics.get("decode_tokens_per_s"), " tok/s", 1)))
    for key, label, unit, digits in (("wer", "Word error rate (output read back by ASR)", "", 3),
                                     ("cer", "Character error rate (output read back by ASR)", "", 3),
                                     ("speaker_sim", "Speaker similarity to the prompt (cosine)", "", 3),
                                     ("check_ms", "Objective checks time", " ms", 0)):
        if key in metrics:
            demo_mark = " (demo check models: noise)" if metrics.get("checks_demo") and key != "check_ms" else ""
            rows.append((key, label, _fmt(metrics.get(key), unit, digits) + demo_mark))
    head = ("<p><b>Stopped.</b> The audio below is what arrived before the stop.</p>"
            if status == "cancelled" else "")
    body = "".join(f'<tr><th style="text-align:left;font-weight:normal;padding:2px 12px 2px 0">{esc(label)}</th>'
                   f'<td data-metric="{key}" style="font-variant-numeric:tabular-nums">{value}</td></tr>'
                   for key, label, value in rows)
    remarks = "".join(f"<li>{esc(str(n))}</li>" for n in (notes or []) if str(n).strip())
    tail = f'<ul class="studio-notes">{remarks}</ul>' if remarks else ""
    return (f'{head}<table class="studio-metrics" data-status="{esc(status)}" data-job="{esc(job)}">'
            f'{body}</table>{tail}')


HISTORY_HEADERS = ["Time (UTC)", "Model", "Mode", "Status", "Text", "Latency s", "First chunk s", "Audio s",
                   "RTF", "First sound ms", "Seed", "Weights", "Id"]


def history_rows(records: list[dict]) -> list[list]:
    out = []
    for r in records:
        m = r.get("metrics") or {}
        text = r.get("text", "")
        label = FAMILIES.get(r.get("model"), (r.get("model", "?"),))[0]
        if r.get("kind") == "design":
            label += " (voice creation)"
        elif r.get("kind") == "script":
            label = f"Script ({r.get('model', '?')})"  # several families: model is e.g. "f5+spark"
        num = lambda k, d=3: round(m[k], d) if isinstance(m.get(k), (int, float)) else None  # noqa: E731
        out.append([r.get("time", "").replace("T", " ").rstrip("Z"), label, r.get("mode", ""), r.get("status", ""),
                    text if len(text) <= 60 else text[:57] + "...", num("latency_s"), num("first_chunk_s"),
                    num("audio_s", 2), num("rtf"), num("first_sound_ms", 1), r.get("seed"),
                    "demo" if r.get("demo_weights") else ("real" if r.get("demo_weights") is False else ""), r["id"]])
    return out


STATS_HEADERS = ["Model", "Requests ok", "Failed", "Executions", "Avg queue ms", "Avg compute ms", "Last inference"]


def stats_rows(stats: dict) -> list[list]:
    """Triton's per-model statistics (JSON from get_inference_statistics) as table rows."""
    import time

    rows = []
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        n = lambda part, key="count": int(s.get(part, {}).get(key, 0) or 0)  # noqa: E731 - int64s arrive as strings
        ok = n("success")
        compute_ns = n("compute_input", "ns") + n("compute_infer", "ns") + n("compute_output", "ns")
        last = int(m.get("last_inference", 0) or 0)
        rows.append([m.get("name", "?"), ok, n("fail"), int(m.get("execution_count", 0) or 0),
                     round(n("queue", "ns") / ok / 1e6, 2) if ok else None,
                     round(compute_ns / ok / 1e6, 2) if ok else None,
                     time.strftime("%H:%M:%S", time.gmtime(last / 1000)) if last else ""])
    return sorted(rows, key=lambda r: r[0])


def _weights_word(demo: bool | None) -> str:
    return "DEMO (noise)" if demo else ("real" if demo is False else "?")


def servers_md(servers: list[dict]) -> str:
    """Several Triton servers (studio/pool.py): each one's readiness and its share of this studio's requests."""
    if not servers:
        return ""
    rows = "\n".join(f"| `{s['url']}` | {s['state']}" + (f" ({s['set_aside_s']:g} s left)" if s["set_aside_s"] else "")
                     + f" | {s['sent']} | {s['share'] * 100:.0f}% | {s['outstanding']} | {s['failed']} | "
                     f"{s['failed_over']} | {s['last_error'].replace('|', '/') or '—'} |" for s in servers)
    return ("\n\n**Servers** (requests this studio sent to each; *moved on*: requests it failed before any audio, "
            "which another server then served):\n\n| server | state | requests | share | in flight | failed | "
            "moved on | last error |\n|---|---|---|---|---|---|---|---|\n" + rows
            + "\n\nThe per-model statistics below are summed over the servers that answered.")


def server_md(st: dict) -> str:
    fams = "\n".join(f"| {f['label']} | {'yes' if f['served'] else 'no'} | {_mark(f['offline'])} | "
                     f"{_mark(f['streaming'])} | {_weights_word(f['demo'])} | {f['licence']} |"
                     for f in st["families"].values())
    kind = "external (--triton-url)" if st["external"] else "embedded (started by this studio)"
    return (f"**State:** {st['state']} — {st['message']}\n\n"
            f"**Triton address (gRPC):** `{st['url'] or 'not yet assigned'}` · **server:** {kind} · "
            f"**device:** {st['device']} · **runtime:** {st['runtime']}\n\n"
            "| model | served | offline | streaming | weights | weights licence |\n|---|---|---|---|---|---|\n" + fams
            + servers_md(st.get("servers") or []))
