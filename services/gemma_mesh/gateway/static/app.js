// gemma-mesh live page: microphone + camera -> WS /v1/stream -> captions, translation, frame analysis.
//
// Protocol (services/gemma_mesh/gateway/protocol.py is the single definition):
//   1. POST /v1/stream/token (Bearer API key when the gateway needs one) -> {token, expires_at, ttl_s}
//   2. WS /v1/stream, first message {"type": "session.start", config, token[, session_id, last_event_id]}
//   3. binary media messages: u8 kind (1 audio, 2 frame) + u32 LE media timestamp in ms + payload
//      (PCM16 LE mono 16 kHz, or one JPEG)
//   4. JSON events, each with event_id 1, 2, 3, ... (session.started, caption.*, translation.*,
//      frame.analysis, warning, error, session.ended)
//
// Audio is never lost across connection trouble: every captured chunk goes into a ring buffer
// (RING_SECONDS) with its position on the session's audio clock (samples captured / 16 kHz). Audio
// captured before the socket is open simply waits there; after every session.started the page sends
// the ring from the gateway's audio_clock_ms on, then keeps sending live chunks. A dropped socket is
// reopened with exponential backoff and resumed with session_id + last_event_id: the gateway
// replays exactly the missed events, and the page ignores an event id it has already processed.

const PCM_RATE_HZ = 16000;
const RING_SECONDS = 30;
const AUDIO_KIND = 1;
const FRAME_KIND = 2;
const HEADER_BYTES = 5;
const JPEG_QUALITY = 0.8;
const FRAME_MAX_WIDTH_PX = 640;
const MAX_SOCKET_BACKLOG_BYTES = 512 * 1024; // skip a camera frame while this much is unsent
const BACKOFF_INITIAL_MS = 500;
const BACKOFF_MAX_MS = 15000;
const END_TIMEOUT_MS = 20000; // wait this long for session.ended after session.end
const MAX_ANALYSES_SHOWN = 12;
const MAX_LOG_ENTRIES = 50;
const MAX_THUMBNAILS = 40;
// Close codes after which reconnecting cannot help (authentication, permission, bad request).
const NO_RETRY_CLOSE_CODES = new Set([1008]);
const NO_RETRY_ERROR_CODES = new Set(["authentication_error", "permission_error", "invalid_request_error"]);

const $ = (id) => document.getElementById(id);

function formatMs(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function clearPlaceholder(container) {
  const placeholder = container.querySelector(":scope > .placeholder");
  if (placeholder) placeholder.remove();
}

// --- audio ring buffer ------------------------------------------------------------------------

/** PCM16 chunks with their start sample on the session's audio clock; keeps the last `maxSamples`. */
class AudioRing {
  constructor(maxSamples) {
    this.maxSamples = maxSamples;
    this.chunks = []; // {start, pcm: Int16Array}
    this.endSample = 0; // samples captured so far
  }

  get startSample() {
    return this.chunks.length ? this.chunks[0].start : this.endSample;
  }

  push(pcm) {
    const chunk = { start: this.endSample, pcm };
    this.chunks.push(chunk);
    this.endSample += pcm.length;
    while (this.chunks.length > 1 && this.endSample - this.chunks[1].start >= this.maxSamples) this.chunks.shift();
    return chunk;
  }

  /** Chunks covering [fromSample, end), the first one cut at fromSample. */
  *since(fromSample) {
    for (const { start, pcm } of this.chunks) {
      const end = start + pcm.length;
      if (end <= fromSample) continue;
      if (start >= fromSample) yield { start, pcm };
      else yield { start: fromSample, pcm: pcm.subarray(fromSample - start) };
    }
  }
}

function mediaMessage(kind, timestampMs, payload) {
  const bytes = new Uint8Array(HEADER_BYTES + payload.byteLength);
  const view = new DataView(bytes.buffer);
  view.setUint8(0, kind);
  view.setUint32(1, Math.max(0, Math.round(timestampMs)) >>> 0, true);
  bytes.set(new Uint8Array(payload.buffer ?? payload, payload.byteOffset ?? 0, payload.byteLength), HEADER_BYTES);
  return bytes.buffer;
}

// --- panes ------------------------------------------------------------------------------------

/** Captions or translation: one line per segment; partials show committed + tentative text. */
class TranscriptPane {
  constructor(container, kind) {
    this.container = container;
    this.kind = kind; // "caption" | "translation"
    this.segments = new Map(); // segment_id -> {line, committed, tentative, final}
  }

  line(event) {
    let segment = this.segments.get(event.segment_id);
    if (segment) return segment;
    clearPlaceholder(this.container);
    const line = document.createElement("p");
    line.className = "segment";
    line.dataset.testid = `${this.kind}-segment`;
    line.dataset.segmentId = event.segment_id;
    line.dataset.final = "false";
    const time = document.createElement("time");
    time.textContent = formatMs(event.start_ms);
    time.title = `${event.start_ms} ms`;
    const committed = document.createElement("span");
    committed.className = "committed";
    committed.dataset.testid = `${this.kind}-committed`;
    const tentative = document.createElement("span");
    tentative.className = "tentative";
    tentative.dataset.testid = `${this.kind}-tentative`;
    line.append(time, committed, tentative);
    // Keep segments in segment order even if events of two segments interleave.
    const after = [...this.segments.entries()].find(([id]) => id > event.segment_id);
    this.container.insertBefore(line, after ? after[1].line : null);
    segment = { line, committed, tentative, final: false };
    this.segments.set(event.segment_id, segment);
    return segment;
  }

  partial(event) {
    const segment = this.line(event);
    if (segment.final) return;
    segment.committed.textContent = event.committed;
    segment.tentative.textContent = event.committed && event.tentative ? ` ${event.tentative}` : event.tentative;
    this.scroll();
  }

  final(event) {
    const segment = this.line(event);
    segment.final = true;
    segment.line.dataset.final = "true";
    segment.line.dataset.reason = event.reason;
    segment.line.classList.add("final");
    segment.committed.textContent = event.text;
    segment.committed.dataset.testid = `${this.kind}-final`;
    segment.tentative.textContent = "";
    if (!event.text) segment.line.classList.add("empty");
    this.scroll();
  }

  scroll() {
    const c = this.container;
    if (c.scrollHeight - c.scrollTop - c.clientHeight < 120) c.scrollTop = c.scrollHeight;
  }
}

/** Frame analyses, newest first, each with the thumbnail of the analysed frame. */
class AnalysisPane {
  constructor(container, thumbnails) {
    this.container = container;
    this.thumbnails = thumbnails; // frame_ms -> object URL
    this.items = new Map();
  }

  update(event) {
    let item = this.items.get(event.analysis_id);
    if (!item) {
      clearPlaceholder(this.container);
      const li = document.createElement("li");
      li.className = "analysis-item";
      li.dataset.testid = "analysis-item";
      li.dataset.analysisId = event.analysis_id;
      li.dataset.done = "false";
      const figure = document.createElement("div");
      figure.className = "thumb";
      const url = this.thumbnails.get(event.frame_ms);
      if (url) {
        const img = document.createElement("img");
        img.src = url;
        img.alt = `Analysed frame at ${formatMs(event.frame_ms)}`;
        figure.append(img);
      }
      const body = document.createElement("div");
      body.className = "analysis-body";
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent = `#${event.analysis_id} · frame at ${formatMs(event.frame_ms)}`;
      const text = document.createElement("p");
      text.className = "analysis-text";
      text.dataset.testid = "analysis-text";
      body.append(meta, text);
      li.append(figure, body);
      this.container.prepend(li);
      item = { li, text };
      this.items.set(event.analysis_id, item);
      while (this.items.size > MAX_ANALYSES_SHOWN) {
        const oldest = this.items.keys().next().value;
        this.items.get(oldest).li.remove();
        this.items.delete(oldest);
      }
    }
    item.text.textContent = event.text;
    if (event.done) {
      item.li.dataset.done = "true";
      item.li.classList.add("done");
    }
  }
}

/** Warnings, errors and the page's own notices, newest first. */
class LogPane {
  constructor(container) {
    this.container = container;
  }

  add(level, code, message) {
    clearPlaceholder(this.container);
    const li = document.createElement("li");
    li.className = `log-${level}`;
    li.dataset.testid = `log-${level}`;
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    const codeEl = document.createElement("code");
    codeEl.textContent = code;
    const text = document.createElement("span");
    text.textContent = message;
    li.append(time, codeEl, text);
    this.container.prepend(li);
    while (this.container.children.length > MAX_LOG_ENTRIES) this.container.lastElementChild.remove();
  }
}

// --- the live session -------------------------------------------------------------------------

/**
 * One live session: capture, the socket, reconnect and resume.
 * States: idle -> connecting -> live <-> reconnecting -> ending -> closed.
 */
class LiveSession {
  constructor(ui) {
    this.ui = ui;
    this.state = "idle";
    this.ring = new AudioRing(RING_SECONDS * PCM_RATE_HZ);
    this.sentUpTo = 0; // samples the current connection has sent
    this.ws = null;
    this.sessionId = null;
    this.lastEventId = 0;
    this.eventIds = []; // every processed event id, in order (for tests and debugging)
    this.duplicates = []; // ids received again and ignored
    this.gaps = []; // [expected, received] when an id was skipped
    this.startedEvents = []; // {event_id, resumed, audio_clock_ms, captured_ms} of every session.started
    this.attempt = 0;
    this.retryTimer = null;
    this.stopping = false;
    this.ended = false;
    this.frameTimer = null;
    this.framesSent = 0;
    this.thumbnails = new Map();
    this.mediaStartMs = 0;
    this.counts = { partials: 0, finals: 0, analyses: 0, analysesDone: 0, warnings: 0, errors: 0 };
  }

  setState(state) {
    this.state = state;
    this.ui.showState(state);
  }

  // --- start / stop ---------------------------------------------------------------------------
  async start(options) {
    this.options = options;
    this.setState("connecting");
    // Capture first: audio from now on is kept even if the socket takes a while to open.
    await this.startCapture(options);
    this.connect();
  }

  async startCapture(options) {
    const constraints = {
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
      video: options.camera ? { width: { ideal: 640 }, height: { ideal: 480 } } : false,
    };
    this.stream = await navigator.mediaDevices.getUserMedia(constraints);
    this.audioContext = new AudioContext({ latencyHint: "interactive" });
    await this.audioContext.audioWorklet.addModule("/static/capture-worklet.js");
    this.source = this.audioContext.createMediaStreamSource(this.stream);
    this.worklet = new AudioWorkletNode(this.audioContext, "gemma-mesh-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
    });
    // The worklet's output is silent; a muted gain keeps it in the rendered graph without echo.
    this.mute = new GainNode(this.audioContext, { gain: 0 });
    this.source.connect(this.worklet).connect(this.mute).connect(this.audioContext.destination);
    this.worklet.port.onmessage = (event) => this.onWorkletMessage(event.data);
    if (this.audioContext.state === "suspended") await this.audioContext.resume();
    this.mediaStartMs = performance.now();

    if (options.camera) {
      const video = this.ui.preview;
      video.hidden = false;
      video.srcObject = new MediaStream(this.stream.getVideoTracks());
      await video.play().catch(() => {});
      this.canvas = this.ui.canvas;
      this.frameTimer = setInterval(() => this.captureFrame(), 1000 / options.fps);
    }
  }

  onWorkletMessage(message) {
    if (message.type === "ready") {
      this.captureInfo = message;
      return;
    }
    if (message.type !== "chunk") return;
    const pcm = new Int16Array(message.pcm);
    this.ring.push(pcm);
    this.ui.showLevel(message.rms);
    if (this.state === "live") for (const chunk of this.ring.since(this.sentUpTo)) this.sendAudio(chunk);
  }

  sendAudio({ start, pcm }) {
    if (this.ws.readyState !== WebSocket.OPEN) return; // resent from the ring after the next session.started
    this.ws.send(mediaMessage(AUDIO_KIND, (start * 1000) / PCM_RATE_HZ, pcm));
    this.sentUpTo = start + pcm.length;
    this.ui.showStats(this);
  }

  /** Send what the gateway still needs, from its audio clock on. */
  resendAudio(audioClockMs) {
    const from = Math.round((audioClockMs * PCM_RATE_HZ) / 1000);
    if (from < this.ring.startSample) {
      const lostMs = Math.round(((this.ring.startSample - from) * 1000) / PCM_RATE_HZ);
      this.ui.log.add("warning", "audio_lost", `${lostMs} ms of audio were older than the ${RING_SECONDS} s buffer`);
    }
    this.sentUpTo = Math.max(from, this.ring.startSample);
    for (const chunk of this.ring.since(this.sentUpTo)) this.sendAudio(chunk);
    this.sentUpTo = Math.max(this.sentUpTo, this.ring.endSample);
  }

  captureFrame() {
    const video = this.ui.preview;
    if (this.state !== "live" || !video.videoWidth) return;
    if (this.ws.bufferedAmount > MAX_SOCKET_BACKLOG_BYTES || this.frameInFlight) return; // newest wins
    const scale = Math.min(1, FRAME_MAX_WIDTH_PX / video.videoWidth);
    const width = Math.round(video.videoWidth * scale);
    const height = Math.round(video.videoHeight * scale);
    const canvas = this.canvas;
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    canvas.getContext("2d").drawImage(video, 0, 0, width, height);
    const timestampMs = Math.round(performance.now() - this.mediaStartMs);
    const ws = this.ws;
    this.frameInFlight = true;
    canvas.toBlob(
      async (blob) => {
        this.frameInFlight = false;
        if (!blob || ws !== this.ws || this.state !== "live") return;
        const payload = new Uint8Array(await blob.arrayBuffer());
        ws.send(mediaMessage(FRAME_KIND, timestampMs, payload));
        this.framesSent += 1;
        this.keepThumbnail(timestampMs, blob);
        this.ui.showStats(this);
      },
      "image/jpeg",
      JPEG_QUALITY,
    );
  }

  keepThumbnail(timestampMs, blob) {
    this.thumbnails.set(timestampMs, URL.createObjectURL(blob));
    while (this.thumbnails.size > MAX_THUMBNAILS) {
      const [oldest, url] = this.thumbnails.entries().next().value;
      // Keep URLs the analysis pane still shows (it holds at most MAX_ANALYSES_SHOWN).
      if (![...document.querySelectorAll(".thumb img")].some((img) => img.src === url)) URL.revokeObjectURL(url);
      this.thumbnails.delete(oldest);
    }
  }

  async stop() {
    if (this.stopping || this.state === "closed") return;
    this.stopping = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.frameTimer);
    if (this.worklet) this.worklet.port.postMessage({ type: "flush" });
    await new Promise((resolve) => setTimeout(resolve, 50)); // let the flushed chunk arrive
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.state === "live") {
      this.setState("ending");
      this.ws.send(JSON.stringify({ type: "session.end" }));
      await new Promise((resolve) => {
        this.onEnded = resolve;
        setTimeout(resolve, END_TIMEOUT_MS);
      });
    }
    this.shutdown();
  }

  shutdown() {
    clearTimeout(this.retryTimer);
    clearInterval(this.frameTimer);
    if (this.ws) {
      this.ws.onclose = null;
      if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client stopped");
    }
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.audioContext) this.audioContext.close().catch(() => {});
    this.ui.preview.srcObject = null;
    this.ui.preview.hidden = true;
    this.ui.showLevel(0);
    this.setState("closed");
    this.ui.onStopped();
  }

  // --- connection -----------------------------------------------------------------------------
  async connect() {
    if (this.stopping) return;
    let token;
    try {
      token = await this.mintToken();
    } catch (error) {
      if (error.fatal) return this.fail(error.code, error.message);
      this.ui.log.add("warning", "token", error.message);
      return this.scheduleReconnect();
    }
    if (this.stopping) return;
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stream`;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.fatalError = null;
    ws.onopen = () => {
      const start = { type: "session.start", config: this.options.config, token };
      if (this.sessionId) {
        start.session_id = this.sessionId;
        start.last_event_id = this.lastEventId;
      }
      this.resumeFrom = this.lastEventId;
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (message) => {
      if (ws !== this.ws || typeof message.data !== "string") return;
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        this.ui.log.add("error", "bad_event", "the gateway sent a message that is not JSON");
        return;
      }
      this.onEvent(event);
    };
    ws.onclose = (close) => {
      if (ws !== this.ws) return;
      this.onSocketClosed(close);
    };
  }

  async mintToken() {
    const headers = { "Content-Type": "application/json" };
    if (this.options.apiKey) headers.Authorization = `Bearer ${this.options.apiKey}`;
    let response;
    try {
      response = await fetch("/v1/stream/token", { method: "POST", headers, body: "{}" });
    } catch (error) {
      throw Object.assign(new Error(`cannot reach the gateway: ${error.message}`), { fatal: false });
    }
    if (response.ok) return (await response.json()).token;
    let body = {};
    try {
      body = await response.json();
    } catch {
      /* not JSON */
    }
    const message = body.error?.message || `${response.status} ${response.statusText}`;
    const code = body.error?.code || `http_${response.status}`;
    const fatal = response.status === 401 || response.status === 403;
    throw Object.assign(new Error(message), { fatal, code });
  }

  onSocketClosed(close) {
    if (this.stopping) {
      if (this.onEnded) this.onEnded(); // closed while ending: nothing more will arrive
      return;
    }
    if (this.ended) {
      if (this.state !== "closed") this.shutdown();
      return;
    }
    const fatal = this.fatalError;
    if (fatal && fatal.code === "not_found_error" && fatal.param === "session_id") {
      // The session expired while we were away: start a new one (its ids start again at 1).
      this.ui.log.add("warning", "session_expired", "the session could not be resumed; starting a new one");
      this.sessionId = null;
      this.lastEventId = 0;
      this.eventIds = [];
      return this.scheduleReconnect();
    }
    if ((fatal && NO_RETRY_ERROR_CODES.has(fatal.code)) || NO_RETRY_CLOSE_CODES.has(close.code)) {
      return this.fail(fatal?.code || `close_${close.code}`, fatal?.message || close.reason || "connection refused");
    }
    this.ui.log.add(
      "notice",
      `close_${close.code}`,
      `connection lost${close.reason ? ` (${close.reason})` : ""}; reconnecting`,
    );
    this.scheduleReconnect();
  }

  scheduleReconnect() {
    this.setState("reconnecting");
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_INITIAL_MS * 2 ** this.attempt);
    let delay = base / 2 + Math.random() * (base / 2); // "equal jitter"
    if (this.nextRetryMs !== undefined) [delay, this.nextRetryMs] = [this.nextRetryMs, undefined];
    this.attempt += 1;
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  fail(code, message) {
    this.ui.log.add("error", code, message);
    this.shutdown();
  }

  /**
   * Test hook and "network blip": close the socket without ending the session. `retryInMs` replaces
   * the backoff delay of the first reconnect (0: at once, like a client that notices a blip).
   */
  dropConnection({ retryInMs } = {}) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    if (retryInMs !== undefined) this.nextRetryMs = retryInMs;
    this.ws.close(4000, "dropped by the page");
  }

  // --- events ---------------------------------------------------------------------------------
  onEvent(event) {
    const id = event.event_id;
    if (id) {
      // event_id 0: a handshake error that never entered the session log.
      if (id <= this.lastEventId) {
        this.duplicates.push(id);
        return;
      }
      if (id !== this.lastEventId + 1) {
        this.gaps.push([this.lastEventId + 1, id]);
        this.ui.log.add("warning", "event_gap", `events ${this.lastEventId + 1}..${id - 1} never arrived`);
      }
      this.lastEventId = id;
      this.eventIds.push(id);
    }
    this.ui.showStats(this);
    switch (event.type) {
      case "session.started":
        this.sessionId = event.session_id;
        this.startedEvents.push({
          event_id: id,
          resumed: event.resumed,
          audio_clock_ms: event.audio_clock_ms,
          captured_ms: Math.floor((this.ring.endSample * 1000) / PCM_RATE_HZ), // audio waiting in the ring
        });
        this.attempt = 0;
        this.setState("live");
        this.ui.showSession(event);
        if (event.resumed) {
          const replayed = id - this.resumeFrom - 1;
          this.ui.log.add("notice", "resumed", `resumed after event ${this.resumeFrom}; ${replayed} missed events replayed`);
        }
        this.resendAudio(event.audio_clock_ms);
        break;
      case "caption.partial":
        this.counts.partials += 1;
        this.ui.captions.partial(event);
        break;
      case "caption.final":
        this.counts.finals += 1;
        this.ui.captions.final(event);
        break;
      case "translation.partial":
        this.counts.partials += 1;
        this.ui.translation.partial(event);
        this.ui.showLanguage(event.language);
        break;
      case "translation.final":
        this.counts.finals += 1;
        this.ui.translation.final(event);
        this.ui.showLanguage(event.language);
        break;
      case "frame.analysis":
        this.counts.analyses += 1;
        if (event.done) this.counts.analysesDone += 1;
        this.ui.analyses.update(event);
        break;
      case "warning":
        this.counts.warnings += 1;
        this.ui.log.add("warning", event.code, event.message);
        break;
      case "error":
        this.counts.errors += 1;
        this.ui.log.add("error", event.code, event.param ? `${event.message} (${event.param})` : event.message);
        if (event.fatal) this.fatalError = event;
        break;
      case "session.ended":
        this.ended = true;
        this.ui.log.add("notice", "session_ended", `session ended (${event.reason})`);
        if (this.onEnded) this.onEnded();
        else this.shutdown();
        break;
      default:
        this.ui.log.add("notice", "unknown_event", `ignored an event of type ${event.type}`);
    }
  }
}

// --- page wiring ------------------------------------------------------------------------------

const ui = {
  form: $("controls"),
  startButton: $("start"),
  stopButton: $("stop"),
  task: $("task"),
  target: $("target-language"),
  camera: $("camera"),
  fps: $("fps"),
  prompt: $("prompt"),
  apiKey: $("api-key"),
  preview: $("preview"),
  canvas: $("frame-canvas"),
  state: $("connection-state"),
  captions: new TranscriptPane($("captions"), "caption"),
  translation: new TranscriptPane($("translation"), "translation"),
  log: new LogPane($("log")),
  session: null,

  showState(state) {
    this.state.dataset.state = state;
    this.state.querySelector(".state-text").textContent = state;
    document.body.dataset.state = state;
  },
  showSession(event) {
    const el = $("session-id");
    el.textContent = `session ${event.session_id.slice(0, 8)}…`;
    el.title = event.session_id;
  },
  showLanguage(language) {
    $("translation-lang").textContent = `→ ${language}`;
  },
  showLevel(rms) {
    const db = rms > 0 ? 20 * Math.log10(rms) : -100;
    const fraction = Math.max(0, Math.min(1, (db + 60) / 60));
    $("mic-level").style.width = `${(fraction * 100).toFixed(1)}%`;
  },
  showStats(session) {
    $("stat-audio").textContent = `${(session.sentUpTo / PCM_RATE_HZ).toFixed(1)} s`;
    $("stat-frames").textContent = String(session.framesSent);
    $("stat-events").textContent = String(session.lastEventId);
    $("stat-resumes").textContent = String(session.startedEvents.filter((e) => e.resumed).length);
  },
  setRunning(running) {
    this.startButton.disabled = running;
    this.stopButton.disabled = !running;
    for (const el of [this.camera, this.fps, this.apiKey]) el.disabled = running;
    this.target.disabled = this.task.value !== "translate";
  },
  onStopped() {
    this.setRunning(false);
  },
};
ui.analyses = null;

function sessionConfig() {
  const translate = ui.task.value === "translate";
  const config = {
    task: ui.task.value,
    audio: { encoding: "pcm_s16le", sample_rate_hz: PCM_RATE_HZ, channels: 1 },
    video: null,
  };
  if (translate) config.target_language = ui.target.value.trim();
  if (ui.camera.checked) {
    config.video = { max_fps: Number(ui.fps.value), prompt: ui.prompt.value.trim() || undefined };
  }
  return config;
}

function resetPanes(session) {
  const translate = ui.task.value === "translate";
  for (const [id, text] of [
    ["captions", translate ? "Translate mode: the translation pane shows what is said." : "Listening…"],
    ["translation", translate ? "Listening…" : "Choose the Translate task to see translations."],
  ]) {
    $(id).replaceChildren(Object.assign(document.createElement("p"), { className: "placeholder", textContent: text }));
  }
  const placeholder = ui.camera.checked ? "Waiting for the first analysis…" : "Camera is off.";
  $("analyses").replaceChildren(Object.assign(document.createElement("li"), { className: "placeholder", textContent: placeholder }));
  ui.captions = new TranscriptPane($("captions"), "caption");
  ui.translation = new TranscriptPane($("translation"), "translation");
  ui.analyses = new AnalysisPane($("analyses"), session.thumbnails);
  $("translation-lang").textContent = "";
  $("session-id").textContent = "";
}

async function start() {
  if (ui.session && !["closed", "idle"].includes(ui.session.state)) return;
  if (ui.task.value === "translate" && !ui.target.value.trim()) {
    ui.target.focus();
    return;
  }
  const session = new LiveSession(ui);
  ui.session = session;
  window.gemmaMesh.session = session;
  resetPanes(session);
  ui.setRunning(true);
  try {
    await session.start({
      config: sessionConfig(),
      camera: ui.camera.checked,
      fps: Math.min(5, Math.max(0.2, Number(ui.fps.value) || 1)),
      apiKey: ui.apiKey.value.trim(),
    });
  } catch (error) {
    const what = error.name === "NotAllowedError" ? "microphone or camera permission was refused" : error.message;
    session.fail("capture", what);
  }
}

/** Mid-session changes of task, language, prompt or fps go out as session.update. */
function sendUpdate() {
  const session = ui.session;
  if (!session || session.state !== "live") return;
  const config = sessionConfig();
  const update = { task: config.task };
  if (config.target_language) update.target_language = config.target_language;
  if (session.options.camera && config.video) update.video = config.video;
  session.ws.send(JSON.stringify({ type: "session.update", config: update }));
  session.options.config = { ...session.options.config, ...update };
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  start();
});
ui.stopButton.addEventListener("click", () => ui.session && ui.session.stop());
ui.task.addEventListener("change", () => {
  ui.target.disabled = ui.task.value !== "translate";
  sendUpdate();
});
ui.target.addEventListener("change", sendUpdate);
ui.prompt.addEventListener("change", sendUpdate);

// Test and debugging hooks (read-only views of the current session).
window.gemmaMesh = {
  session: null,
  get state() {
    return this.session ? this.session.state : "idle";
  },
  get sessionId() {
    return this.session?.sessionId ?? null;
  },
  get eventIds() {
    return this.session ? [...this.session.eventIds] : [];
  },
  get duplicates() {
    return this.session ? [...this.session.duplicates] : [];
  },
  get gaps() {
    return this.session ? this.session.gaps.map((g) => [...g]) : [];
  },
  get started() {
    return this.session ? this.session.startedEvents.map((e) => ({ ...e })) : [];
  },
  get counts() {
    return this.session ? { ...this.session.counts } : {};
  },
  get audio() {
    const s = this.session;
    return s
      ? { capturedSamples: s.ring.endSample, sentSamples: s.sentUpTo, capture: s.captureInfo ?? null }
      : null;
  },
  dropConnection(options) {
    this.session?.dropConnection(options);
  },
  stop() {
    return this.session?.stop();
  },
};
