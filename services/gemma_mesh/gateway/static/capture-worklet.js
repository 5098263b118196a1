// AudioWorklet capture: microphone at the AudioContext's rate -> 16 kHz mono PCM16 chunks of ~100 ms.
//
// Resampler: a polyphase windowed-sinc FIR (Kaiser window, beta 7.86, about 80 dB stopband).
// The low-pass cut-off (-6 dB) sits at 90 % of the output Nyquist frequency (7.2 kHz for 16 kHz
// output) and the transition band is 20 % of the output Nyquist wide, so everything above 8 kHz is
// attenuated before decimation (no aliasing into the speech band) and the passband is flat to
// 6.4 kHz. The ratio in/out is reduced to M/L (48000 -> 16000: 3/1; 44100 -> 16000: 441/160) and
// the filter is tabulated for each of the L output phases, so every output sample is one dot
// product of about 150 taps with no trigonometry at run time. Rates whose exact L would exceed
// MAX_PHASES use the nearest M/MAX_PHASES ratio (drift under 0.05 %, far below what the
// recogniser can notice). Latency: half the filter length (~1.6 ms at 48 kHz).
//
// Messages to the main thread: {type: "chunk", pcm: ArrayBuffer (Int16 LE), samples, rms}.
// Messages from it: {type: "flush"} posts what is buffered now (end of a session).

const OUT_RATE_HZ = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms at 16 kHz
const CUTOFF_FRACTION = 0.9; // -6 dB point, as a fraction of the lower Nyquist frequency
const TRANSITION_FRACTION = 0.2; // transition band width, as a fraction of the lower Nyquist frequency
const STOPBAND_DB = 80;
const MAX_PHASES = 1024;

function gcd(a, b) {
  while (b) [a, b] = [b, a % b];
  return a;
}

// Modified Bessel function of the first kind, order 0 (for the Kaiser window).
function besselI0(x) {
  let sum = 1;
  let term = 1;
  const half = x / 2;
  for (let k = 1; k < 50; k++) {
    term *= (half / k) * (half / k);
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

function sinc(x) {
  if (Math.abs(x) < 1e-9) return 1;
  const px = Math.PI * x;
  return Math.sin(px) / px;
}

export class PolyphaseResampler {
  /** @param {number} inRate @param {number} outRate */
  constructor(inRate, outRate) {
    const g = gcd(Math.round(inRate), Math.round(outRate));
    let up = Math.round(outRate) / g; // L: output phases
    let down = Math.round(inRate) / g; // M: input samples per L outputs
    if (up > MAX_PHASES) {
      down = Math.round((inRate / outRate) * MAX_PHASES);
      up = MAX_PHASES;
    }
    this.up = up;
    this.down = down;
    const nyquistHz = Math.min(inRate, outRate) / 2;
    const cutoff = (CUTOFF_FRACTION * nyquistHz) / inRate; // cycles per input sample
    const transition = (TRANSITION_FRACTION * nyquistHz) / inRate;
    // Kaiser's formula for the length that reaches STOPBAND_DB over the transition band.
    const length = Math.ceil((STOPBAND_DB - 7.95) / (2.285 * 2 * Math.PI * transition)) + 1;
    this.half = Math.ceil(length / 2); // taps on each side of the output instant
    const beta = 0.1102 * (STOPBAND_DB - 8.7);
    const norm = besselI0(beta);
    const taps = 2 * this.half;
    this.taps = taps;
    // table[phase * taps + j]: weight of input sample (i - half + 1 + j) for an output at i + phase/up.
    this.table = new Float32Array(up * taps);
    for (let phase = 0; phase < up; phase++) {
      const frac = phase / up;
      let sum = 0;
      for (let j = 0; j < taps; j++) {
        const t = frac - (j - this.half + 1); // distance from the output instant, in input samples
        const r = t / this.half;
        const w = Math.abs(r) >= 1 ? 0 : besselI0(beta * Math.sqrt(1 - r * r)) / norm;
        const h = 2 * cutoff * sinc(2 * cutoff * t) * w;
        this.table[phase * taps + j] = h;
        sum += h;
      }
      // Unity DC gain in every phase (no ripple from phase to phase).
      for (let j = 0; j < taps; j++) this.table[phase * taps + j] /= sum;
    }
    // Input history: samples [bufferStart, bufferStart + filled) of the input stream.
    this.buffer = new Float32Array(8192);
    this.filled = 0;
    this.bufferStart = 0;
    this.nextIndex = 0; // input index of the next output (integer part)
    this.nextPhase = 0; // its fractional part, in 1/up steps
    // Start with half a filter of zeros so the first output is centred on the first sample.
    this.filled = this.half - 1;
    this.bufferStart = -(this.half - 1);
  }

  /** Feed input samples; returns the output samples they complete (a view, valid until the next call). */
  process(input) {
    if (this.filled + input.length > this.buffer.length) {
      const grown = new Float32Array(Math.max(this.buffer.length * 2, this.filled + input.length));
      grown.set(this.buffer.subarray(0, this.filled));
      this.buffer = grown;
    }
    this.buffer.set(input, this.filled);
    this.filled += input.length;
    const available = this.bufferStart + this.filled; // first input index not yet received
    const maxOut = Math.ceil(((available - this.nextIndex) * this.up) / this.down) + 1;
    if (!this.out || this.out.length < maxOut) this.out = new Float32Array(Math.max(maxOut, 256));
    const { table, taps, up, down, half, buffer, out } = this;
    let count = 0;
    // An output at nextIndex + phase/up needs inputs up to nextIndex + half.
    while (this.nextIndex + half < available) {
      const base = this.nextIndex - half + 1 - this.bufferStart;
      const row = this.nextPhase * taps;
      let acc = 0;
      for (let j = 0; j < taps; j++) acc += buffer[base + j] * table[row + j];
      out[count++] = acc;
      this.nextPhase += down;
      this.nextIndex += Math.floor(this.nextPhase / up);
      this.nextPhase %= up;
    }
    // Drop history no later output needs.
    const keepFrom = this.nextIndex - half + 1 - this.bufferStart;
    if (keepFrom > 0) {
      this.buffer.copyWithin(0, keepFrom, this.filled);
      this.filled -= keepFrom;
      this.bufferStart += keepFrom;
    }
    return out.subarray(0, count);
  }
}

const Base = typeof AudioWorkletProcessor === "undefined" ? class {} : AudioWorkletProcessor;

class CaptureProcessor extends Base {
  constructor() {
    super();
    // `sampleRate` is the AudioContext's rate (a global of the worklet scope).
    this.resampler = new PolyphaseResampler(sampleRate, OUT_RATE_HZ);
    this.chunk = new Int16Array(CHUNK_SAMPLES);
    this.chunkFill = 0;
    this.sumSquares = 0;
    this.mono = new Float32Array(128);
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "flush") this.post();
    };
    this.port.postMessage({
      type: "ready",
      inputRateHz: sampleRate,
      phases: this.resampler.up,
      taps: this.resampler.taps,
    });
  }

  post() {
    if (this.chunkFill === 0) return;
    const pcm = this.chunk.slice(0, this.chunkFill);
    const rms = Math.sqrt(this.sumSquares / this.chunkFill);
    this.port.postMessage({ type: "chunk", pcm: pcm.buffer, samples: this.chunkFill, rms }, [pcm.buffer]);
    this.chunkFill = 0;
    this.sumSquares = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true; // no input yet (or the track ended)
    const frames = channels[0].length;
    if (this.mono.length !== frames) this.mono = new Float32Array(frames);
    const mono = this.mono;
    if (channels.length === 1) {
      mono.set(channels[0]);
    } else {
      mono.fill(0);
      for (const channel of channels) for (let i = 0; i < frames; i++) mono[i] += channel[i];
      for (let i = 0; i < frames; i++) mono[i] /= channels.length;
    }
    const out = this.resampler.process(mono);
    for (let i = 0; i < out.length; i++) {
      const s = Math.max(-1, Math.min(1, out[i]));
      this.sumSquares += s * s;
      this.chunk[this.chunkFill++] = Math.round(s < 0 ? s * 0x8000 : s * 0x7fff);
      if (this.chunkFill === CHUNK_SAMPLES) this.post();
    }
    return true; // keep capturing; outputs stay silent
  }
}

if (typeof registerProcessor === "function") registerProcessor("gemma-mesh-capture", CaptureProcessor);
