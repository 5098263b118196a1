"""Silero VAD for every live session of a gateway in one ONNX Runtime session, batched across sessions.

A session's windows are sequential (the model is recurrent), but windows of different sessions are
independent: the batcher runs window ``t`` of every stream that has one as one batch ``[B, 576]``
with the streams' states stacked ``[2, B, 128]``. With 32 sessions that is one model call per
32 ms of audio instead of 32; each stream is fed exactly as ``captioning.SileroVad`` feeds it (the
previous window's last 64 samples prepended, state carried over), so probabilities equal the
unbatched ones to float rounding (tested).

One worker thread owns the session; callers ``await probabilities(stream, audio)``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gemma_mesh.common.logging import get_logger
from gemma_mesh.gateway.captioning.vad import (
    SAMPLE_RATE_HZ,
    SILERO_CONTEXT_SAMPLES,
    SILERO_STATE_SHAPE,
    SILERO_WINDOW_SAMPLES,
    find_silero_model,
)

log = get_logger(__name__)


@dataclass
class VadStream:
    """One audio stream's recurrent state (a session's; create with ``VadBatcher.new_stream``)."""

    state: np.ndarray = field(default_factory=lambda: np.zeros(SILERO_STATE_SHAPE, np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(SILERO_CONTEXT_SAMPLES, np.float32))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class _Job:
    stream: VadStream
    windows: list[np.ndarray]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    probabilities: list[float] = field(default_factory=list)


class VadBatcher:
    """The shared VAD of a gateway process.

    Args:
        model_path: ``silero_vad.onnx`` (None: the one shipped with gemma-mesh).
        max_batch: streams per model call.

    Raises:
        FileNotFoundError: no model (see ``captioning.find_silero_model``).
    """

    def __init__(self, model_path: str | Path | None = None, *, max_batch: int = 64) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        path = find_silero_model(model_path)
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE_HZ, dtype=np.int64)
        self.max_batch = max_batch
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.calls = 0
        self.windows = 0
        self._thread = threading.Thread(target=self._run, name="vad-batcher", daemon=True)
        self._thread.start()

    @staticmethod
    def new_stream() -> VadStream:
        return VadStream()

    async def probabilities(self, stream: VadStream, audio: np.ndarray) -> np.ndarray:
        """Speech probability of every 512-sample window ``audio`` completes in ``stream`` -> float32 ``[k]``.

        One call per stream at a time (a session's VAD loop is sequential). A trailing partial
        window waits in the stream for the next call.
        """
        samples = np.concatenate([stream.pending, np.asarray(audio, np.float32)])
        count = samples.size // SILERO_WINDOW_SAMPLES
        stream.pending = samples[count * SILERO_WINDOW_SAMPLES :].copy()
        if count == 0:
            return np.zeros(0, np.float32)
        windows = [samples[i * SILERO_WINDOW_SAMPLES : (i + 1) * SILERO_WINDOW_SAMPLES] for i in range(count)]
        loop = asyncio.get_running_loop()
        job = _Job(stream, windows, loop.create_future(), loop)
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
        return await job.future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                jobs = [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]
            try:
                self._step_all(jobs)
            except Exception as error:  # a failed model call fails these callers, not the gateway
                log.exception("vad batch failed")
                for job in jobs:
                    job.loop.call_soon_threadsafe(_fail, job.future, error)
                continue
            for job in jobs:
                job.loop.call_soon_threadsafe(_resolve, job.future, np.array(job.probabilities, np.float32))

    def _step_all(self, jobs: list[_Job]) -> None:
        for t in range(max(len(j.windows) for j in jobs)):
            active = [j for j in jobs if t < len(j.windows)]
            inputs = np.stack([np.concatenate([j.stream.context, j.windows[t]]) for j in active])
            state = np.concatenate([j.stream.state for j in active], axis=1)
            output, state = self._session.run(None, {"input": inputs, "state": state, "sr": self._sr})
            self.calls += 1
            self.windows += len(active)
            output = output.reshape(len(active), -1)
            for b, job in enumerate(active):
                job.stream.state = np.ascontiguousarray(state[:, b : b + 1])
                job.stream.context = inputs[b, -SILERO_CONTEXT_SAMPLES:].copy()
                job.probabilities.append(float(output[b, 0]))


class StreamVad:
    """The segmenter-facing side of a ``VadStream`` (``SpeechProbabilityModel``): the segmenter gets
    its probabilities from ``VadBatcher.probabilities`` through ``VadSegmenter.push(audio, probs)``."""

    window_samples = SILERO_WINDOW_SAMPLES

    def __init__(self, stream: VadStream) -> None:
        self.stream = stream

    def speech_probabilities(self, audio: np.ndarray) -> np.ndarray:
        raise RuntimeError("a batched stream's probabilities come from VadBatcher.probabilities")

    def reset(self) -> None:
        fresh = VadStream()
        self.stream.state, self.stream.context, self.stream.pending = (
            fresh.state,
            fresh.context,
            fresh.pending,
        )


def _resolve(future: asyncio.Future, value: np.ndarray) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
