// Rendering of the page's panes: captions, translation, frame analyses (with thumbnails) and the log.
// Pure DOM code: the panes know nothing of sockets or capture; app.js creates them and the session
// feeds them protocol events.

const MAX_ANALYSES_SHOWN = 12;
const MAX_LOG_ENTRIES = 50;
const MAX_THUMBNAILS = 40;

export function formatMs(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function clearPlaceholder(container) {
  const placeholder = container.querySelector(":scope > .placeholder");
  if (placeholder) placeholder.remove();
}

/** Captions or translation: one line per segment; partials show committed + tentative text. */
export class TranscriptPane {
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
export class AnalysisPane {
  constructor(container) {
    this.container = container;
    this.thumbnails = new Map(); // frame_ms -> object URL of the JPEG that was sent
    this.items = new Map();
  }

  /** Remember a sent frame so that its analysis can show it. */
  keepThumbnail(timestampMs, blob) {
    this.thumbnails.set(timestampMs, URL.createObjectURL(blob));
    while (this.thumbnails.size > MAX_THUMBNAILS) {
      const [oldest, url] = this.thumbnails.entries().next().value;
      // Keep URLs the pane still shows (it holds at most MAX_ANALYSES_SHOWN).
      if (![...document.querySelectorAll(".thumb img")].some((img) => img.src === url)) URL.revokeObjectURL(url);
      this.thumbnails.delete(oldest);
    }
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
export class LogPane {
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
