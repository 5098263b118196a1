"""The gateway's shared VAD: windows of several streams batched in one ONNX Runtime call give the
probabilities (and the segments) that each stream gets from its own ``SileroVad``."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gemma_mesh.gateway.captioning import SileroVad, VadSegmenter, VadSettings
from gemma_mesh.gateway.live.vad_batcher import StreamVad, VadBatcher
from gemma_mesh.model.audio_io import decode_audio


@pytest.mark.asyncio
async def test_batched_streams_equal_their_own_vad(librivox_clips):
    rng = np.random.default_rng(0)
    silence = np.zeros(16000, np.float32)
    audios = [np.concatenate([silence, decode_audio(p, 16000), silence]) for p in librivox_clips[:3]]
    audios.append((rng.standard_normal(5 * 16000) * 0.05).astype(np.float32))  # noise
    batcher = VadBatcher()
    try:
        streams = [batcher.new_stream() for _ in audios]
        segmenters = [VadSegmenter(StreamVad(s), VadSettings()) for s in streams]
        batched: list[list[float]] = [[] for _ in audios]
        events: list[list] = [[] for _ in audios]

        async def feed(i: int) -> None:
            chunk = [1600, 800, 2731][i % 3]  # different chunkings, so windows interleave
            for start in range(0, len(audios[i]), chunk):
                piece = audios[i][start : start + chunk]
                probs = await batcher.probabilities(streams[i], piece)
                batched[i] += probs.tolist()
                events[i] += segmenters[i].push(piece, probs)
                await asyncio.sleep(0)
            events[i] += segmenters[i].flush()

        await asyncio.gather(*(feed(i) for i in range(len(audios))))
        assert batcher.calls < batcher.windows  # windows of different streams shared calls
    finally:
        batcher.close()
    for i, audio in enumerate(audios):
        own = SileroVad()
        expected = own.speech_probabilities(audio)
        assert len(batched[i]) == len(expected)
        np.testing.assert_allclose(batched[i], expected, atol=1e-5)
        reference = VadSegmenter(SileroVad(), VadSettings())
        ref_events = reference.push(audio) + reference.flush()
        spans = [(e.start_sample, e.end_sample) for e in events[i] if hasattr(e, "end_sample")]
        assert spans == [(e.start_sample, e.end_sample) for e in ref_events if hasattr(e, "end_sample")]
    assert events[3] == []  # noise: no segment at all
