// The live session's WebSocket client: token, session.start/resume, reconnect backoff, the 30 s audio
// ring and event-id bookkeeping. Capture is in capture.js, rendering in panes.js and app.js.
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

import { Capture } from "./capture.js";

export const PCM_RATE_HZ = 16000;
const RING_SECONDS = 30;
const AUDIO_KIND = 1;
const FRAME_KIND = 2;
const HEADER_BYTES = 5;
const MAX_SOCKET_BACKLOG_BYTES = 512 * 1024; // skip a camera frame while this much is unsent
const BACKOFF_INITIAL_MS = 500;
const BACKOFF_MAX_MS = 15000;
const END_TIMEOUT_MS = 20000; // wait this long for session.ended after session.end
// Close codes after which reconnecting cannot help (authentication, permission, bad request).
const NO_RETRY_CLOSE_CODES = new Set([1008]);
const NO_RETRY_ERROR_CODES = new Set(["authentication_error", "permission_error", "invalid_request_error"]);

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

// --- the live session -------------------------------------------------------------------------

/**
 * One live session: capture, the socket, reconnect and resume.
 * States: idle -> connecting -> live <-> reconnecting -> ending -> closed.
 */
export class LiveSession {
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
    this.capture = null;
    this.framesSent = 0;
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
    this.capture = new Capture({
      preview: this.ui.preview,
      canvas: this.ui.canvas,
      onAudio: (pcm, rms) => this.onAudio(pcm, rms),
      frameSink: () => this.frameSink(),
    });
    await this.capture.start(options);
    this.connect();
  }

  get captureInfo() {
    return this.capture?.info;
  }

  onAudio(pcm, rms) {
    this.ring.push(pcm);
    this.ui.showLevel(rms);
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

  /** Where the next camera frame goes: null while not live or while the socket is backed up. */
  frameSink() {
    if (this.state !== "live" || this.ws.bufferedAmount > MAX_SOCKET_BACKLOG_BYTES) return null;
    const ws = this.ws;
    return async (timestampMs, blob) => {
      if (!blob || ws !== this.ws || this.state !== "live") return;
      const payload = new Uint8Array(await blob.arrayBuffer());
      ws.send(mediaMessage(FRAME_KIND, timestampMs, payload));
      this.framesSent += 1;
      this.ui.analyses.keepThumbnail(timestampMs, blob);
      this.ui.showStats(this);
    };
  }

  async stop() {
    if (this.stopping || this.state === "closed") return;
    this.stopping = true;
    clearTimeout(this.retryTimer);
    if (this.capture) {
      this.capture.stopFrames();
      this.capture.flush();
    }
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
    if (this.ws) {
      this.ws.onclose = null;
      if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "client stopped");
    }
    if (this.capture) this.capture.stop();
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
