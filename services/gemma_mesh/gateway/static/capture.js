// Media capture: microphone through the AudioWorklet (16 kHz mono PCM16 chunks) and camera frames
// drawn on a canvas and encoded as JPEG. Capture knows nothing of the socket: it hands audio chunks
// to `onAudio` and asks `frameSink` before each frame whether (and where) a frame is wanted.

const JPEG_QUALITY = 0.8;
const FRAME_MAX_WIDTH_PX = 640;
const WORKLET_URL = "/static/capture-worklet.js";

export class Capture {
  /**
   * @param {object} hooks
   * @param {HTMLVideoElement} hooks.preview  shows the camera and is the source of the frames
   * @param {HTMLCanvasElement} hooks.canvas  scratch canvas for JPEG encoding
   * @param {(pcm: Int16Array, rms: number) => void} hooks.onAudio  every ~100 ms chunk
   * @param {() => ((timestampMs: number, blob: Blob | null) => void) | null} hooks.frameSink
   *   called before a frame is drawn: null skips the frame, else the function receives the JPEG
   */
  constructor({ preview, canvas, onAudio, frameSink }) {
    this.preview = preview;
    this.canvas = canvas;
    this.onAudio = onAudio;
    this.frameSink = frameSink;
    this.info = null; // the worklet's "ready" message (rates, resampler)
    this.mediaStartMs = 0;
    this.frameTimer = null;
    this.frameInFlight = false;
  }

  /** getUserMedia, the audio graph and (with `camera`) a frame every 1/fps s. */
  async start({ camera, fps }) {
    const constraints = {
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
      video: camera ? { width: { ideal: 640 }, height: { ideal: 480 } } : false,
    };
    this.stream = await navigator.mediaDevices.getUserMedia(constraints);
    this.audioContext = new AudioContext({ latencyHint: "interactive" });
    await this.audioContext.audioWorklet.addModule(WORKLET_URL);
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

    if (camera) {
      const video = this.preview;
      video.hidden = false;
      video.srcObject = new MediaStream(this.stream.getVideoTracks());
      await video.play().catch(() => {});
      this.frameTimer = setInterval(() => this.captureFrame(), 1000 / fps);
    }
  }

  onWorkletMessage(message) {
    if (message.type === "ready") {
      this.info = message;
      return;
    }
    if (message.type !== "chunk") return;
    this.onAudio(new Int16Array(message.pcm), message.rms);
  }

  captureFrame() {
    const video = this.preview;
    if (!video.videoWidth || this.frameInFlight) return; // newest wins
    const sink = this.frameSink();
    if (!sink) return;
    const scale = Math.min(1, FRAME_MAX_WIDTH_PX / video.videoWidth);
    const width = Math.round(video.videoWidth * scale);
    const height = Math.round(video.videoHeight * scale);
    const canvas = this.canvas;
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    canvas.getContext("2d").drawImage(video, 0, 0, width, height);
    const timestampMs = Math.round(performance.now() - this.mediaStartMs);
    this.frameInFlight = true;
    canvas.toBlob(
      (blob) => {
        this.frameInFlight = false;
        sink(timestampMs, blob);
      },
      "image/jpeg",
      JPEG_QUALITY,
    );
  }

  /** No more frames; audio keeps flowing. */
  stopFrames() {
    clearInterval(this.frameTimer);
  }

  /** Ask the worklet to post what it has buffered now (end of a session). */
  flush() {
    if (this.worklet) this.worklet.port.postMessage({ type: "flush" });
  }

  /** Release the devices and the audio graph; safe after a start that failed half-way. */
  stop() {
    this.stopFrames();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.audioContext) this.audioContext.close().catch(() => {});
    this.preview.srcObject = null;
    this.preview.hidden = true;
  }
}
