// The studio's streaming player: plays generated audio with Web Audio as chunks arrive.
//
// Installed once per page by the Blocks' load event (the file is the body of a JS function).
// Gradio's streaming audio buffers for seconds (gradio issues #8185, #9044, #11733); this player
// starts a chunk ~30 ms after it arrives. Flow: Generate's `js` hook calls begin(panel, args, i),
// which makes a job id, opens GET studio_api/stream/<id> (frames: studio/ui_stream.py) and puts the
// id into the handler's inputs; each 'A' frame is scheduled right after the previous one on one
// AudioContext clock. When the first chunk's sound reaches the output (AudioContext output
// timestamp, confirmed by the context clock passing its start), the delay first-chunk-arrival ->
// first-sound is shown and POSTed to studio_api/stream/<id>/played for the metrics and history.
(function () {
  if (window.studioPlayer) return;
  const HEADER = 5;                       // 1 byte type + uint32 LE length
  const T_AUDIO = 65, T_META = 77, T_END = 69;  // 'A' 'M' 'E' ('K' keep-alives are ignored)
  const T_SEGMENT = 83;                   // 'S': a script segment's line, just before its audio
  const LEAD_S = 0.01;                    // schedule margin: one render quantum is 3 ms; a late start would gap
  const POLL_MS = 5;                      // clock check while waiting for the first sound
  const METER_MS = 50;
  let ctx = null, sink = null, analyser = null, meterTimer = null;
  const sessions = {};

  function audioContext() {
    if (!ctx) {
      const AC = window.AudioContext || window.webkitAudioContext;
      ctx = new AC({ latencyHint: 'interactive' });
      sink = ctx.createGain();
      analyser = ctx.createAnalyser();
      analyser.fftSize = 1024;
      sink.connect(analyser);
      analyser.connect(ctx.destination);
    }
    if (ctx.state === 'suspended') ctx.resume();  // allowed: we run inside the click's user activation
    return ctx;
  }

  function newJobId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // Gradio's own idea of where the app lives (it honours --root-path and proxies); else relative.
  function api(path) {
    const root = (window.gradio_config && window.gradio_config.root) || '';
    return root ? `${root.replace(/\/+$/, '')}/studio_api/${path}` : `studio_api/${path}`;
  }

  function el(key, part) { return document.getElementById(`studio-player-${key}-${part}`); }

  function show(s, text, state) {
    const box = el(s.key, 'status');
    if (box) { box.textContent = text; box.dataset.state = state || s.state; }
  }

  function summary(s) {
    const parts = [`${s.seconds.toFixed(2)} s received in ${s.chunks} chunk${s.chunks === 1 ? '' : 's'}`];
    if (s.firstSoundMs !== null) parts.push(`first chunk \u2192 first sound ${s.firstSoundMs.toFixed(0)} ms`);
    return parts.join(' \u00b7 ');
  }

  function meter() {
    if (meterTimer) return;
    const data = new Float32Array(1024);
    meterTimer = setInterval(() => {
      let active = false;
      for (const s of Object.values(sessions)) {
        if (!s.sources.length) continue;
        active = true;
        analyser.getFloatTimeDomainData(data);
        let peak = 0;
        for (let i = 0; i < data.length; i++) peak = Math.max(peak, Math.abs(data[i]));
        s.peak = Math.max(s.peak, peak);
        const bar = el(s.key, 'bar');
        if (bar) bar.style.width = `${Math.min(100, peak * 100).toFixed(0)}%`;
      }
      if (!active) {
        clearInterval(meterTimer); meterTimer = null;
        document.querySelectorAll('.studio-player-bar').forEach((b) => { b.style.width = '0%'; });
      }
    }, METER_MS);
  }

  // The handler's metrics table may arrive before this page measured its first sound: fill it in.
  function fill(key) {
    const s = sessions[key];
    if (!s || s.firstSoundMs === null) return;
    const cell = document.querySelector(`#${key}-metrics table[data-job="${s.id}"] [data-metric="first_sound_ms"]`);
    if (cell && !/\d/.test(cell.textContent)) cell.textContent = `${s.firstSoundMs.toFixed(1)} ms`;
  }

  function report(s) {
    fetch(api(`stream/${s.id}/played`), {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ first_sound_ms: s.firstSoundMs, first_audio_ms: s.firstAudioMs,
                             output_latency_ms: s.outputLatencyMs }),
    }).catch(() => {});
  }

  function watchFirstSound(s, startAt, arrival) {
    // Where the context clock meets the speakers: getOutputTimestamp maps context time to
    // performance.now(); without it, add the context's reported output latency.
    const lat = (ctx.outputLatency || 0) + (ctx.baseLatency || 0);
    let soundAt = performance.now() + (startAt - ctx.currentTime + lat) * 1000;
    const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (ts && ts.performanceTime > 0 && ts.contextTime > 0) soundAt = ts.performanceTime + (startAt - ts.contextTime) * 1000;
    s.outputLatencyMs = lat * 1000;
    const timer = setInterval(() => {
      if (s.state === 'stopped') { clearInterval(timer); return; }
      if (ctx.currentTime < startAt) {
        if (ctx.state !== 'running') show(s, 'Click anywhere on the page to let it play sound.', 'blocked');
        return;
      }
      clearInterval(timer);
      // A clock that passed startAt much later than predicted (a suspended context) wins.
      const now = performance.now();
      const heard = now - soundAt > 3 * POLL_MS + 20 ? now : soundAt;
      s.firstSoundMs = Math.max(0, heard - arrival);
      s.played = true;
      if (s.state === 'streaming') show(s, `Playing \u00b7 ${summary(s)}`, 'playing');
      report(s);
      fill(s.key);
    }, POLL_MS);
  }

  function onAudio(s, payload) {
    const arrival = performance.now();
    const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
    const sr = view.getUint32(0, true);
    const n = (payload.byteLength - 4) >> 2;
    if (n <= 0) return;
    const samples = new Float32Array(payload.buffer.slice(payload.byteOffset + 4, payload.byteOffset + 4 + n * 4));
    s.chunks += 1; s.samples += n; s.seconds += n / sr; s.sampleRate = sr;
    if (s.firstArrival === null) { s.firstArrival = arrival; s.firstAudioMs = arrival - s.t0; }
    if (!ctx || s.state === 'stopped') return;
    const buffer = ctx.createBuffer(1, n, sr);
    buffer.copyToChannel(samples, 0);
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(sink);
    const startAt = Math.max(s.nextTime, ctx.currentTime + LEAD_S);
    src.start(startAt);
    s.nextTime = startAt + buffer.duration;
    s.sources.push(src);
    src.onended = () => {
      s.sources = s.sources.filter((x) => x !== src);
      if (!s.sources.length && s.ended && s.state !== 'stopped') finishShow(s);
    };
    if (s.chunks === 1) watchFirstSound(s, startAt, arrival);
    if (s.nextSegment) markSegment(s, s.nextSegment, startAt);
    s.state = 'streaming';
    show(s, `${s.played ? 'Playing' : 'Starting'} \u00b7 ${summary(s)}`, 'playing');
    meter();
  }

  // A script's segment starts with this audio: show its line when its sound starts.
  function markSegment(s, seg, startAt) {
    s.nextSegment = null;
    s.segments.push(seg);
    setTimeout(() => {
      if (sessions[s.key] !== s || s.state === 'stopped') return;
      s.speaking = seg;
      const box = el(s.key, 'line');
      if (box) { box.textContent = `Line ${seg.line} \u00b7 ${seg.voice}: ${seg.text}`; box.dataset.segment = seg.segment; }
    }, Math.max(0, (startAt - ctx.currentTime) * 1000));
  }

  function finishShow(s) {
    const e = s.ended || {};
    if (e.status === 'ok') { s.state = 'done'; show(s, `Played \u00b7 ${summary(s)}`, 'done'); }
    else if (e.status === 'cancelled') { s.state = 'stopped'; show(s, `Stopped \u00b7 ${summary(s)}`, 'stopped'); }
    else { s.state = 'error'; show(s, `Failed: ${e.message || 'the generation did not finish'}`, 'error'); }
  }

  function onEnd(s, info) {
    s.ended = info;
    if (info.status !== 'ok') { silence(s); finishShow(s); return; }
    if (!s.chunks) { s.state = 'done'; show(s, 'No audio arrived.', 'error'); return; }
    if (!s.sources.length) finishShow(s);
  }

  function silence(s) {
    for (const src of s.sources) { try { src.stop(); } catch (e) { /* already stopped */ } }
    s.sources = [];
  }

  function handle(s, type, payload) {
    if (sessions[s.key] !== s) return;  // a newer generation replaced this one
    if (type === T_AUDIO) onAudio(s, payload);
    else if (type === T_META) {
      s.meta = JSON.parse(new TextDecoder().decode(payload));
      s.state = 'generating';
      show(s, `Generating with ${s.meta.label} (${s.meta.mode})\u2026`, 'generating');
    } else if (type === T_SEGMENT) s.nextSegment = JSON.parse(new TextDecoder().decode(payload));
    else if (type === T_END) onEnd(s, JSON.parse(new TextDecoder().decode(payload)));
  }

  async function read(s) {
    let resp;
    try {
      resp = await fetch(api(`stream/${s.id}`), { signal: s.abort.signal, cache: 'no-store' });
    } catch (e) {
      if (!s.abort.signal.aborted) { s.state = 'unavailable'; show(s, 'Live player could not connect; the result appears below when done.', 'error'); }
      return;
    }
    if (!resp.ok || !resp.body) {
      s.state = 'unavailable';
      show(s, 'Live player unavailable on this server; the result appears below when done.', 'error');
      return;
    }
    const reader = resp.body.getReader();
    let buf = new Uint8Array(0);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const joined = new Uint8Array(buf.length + value.length);
        joined.set(buf); joined.set(value, buf.length);
        buf = joined;
        let off = 0;
        while (buf.length - off >= HEADER) {
          const len = new DataView(buf.buffer, buf.byteOffset + off + 1, 4).getUint32(0, true);
          if (buf.length - off < HEADER + len) break;
          handle(s, buf[off], buf.subarray(off + HEADER, off + HEADER + len));
          off += HEADER + len;
        }
        buf = buf.slice(off);
      }
    } catch (e) {
      if (!s.abort.signal.aborted && !s.ended) show(s, 'The live stream was interrupted; the result appears below when done.', 'error');
    }
  }

  function begin(key, args, jobIndex) {
    stop(key);
    const s = { key, id: newJobId(), t0: performance.now(), state: 'waiting', chunks: 0, samples: 0, seconds: 0,
                sampleRate: null, firstArrival: null, firstAudioMs: null, firstSoundMs: null, outputLatencyMs: null,
                played: false, peak: 0, nextTime: 0, sources: [], ended: null, meta: null,
                segments: [], nextSegment: null, speaking: null,
                abort: new AbortController() };
    sessions[key] = s;
    try { audioContext(); } catch (e) { s.state = 'no-audio'; }
    show(s, 'Waiting for the server\u2026', 'waiting');
    args[jobIndex] = s.id;
    read(s);
    return args;
  }

  function stop(key) {
    const s = sessions[key];
    if (!s) return '';
    const wasRunning = !s.ended;
    s.state = 'stopped';
    silence(s);
    if (wasRunning) show(s, `Stopped \u00b7 ${summary(s)}`, 'stopped');
    return wasRunning ? s.id : '';
  }

  function stats(key) {
    const s = sessions[key];
    if (!s) return null;
    return { id: s.id, state: s.state, chunks: s.chunks, seconds: s.seconds, sampleRate: s.sampleRate,
             firstAudioMs: s.firstAudioMs, firstSoundMs: s.firstSoundMs, outputLatencyMs: s.outputLatencyMs,
             played: s.played, peak: s.peak, segments: s.segments.length,
             speaking: s.speaking ? s.speaking.segment : null,
             ended: s.ended, contextState: ctx ? ctx.state : null };
  }

  window.studioPlayer = { begin, stop, stats, fill };
})();
