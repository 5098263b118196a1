"""``model.audio_io``: PCM decoding, chunked resampling, every container, truncation and rate checks."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from audio_helpers import wav_bytes

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.audio_io import (
    PcmStreamDecoder,
    decode_audio,
    decode_audio_file,
    decode_pcm,
    resample,
)


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono, -0.5 * mono], axis=1)


def _webm(samples: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as container:
        stream = container.add_stream("libopus", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


def test_decode_pcm_s16_and_f32_downmix():
    stereo = np.array([[0.5, -0.5], [0.25, 0.75]], np.float32)
    assert np.allclose(decode_pcm(stereo.tobytes(), "f32le", 2), [0.0, 0.5])
    s16 = np.array([16384, -32768], "<i2").tobytes()
    assert np.allclose(decode_pcm(s16, "s16le", 1), [0.5, -1.0])


@pytest.mark.parametrize(
    ("data", "encoding", "channels", "match"),
    [
        (b"", "s16le", 1, "empty"),
        (b"\x00\x00\x00", "s16le", 1, "whole number"),
        (b"\x00\x00", "s16le", 0, "zero channels"),
        (np.array([np.nan], "<f4").tobytes(), "f32le", 1, "NaN"),
        (np.array([np.inf, 0], "<f4").tobytes(), "f32le", 2, "infinite"),
        (b"\x00\x00", "u8", 1, "encoding"),
    ],
)
def test_decode_pcm_refuses_bad_input(data, encoding, channels, match):
    with pytest.raises(InvalidRequest, match=match):
        decode_pcm(data, encoding, channels)


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (48_000, 2), (44_100, 1), (8_000, 3)])
def test_stream_decoder_equals_one_shot(rate, channels):
    pcm = (_tone(1.3, rate, min(channels, 2)).reshape(-1, min(channels, 2)) * 32767).astype("<i2")
    pcm = np.repeat(pcm, 2, axis=1)[:, :channels] if channels > 2 else pcm
    data = pcm.tobytes()
    whole = resample(decode_pcm(data, "s16le", channels), rate, 16_000)
    decoder = PcmStreamDecoder("s16le", rate, channels, 16_000)
    parts = [decoder.push(data[i : i + 1001]) for i in range(0, len(data), 1001)]  # splits frames
    streamed = np.concatenate([*parts, decoder.flush()])
    assert streamed.shape == whole.shape and np.abs(streamed - whole).max() == 0.0


def test_stream_decoder_refuses_a_partial_last_frame_and_bad_config():
    decoder = PcmStreamDecoder("f32le", 16_000, 1, 16_000)
    decoder.push(b"\x00" * 6)
    with pytest.raises(InvalidRequest, match="inside a sample frame"):
        decoder.flush()
    with pytest.raises(InvalidRequest, match="sample_rate_hz"):
        PcmStreamDecoder("s16le", 0, 1, 16_000)
    with pytest.raises(InvalidRequest, match="zero channels"):
        PcmStreamDecoder("s16le", 16_000, 0, 16_000)


@pytest.mark.parametrize(
    ("fmt", "subtype", "tol"),
    [
        ("WAV", "PCM_16", 1e-4),
        ("FLAC", "PCM_16", 1e-4),
        ("OGG", "VORBIS", None),
        ("OGG", "OPUS", None),
        ("MP3", "MPEG_LAYER_III", None),
    ],
)
def test_containers_decode_at_their_own_rate(fmt, subtype, tol):
    x = _tone(0.5, 48_000, channels=2)
    samples, rate = decode_audio_file(wav_bytes(x, 48_000, subtype=subtype, fmt=fmt))
    assert rate == 48_000 and abs(samples.shape[0] - 24_000) < 2_000
    if tol is not None:
        assert np.abs(samples - x.mean(axis=1)).max() < tol


def test_webm_opus_goes_through_pyav():
    samples, rate = decode_audio_file(_webm(_tone(0.5, 48_000), 48_000))
    assert rate == 48_000 and abs(samples.shape[0] - 24_000) < 2_000
    assert np.abs(samples).max() > 0.1


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "MP3", "WEBM"])
def test_truncated_files_are_refused(fmt):
    x = _tone(1.0, 48_000)
    if fmt == "WEBM":
        data = _webm(x, 48_000)
    else:
        data = wav_bytes(x, 48_000, fmt=fmt, subtype="MPEG_LAYER_III" if fmt == "MP3" else "PCM_16")
    with pytest.raises(InvalidRequest, match=r"truncated|corrupt|decode"):
        decode_audio_file(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00", b"not audio at all" * 20])
def test_empty_and_corrupt_files_are_refused(data):
    with pytest.raises(InvalidRequest):
        decode_audio_file(data)


def test_declared_rate_must_match_the_header():
    data = wav_bytes(_tone(0.2, 16_000))
    assert decode_audio(data, 16_000, declared_rate_hz=16_000).shape == (3_200,)
    with pytest.raises(InvalidRequest, match=r"8000 Hz contradicts the file's header \(16000 Hz"):
        decode_audio(data, 16_000, declared_rate_hz=8_000)


def test_zero_channel_wav_is_refused():
    data = bytearray(wav_bytes(_tone(0.1, 16_000)))
    data[22:24] = (0).to_bytes(2, "little")  # fmt chunk: NumChannels
    with pytest.raises(InvalidRequest):
        decode_audio_file(bytes(data))
