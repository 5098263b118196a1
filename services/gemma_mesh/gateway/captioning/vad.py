"""Voice activity detection: the Silero VAD ONNX model and a streaming speech segmenter.

Pure policy: numpy in, decisions out; no asyncio, sockets or clocks. Audio is 16 kHz float32 mono
in [-1, 1]; every position is an absolute sample index in the stream (ms = sample * 1000 / 16000).

The Silero VAD model file ships in this package (``captioning/silero/``, with its MIT licence) and
runs on ONNX Runtime directly; the ``silero_vad`` package (which imports torch) is a test dependency
only, to check that the model is fed exactly as its ``OnnxWrapper`` feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

SAMPLE_RATE_HZ = 16_000
SILERO_WINDOW_SAMPLES = 512  # 32 ms at 16 kHz: the only window size silero-vad v5+ accepts
SILERO_CONTEXT_SAMPLES = 64  # samples of the previous window prepended to each window
SILERO_STATE_SHAPE = (2, 1, 128)
SILERO_MODEL_FILE = "silero_vad.onnx"
# silero-vad 6.2.3's silero_vad.onnx (MIT), shipped in the package: see find_silero_model.
SHIPPED_SILERO_MODEL = Path(__file__).resolve().parent / "silero" / SILERO_MODEL_FILE


def _ms_to_samples(ms: float) -> int:
    return round(ms * SAMPLE_RATE_HZ / 1000)


class VadSettings(BaseModel):
    """Thresholds of the VAD segmenter (embedded in the gateway's settings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    onset_threshold: float = Field(
        0.5, gt=0, lt=1, description="Speech probability at or above which a segment may start"
    )
    offset_threshold: float = Field(
        0.35, gt=0, lt=1, description="Speech probability below which silence is counted (hysteresis)"
    )
    min_speech_ms: int = Field(250, ge=0, description="Speech needed before a segment opens, in ms")
    min_silence_ms: int = Field(500, ge=32, description="Silence that closes a segment, in ms")
    speech_pad_ms: int = Field(200, ge=0, description="Audio kept before and after the speech, in ms")
    max_segment_ms: int = Field(
        30_000, ge=2_000, description="Longest segment; longer speech is split at its quietest point"
    )
    split_search_ms: int = Field(
        5_000, ge=200, description="Final part of a too-long segment searched for the split point, in ms"
    )
    split_energy_window_ms: int = Field(
        100, ge=10, description="RMS energy window used to find the quietest split point, in ms"
    )
    model_path: Path | None = Field(
        None, description="silero_vad.onnx; None = the file shipped with gemma-mesh (silero-vad 6.2.3)"
    )

    @model_validator(mode="after")
    def _check_consistent(self) -> VadSettings:
        if self.offset_threshold > self.onset_threshold:
            raise ValueError("offset_threshold must be <= onset_threshold")
        if self.split_search_ms >= self.max_segment_ms:
            raise ValueError("split_search_ms must be < max_segment_ms")
        if self.split_energy_window_ms > self.split_search_ms:
            raise ValueError("split_energy_window_ms must be <= split_search_ms")
        return self


def find_silero_model(model_path: str | Path | None = None) -> Path:
    """The Silero VAD ``.onnx`` file: ``model_path`` if given, else the copy shipped in this package.

    The shipped file is ``silero_vad.onnx`` of silero-vad 6.2.3 (MIT, the licence beside it in
    ``captioning/silero/``), byte-identical to the wheel's ``silero_vad/data/silero_vad.onnx``
    (a test checks its SHA-256 and its outputs against silero-vad's ``OnnxWrapper``). Shipping the
    file keeps serving free of the silero-vad wheel, whose dependencies are torch and torchaudio.

    Raises:
        FileNotFoundError: ``model_path`` (the gateway's ``vad.model_path`` setting) is not a file,
            or the shipped file is missing from a broken install; the message names the setting.
    """
    if model_path is not None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VAD model {path} does not exist (GEMMA_MESH_GATEWAY_VAD_MODEL_PATH; "
                "unset it to use the model shipped with gemma-mesh)"
            )
        return path
    path = SHIPPED_SILERO_MODEL
    if not path.is_file():
        raise FileNotFoundError(
            f"the Silero VAD model {path} is missing from this gemma-mesh install; reinstall "
            "gemma-mesh or set GEMMA_MESH_GATEWAY_VAD_MODEL_PATH to a silero_vad.onnx file"
        )
    return path


class SpeechProbabilityModel(Protocol):
    """What the segmenter needs from a VAD; ``SileroVad`` implements it, tests inject fakes."""

    window_samples: int

    def speech_probabilities(self, audio: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...


class SileroVad:
    """Streaming Silero VAD (v5/v6 ONNX model) on ONNX Runtime; one instance per audio stream.

    Mirrors silero-vad's ``OnnxWrapper.__call__`` (``silero_vad/utils_vad.py``) at 16 kHz, batch 1:
    each 512-sample window is prefixed with the last 64 samples of the previous model input (zeros
    at the start), giving ``input`` float32 ``[1, 576]``; ``state`` float32 ``[2, 1, 128]`` starts at
    zero and is replaced by the model's returned state; ``sr`` is int64 ``16000``. Windows are
    aligned to the start of the stream, so the probabilities do not depend on how audio is chunked.

    Args:
        model_path: the ``.onnx`` file; None = the shipped one (``find_silero_model``).
        providers: ONNX Runtime execution providers (the model is tiny: CPU is right).
        intra_op_threads: ONNX Runtime threads per operator (silero-vad uses 1).

    Raises:
        FileNotFoundError: no model file (see ``find_silero_model``).
        ValueError: the model's inputs are not Silero's ``input``, ``state``, ``sr``.
    """

    window_samples = SILERO_WINDOW_SAMPLES

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        intra_op_threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        self.model_path = find_silero_model(model_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(self.model_path), options, providers=list(providers))
        names = {i.name for i in self._session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise ValueError(f"{self.model_path} is not a Silero VAD v5+ model: inputs {sorted(names)}")
        self._sr = np.array(SAMPLE_RATE_HZ, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Forget the stream: zero state and context, drop buffered samples, restart at sample 0."""
        self._state = np.zeros(SILERO_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros((1, SILERO_CONTEXT_SAMPLES), dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self.windows_done = 0

    def speech_probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of every 512-sample window completed by ``audio``.

        Args:
            audio: float mono samples ``[n]`` at 16 kHz, any ``n`` (a trailing partial window is kept
                for the next call).

        Returns:
            float32 ``[k]``, one per window completed; the ``w``-th window of the stream (counting
            from 0 since ``reset``) covers samples ``[512 * w, 512 * (w + 1))``.

        Raises:
            ValueError: ``audio`` is not one-dimensional.
        """
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"VAD audio must be mono [n], got shape {audio.shape}")
        samples = np.concatenate([self._pending, audio]) if self._pending.size else audio
        count = samples.size // SILERO_WINDOW_SAMPLES
        probabilities = np.empty(count, dtype=np.float32)
        for w in range(count):
            window = samples[w * SILERO_WINDOW_SAMPLES : (w + 1) * SILERO_WINDOW_SAMPLES]
            model_input = np.concatenate([self._context, window[None, :]], axis=1)
            output, self._state = self._session.run(
                None, {"input": model_input, "state": self._state, "sr": self._sr}
            )
            self._context = model_input[:, -SILERO_CONTEXT_SAMPLES:]
            probabilities[w] = output.reshape(-1)[0]
        self._pending = samples[count * SILERO_WINDOW_SAMPLES :].copy()
        self.windows_done += count
        return probabilities


@dataclass(frozen=True, slots=True)
class SegmentStarted:
    """Speech was confirmed; samples from ``start_sample`` on belong to segment ``segment_id``."""

    segment_id: int
    start_sample: int


@dataclass(frozen=True, slots=True, eq=False)
class SegmentClosed:
    """Segment ``segment_id`` is complete: ``audio`` (float32 ``[end_sample - start_sample]``) is the
    stream's samples ``[start_sample, end_sample)``. ``reason``: ``"silence"`` (``min_silence_ms``
    after speech), ``"max_length"`` (split at ``max_segment_ms``; the next segment starts at
    ``end_sample``), ``"flush"`` (end of stream)."""

    segment_id: int
    start_sample: int
    end_sample: int
    audio: np.ndarray
    reason: Literal["silence", "max_length", "flush"]


SegmentEvent = SegmentStarted | SegmentClosed


@dataclass(frozen=True, slots=True, eq=False)
class OpenSegment:
    """The segment in progress: its audio (float32) from ``start_sample`` to the last sample pushed."""

    segment_id: int
    start_sample: int
    audio: np.ndarray


class _SampleBuffer:
    """Append-only float32 samples addressed by absolute position, with the front droppable."""

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE_HZ, dtype=np.float32)
        self._offset = 0  # index in _data of absolute sample ``start``
        self.start = 0  # first retained absolute sample
        self.end = 0  # one past the last absolute sample

    def append(self, audio: np.ndarray) -> None:
        used = self.end - self.start
        if self._offset + used + audio.size > self._data.size:
            capacity = max(self._data.size, 2 * (used + audio.size))
            data = np.empty(capacity, dtype=np.float32)
            data[:used] = self._data[self._offset : self._offset + used]
            self._data, self._offset = data, 0
        self._data[self._offset + used : self._offset + used + audio.size] = audio
        self.end += audio.size

    def drop_before(self, sample: int) -> None:
        sample = min(max(sample, self.start), self.end)
        self._offset += sample - self.start
        self.start = sample

    def slice(self, begin: int, end: int) -> np.ndarray:
        """A copy of samples ``[begin, end)``; both must be retained."""
        assert self.start <= begin <= end <= self.end, (begin, end, self.start, self.end)
        return self._data[self._offset + begin - self.start : self._offset + end - self.start].copy()


class VadSegmenter:
    """Cuts a 16 kHz mono stream into speech segments from per-window VAD probabilities.

    Hysteresis, in VAD windows (32 ms for Silero): a window with probability >= ``onset_threshold``
    starts a candidate; the candidate opens a segment once it has lasted ``min_speech_ms`` with no
    window below ``offset_threshold`` (else it is dropped). An open segment counts silence from the
    first window below ``offset_threshold``; a window >= ``onset_threshold`` cancels the count (as in
    silero-vad's ``get_speech_timestamps``), and ``min_silence_ms`` of it closes the segment.
    ``speech_pad_ms`` of audio is kept before the speech and after its last speech window (never
    overlapping the previous segment). A segment reaching ``max_segment_ms`` is split at the centre
    of the quietest ``split_energy_window_ms`` (lowest RMS energy) in its last ``split_search_ms``;
    the audio after that point opens the next segment, so no sample is lost or duplicated.

    Every decision depends only on the window probabilities and the samples, so the events are the
    same for any chunking of the stream. Audio outside a segment is kept only as far back as the pad.

    Use: ``push(audio)`` returns the ``SegmentStarted``/``SegmentClosed`` events it caused, in order;
    ``open_segment`` gives the audio so far for partial decodes; ``flush()`` ends the stream. Every
    ``SegmentStarted`` is followed by exactly one ``SegmentClosed`` of the same id; ids count from 0.

    Args:
        vad: per-window speech probabilities (``SileroVad`` or a fake); the segmenter owns its state.
        settings: thresholds and durations.
    """

    def __init__(self, vad: SpeechProbabilityModel, settings: VadSettings | None = None) -> None:
        self.vad = vad
        self.settings = settings or VadSettings()
        s = self.settings
        self._window = vad.window_samples
        self._pad = _ms_to_samples(s.speech_pad_ms)
        self._min_speech = _ms_to_samples(s.min_speech_ms)
        self._min_silence = _ms_to_samples(s.min_silence_ms)
        self._max_segment = _ms_to_samples(s.max_segment_ms)
        self._split_search = _ms_to_samples(s.split_search_ms)
        self._energy_window = _ms_to_samples(s.split_energy_window_ms)
        self.reset()

    def reset(self) -> None:
        """Start a new stream at sample 0: reset the VAD, drop all audio and state (ids restart at 0)."""
        self.vad.reset()
        self._buffer = _SampleBuffer()
        self._scanned = 0  # samples covered by VAD windows so far
        self._next_id = 0
        self._floor = 0  # no segment may start before this (end of the previous segment)
        self._candidate: int | None = None  # first sample of a not yet confirmed speech run
        self._segment: tuple[int, int] | None = None  # (segment_id, start_sample)
        self._silence_start: int | None = None  # first sample of the silence in an open segment

    @property
    def open_segment_span(self) -> tuple[int, int, int] | None:
        """``(segment_id, start_sample, end_sample)`` of the segment in progress (its audio ends at the
        last sample pushed), or None; unlike ``open_segment`` it copies no audio."""
        if self._segment is None:
            return None
        return (*self._segment, self._buffer.end)

    @property
    def open_segment(self) -> OpenSegment | None:
        """The segment in progress with its audio (a copy) up to the last sample pushed, or None."""
        if self._segment is None:
            return None
        segment_id, start = self._segment
        return OpenSegment(segment_id, start, self._buffer.slice(start, self._buffer.end))

    @property
    def samples_pushed(self) -> int:
        """Samples received since the start (or the last ``reset``)."""
        return self._buffer.end

    @property
    def buffered_samples(self) -> int:
        """Samples held in memory (open segment, pad and the VAD's partial window)."""
        return self._buffer.end - self._buffer.start

    def push(self, audio: np.ndarray, probabilities: np.ndarray | None = None) -> list[SegmentEvent]:
        """Add float mono 16 kHz samples ``[n]`` (any ``n``, cast to float32).

        Args:
            probabilities: the speech probabilities of the windows this audio completes, when the
                caller computed them (a VAD batched across streams, fed the same audio); None asks
                this segmenter's ``vad``.

        Returns:
            The events caused by the VAD windows completed by this audio, in stream order.

        Raises:
            ValueError: ``audio`` is not one-dimensional.
        """
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"segmenter audio must be mono [n], got shape {audio.shape}")
        self._buffer.append(audio)
        events: list[SegmentEvent] = []
        if probabilities is None:
            probabilities = self.vad.speech_probabilities(audio)
        for probability in probabilities:
            self._step(float(probability), events)
        self._trim()
        return events

    def flush(self) -> list[SegmentEvent]:
        """End of stream: close the open segment with every sample pushed (reason ``"flush"``), or
        up to ``speech_pad_ms`` after its speech if it was in trailing silence.

        A speech candidate shorter than ``min_speech_ms`` is dropped. The segmenter is then empty;
        pushing more continues the same stream (positions and ids keep counting).
        """
        events: list[SegmentEvent] = []
        if self._segment is not None:
            end = self._buffer.end
            if self._silence_start is not None:
                end = min(end, self._silence_start + self._pad)
            self._close(end, "flush", events)
        self._candidate = None
        self._floor = self._buffer.end
        self._trim()
        return events

    def _step(self, probability: float, events: list[SegmentEvent]) -> None:
        s = self.settings
        window_start = self._scanned
        self._scanned += self._window
        if self._segment is None:
            if self._candidate is None:
                if probability >= s.onset_threshold:
                    self._candidate = window_start
            elif probability < s.offset_threshold:
                self._candidate = None
            if self._candidate is not None and self._scanned - self._candidate >= self._min_speech:
                start = max(self._candidate - self._pad, self._floor, self._buffer.start)
                self._open(start, events)
                self._candidate = None
        else:
            if probability >= s.onset_threshold:
                self._silence_start = None
            elif probability < s.offset_threshold and self._silence_start is None:
                self._silence_start = window_start
            if self._silence_start is not None and self._scanned - self._silence_start >= self._min_silence:
                self._close(min(self._silence_start + self._pad, self._scanned), "silence", events)
                return
        if self._segment is not None and self._scanned - self._segment[1] >= self._max_segment:
            self._split(events)

    def _open(self, start: int, events: list[SegmentEvent]) -> None:
        self._segment = (self._next_id, start)
        self._next_id += 1
        self._silence_start = None
        events.append(SegmentStarted(self._segment[0], start))

    def _close(
        self, end: int, reason: Literal["silence", "max_length", "flush"], events: list[SegmentEvent]
    ) -> None:
        assert self._segment is not None
        segment_id, start = self._segment
        end = max(end, start)
        events.append(SegmentClosed(segment_id, start, end, self._buffer.slice(start, end), reason))
        self._segment = None
        self._silence_start = None
        self._floor = end

    def _split(self, events: list[SegmentEvent]) -> None:
        assert self._segment is not None
        start = self._segment[1]
        limit = start + self._max_segment
        split = self._quietest_point(max(start + 1, limit - self._split_search), limit)
        silence_start = self._silence_start
        self._close(split, "max_length", events)
        self._open(split, events)
        if silence_start is not None:
            self._silence_start = max(silence_start, split)

    def _quietest_point(self, begin: int, end: int) -> int:
        """Centre of the lowest-energy ``split_energy_window_ms`` window within ``[begin, end)``
        (hop 10 ms; the latest of equal minima), a sample in ``(begin, end]``."""
        audio = self._buffer.slice(begin, end).astype(np.float64)
        width = min(self._energy_window, audio.size)
        hop = max(1, _ms_to_samples(10))
        cumulative = np.concatenate([[0.0], np.cumsum(audio * audio)])
        starts = np.arange(0, audio.size - width + 1, hop)
        energy = cumulative[starts + width] - cumulative[starts]
        best = starts.size - 1 - int(np.argmin(energy[::-1]))
        return begin + int(starts[best]) + max(1, width // 2)

    def _trim(self) -> None:
        """Drop audio no future segment can contain (bounded memory between segments)."""
        if self._segment is not None:
            keep_from = self._segment[1]
        elif self._candidate is not None:
            keep_from = self._candidate - self._pad
        else:
            keep_from = self._scanned - self._pad
        self._buffer.drop_before(max(keep_from, self._floor))
