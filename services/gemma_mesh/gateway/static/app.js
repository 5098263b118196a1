// gemma-mesh live page: microphone + camera -> WS /v1/stream -> captions, translation, frame analysis.
//
// This module wires the page: the controls, the status bar and stats, the panes (panes.js) and the
// window.gemmaMesh test hooks. The session and its socket are in session.js, capture in capture.js.

import { AnalysisPane, LogPane, TranscriptPane } from "./panes.js";
import { LiveSession, PCM_RATE_HZ } from "./session.js";

const $ = (id) => document.getElementById(id);

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

function resetPanes() {
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
  ui.analyses = new AnalysisPane($("analyses"));
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
  resetPanes();
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
