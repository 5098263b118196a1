"""Silero VAD and the VAD segmenter on real LibriVox speech, silence and noise, plus scripted
probabilities for the exact hysteresis, padding and splitting rules."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from gemma_mesh.gateway.captioning import (
    SegmentClosed,
    SegmentStarted,
    SileroVad,
    VadSegmenter,
    VadSettings,
    find_silero_model,
)
from gemma_mesh.gateway.captioning.vad import SHIPPED_SILERO_MODEL

RATE_HZ = 16_000
WINDOW = 512
PAD = 200 * RATE_HZ // 1000  # the default speech_pad_ms in samples
TOLERANCE = 300 * RATE_HZ // 1000


def load_clip(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (RATE_HZ, 1, 2)
        return np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32768


def speech_span(audio: np.ndarray, frame: int = 320) -> tuple[int, int]:
    """Energy ground truth: first and last sample of the 20 ms frames 15 dB above the noise floor."""
    n = audio.size // frame
    energy_db = 10 * np.log10(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(energy_db > np.percentile(energy_db, 5) + 15)
    return int(loud[0]) * frame, int(loud[-1] + 1) * frame


def noise(kind: str, seconds: float, dbfs: float = -20.0, seed: int = 0) -> np.ndarray:
    """Gaussian white, pink (1/f) or brown (1/f^2) noise with RMS ``dbfs``."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE_HZ)
    if kind == "white":
        x = rng.standard_normal(n)
    else:
        exponent = {"pink": 1.0, "brown": 2.0}[kind]
        freqs = np.fft.rfftfreq(n)
        freqs[0] = freqs[1]
        spectrum = (rng.standard_normal(freqs.size) + 1j * rng.standard_normal(freqs.size)) / freqs ** (
            exponent / 2
        )
        x = np.fft.irfft(spectrum, n)
    x = x / np.sqrt(np.mean(x**2)) * 10 ** (dbfs / 20)
    return x.astype(np.float32)


def segment(audio: np.ndarray, chunk: int, settings: VadSettings | None = None, vad=None) -> list:
    segmenter = VadSegmenter(vad or SileroVad(), settings)
    events = []
    for i in range(0, audio.size, chunk):
        events += segmenter.push(audio[i : i + chunk])
    return events + segmenter.flush()


def closed(events: list) -> list[SegmentClosed]:
    return [e for e in events if isinstance(e, SegmentClosed)]


def check_event_stream(events: list, audio: np.ndarray) -> None:
    """Ids count from 0, every start is closed once, segments are ordered, disjoint and hold the audio."""
    expected_id, previous_end, open_id = 0, 0, None
    for event in events:
        if isinstance(event, SegmentStarted):
            assert open_id is None and event.segment_id == expected_id
            assert event.start_sample >= previous_end
            open_id, open_start = event.segment_id, event.start_sample
        else:
            assert event.segment_id == open_id and event.start_sample == open_start
            assert event.start_sample < event.end_sample <= audio.size
            assert event.audio.dtype == np.float32
            np.testing.assert_array_equal(event.audio, audio[event.start_sample : event.end_sample])
            previous_end, open_id, expected_id = event.end_sample, None, expected_id + 1
    assert open_id is None


# --- SileroVad ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(librivox_clips) -> list[np.ndarray]:
    return [load_clip(p) for p in librivox_clips]


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def test_speech_probabilities_high_in_speech(vad, clips):
    for clip in clips:
        vad.reset()
        probabilities = vad.speech_probabilities(clip)
        assert probabilities.dtype == np.float32 and probabilities.shape == (clip.size // WINDOW,)
        begin, end = speech_span(clip)
        inside = probabilities[begin // WINDOW + 3 : end // WINDOW - 3]
        assert np.median(inside) > 0.95
        assert np.mean(inside > 0.5) > 0.9


@pytest.mark.parametrize("kind", ["silence", "white", "pink", "brown"])
def test_speech_probabilities_low_on_silence_and_noise(vad, kind):
    audio = np.zeros(2 * RATE_HZ, np.float32) if kind == "silence" else noise(kind, 10.0)
    vad.reset()
    probabilities = vad.speech_probabilities(audio)
    assert probabilities.size == audio.size // WINDOW
    assert probabilities.max() < 0.2


def test_probabilities_do_not_depend_on_chunking(vad, clips):
    audio = clips[1]
    vad.reset()
    whole = vad.speech_probabilities(audio)
    vad.reset()
    rng = np.random.default_rng(1)
    parts, i = [], 0
    while i < audio.size:
        step = int(rng.integers(1, 3000))
        parts.append(vad.speech_probabilities(audio[i : i + step]))
        i += step
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert vad.windows_done == audio.size // WINDOW


def silero_wheel_model() -> Path:
    """silero-vad's own ``silero_vad.onnx`` (the test dependency's copy), found without importing it."""
    spec = importlib.util.find_spec("silero_vad")
    assert spec is not None and spec.submodule_search_locations, "silero-vad (a test dependency) missing"
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


def test_matches_silero_onnx_wrapper(vad, clips):
    """The shipped model, fed as SileroVad feeds it, gives silero-vad's own OnnxWrapper's
    probabilities on its own model file (the test may import torch)."""
    import torch
    from silero_vad.utils_vad import OnnxWrapper

    audio = clips[0][: clips[0].size // WINDOW * WINDOW]
    reference = OnnxWrapper(str(silero_wheel_model()), force_onnx_cpu=True)
    expected = reference.audio_forward(torch.from_numpy(audio), RATE_HZ).numpy().reshape(-1)
    assert expected.size == audio.size // WINDOW and expected.max() > 0.9 and expected.min() < 0.1
    vad.reset()
    np.testing.assert_allclose(vad.speech_probabilities(audio), expected, rtol=0, atol=1e-6)


def test_serving_never_imports_silero_package_or_torch():
    code = (
        "import sys, numpy as np\n"
        "from gemma_mesh.gateway.captioning import SileroVad, VadSegmenter\n"
        "VadSegmenter(SileroVad()).push(np.zeros(16000, np.float32))\n"
        "assert 'silero_vad' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{root / 'services'}", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_model_location_and_errors(tmp_path):
    found = find_silero_model()
    assert found == SHIPPED_SILERO_MODEL and found.is_file()
    # Shipped byte for byte from silero-vad 6.2.3, with the MIT licence beside it.
    assert (
        hashlib.sha256(found.read_bytes()).hexdigest()
        == hashlib.sha256(silero_wheel_model().read_bytes()).hexdigest()
    )
    licence = (found.parent / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "Silero Team" in licence
    assert find_silero_model(found) == found
    with pytest.raises(FileNotFoundError, match="GEMMA_MESH_GATEWAY_VAD_MODEL_PATH"):
        SileroVad(tmp_path / "missing.onnx")
    not_silero = tmp_path / "identity.onnx"
    _write_identity_model(not_silero)
    with pytest.raises(ValueError, match="not a Silero VAD"):
        SileroVad(not_silero)


def _write_identity_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_mono_audio_required(vad):
    with pytest.raises(ValueError, match="mono"):
        vad.speech_probabilities(np.zeros((2, 512), np.float32))
    with pytest.raises(ValueError, match="mono"):
        VadSegmenter(vad).push(np.zeros((512, 2), np.float32))


# --- VadSegmenter on real audio ----------------------------------------------------------------


def test_padded_clip_segments_cover_the_speech(clips):
    silence = np.zeros(2 * RATE_HZ, np.float32)
    for clip in clips:
        audio = np.concatenate([silence, clip, silence])
        begin, end = speech_span(clip)
        begin, end = begin + silence.size, end + silence.size
        events = segment(audio, 4000)
        check_event_stream(events, audio)
        segments = closed(events)
        assert segments and all(s.reason == "silence" for s in segments)
        covered = np.zeros(audio.size, bool)
        for s in segments:
            covered[s.start_sample : s.end_sample] = True
        assert covered[begin:end].all()  # no speech frame left out
        assert segments[0].start_sample >= begin - PAD - TOLERANCE  # little silence taken in
        assert segments[-1].end_sample <= end + PAD + TOLERANCE


@pytest.mark.parametrize("kind", ["silence", "white", "pink", "brown"])
def test_no_segments_on_silence_or_noise(kind):
    audio = np.zeros(20 * RATE_HZ, np.float32) if kind == "silence" else noise(kind, 20.0, seed=3)
    segmenter = VadSegmenter(SileroVad())
    for i in range(0, audio.size, RATE_HZ):
        assert segmenter.push(audio[i : i + RATE_HZ]) == []
        assert segmenter.buffered_samples <= PAD + WINDOW  # silence is not retained beyond the pad
    assert segmenter.open_segment is None and segmenter.flush() == []


@pytest.fixture(scope="module")
def three_clips(clips) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Three clips with 1.5 s of silence between them, and each clip's speech span in the stream."""
    gap = np.zeros(int(1.5 * RATE_HZ), np.float32)
    parts, spans, position = [], [], 0
    for clip in clips[:3]:
        if parts:
            parts.append(gap)
            position += gap.size
        begin, end = speech_span(clip)
        spans.append((position + begin, position + end))
        parts.append(clip)
        position += clip.size
    return np.concatenate(parts), spans


def test_three_clips_give_segments_at_the_clip_boundaries(three_clips):
    audio, spans = three_clips
    events = segment(audio, 4000)
    check_event_stream(events, audio)
    segments = closed(events)
    assert len(segments) >= 3
    for begin, end in spans:
        own = [s for s in segments if s.end_sample > begin - PAD - TOLERANCE and s.start_sample < end + PAD]
        assert own, (begin, end)
        assert all(
            begin - PAD - TOLERANCE <= s.start_sample and s.end_sample <= end + PAD + TOLERANCE for s in own
        )
        assert abs(own[0].start_sample - (begin - PAD)) <= TOLERANCE
        assert abs(own[-1].end_sample - (end + PAD)) <= TOLERANCE


def test_segments_do_not_depend_on_chunk_size(three_clips):
    audio, _ = three_clips
    reference = segment(audio, 160)
    rng = np.random.default_rng(7)
    random_chunks = VadSegmenter(SileroVad())
    other, i = [], 0
    while i < audio.size:
        step = int(rng.integers(1, 5000))
        other += random_chunks.push(audio[i : i + step])
        i += step
    other += random_chunks.flush()
    for events in (segment(audio, 4000), other):
        assert [type(e) for e in events] == [type(e) for e in reference]
        for a, b in zip(events, reference, strict=True):
            assert (a.segment_id, a.start_sample) == (b.segment_id, b.start_sample)
            if isinstance(a, SegmentClosed):
                assert (a.end_sample, a.reason) == (b.end_sample, b.reason)
                np.testing.assert_array_equal(a.audio, b.audio)


def test_long_speech_is_split_at_quiet_points_without_losing_samples(clips):
    """70 s of speech with no pause long enough to close a segment: split at <= 30 s, sample exact."""
    trimmed = [clip[slice(*speech_span(clip))] for clip in clips]
    parts, total = [], 0
    while total < 70 * RATE_HZ:
        parts.append(trimmed[len(parts) % len(trimmed)])
        total += parts[-1].size
    audio = np.concatenate(parts)
    settings = VadSettings()
    events = segment(audio, 3200, settings)
    check_event_stream(events, audio)
    segments = closed(events)
    assert len(segments) >= 3 and sum(s.reason == "max_length" for s in segments) >= 2
    assert all(s.end_sample - s.start_sample <= settings.max_segment_ms * RATE_HZ // 1000 for s in segments)
    for previous, following in itertools.pairwise(segments):
        assert following.start_sample == previous.end_sample  # contiguous: no gap, no overlap
    assert segments[0].start_sample == 0 and segments[-1].reason == "flush"
    np.testing.assert_array_equal(
        np.concatenate([s.audio for s in segments]), audio[segments[0].start_sample : segments[-1].end_sample]
    )
    assert segments[-1].end_sample == audio.size
    window = settings.split_energy_window_ms * RATE_HZ // 1000
    for s in segments:
        if s.reason != "max_length":
            continue
        assert s.end_sample - s.start_sample >= (settings.max_segment_ms - settings.split_search_ms) * 16
        search = audio[s.start_sample + 25 * RATE_HZ : s.start_sample + 30 * RATE_HZ].astype(np.float64)
        energies = [np.mean(search[i : i + window] ** 2) for i in range(0, search.size - window + 1, 160)]
        at_split = np.mean(
            audio[s.end_sample - window // 2 : s.end_sample + window // 2].astype(np.float64) ** 2
        )
        assert at_split <= min(energies) * (1 + 1e-3)  # the quietest 100 ms of the final 5 s


def test_flush_closes_the_open_segment(clips):
    audio = np.concatenate([np.zeros(RATE_HZ, np.float32), clips[0][: 3 * RATE_HZ]])  # ends mid-speech
    segmenter = VadSegmenter(SileroVad())
    events = segmenter.push(audio)
    assert [type(e) for e in events] == [SegmentStarted]
    current = segmenter.open_segment
    assert current is not None and current.segment_id == 0
    np.testing.assert_array_equal(current.audio, audio[current.start_sample :])
    assert segmenter.open_segment_span == (0, current.start_sample, audio.size)
    assert segmenter.samples_pushed == audio.size
    flushed = segmenter.flush()
    assert len(flushed) == 1 and flushed[0].reason == "flush"
    assert (flushed[0].start_sample, flushed[0].end_sample) == (current.start_sample, audio.size)
    assert segmenter.open_segment is None and segmenter.open_segment_span is None and segmenter.flush() == []


# --- VadSegmenter rules, with scripted probabilities ---------------------------------------------


class ScriptedVad:
    """Window ``w`` has probability ``script[w]`` (0 beyond it); same streaming contract as SileroVad."""

    window_samples = WINDOW

    def __init__(self, script: list[float]) -> None:
        self.script = script
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.windows_done = 0

    def speech_probabilities(self, audio: np.ndarray) -> np.ndarray:
        self.samples += audio.size
        count = self.samples // WINDOW - self.windows_done
        out = [
            self.script[w] if w < len(self.script) else 0.0
            for w in range(self.windows_done, self.windows_done + count)
        ]
        self.windows_done += count
        return np.array(out, np.float32)


def scripted(*runs: tuple[float, int]) -> list[float]:
    """Probability runs: (probability, windows)."""
    return [p for p, n in runs for _ in range(n)]


def run_script(script: list[float], settings: VadSettings | None = None, audio=None) -> list:
    if audio is None:
        audio = np.arange(len(script) * WINDOW + 40 * WINDOW, dtype=np.float32)
    return segment(audio, 1000, settings, vad=ScriptedVad(script))


def spans(events: list) -> list[tuple[int, int, str]]:
    return [(s.start_sample, s.end_sample, s.reason) for s in closed(events)]


def test_onset_needs_min_speech_ms():
    # 250 ms = 4000 samples: 7 windows (3584 samples) are too short, 8 windows (4096) open a segment.
    assert run_script(scripted((0.0, 20), (0.9, 7), (0.0, 40))) == []
    assert spans(run_script(scripted((0.0, 20), (0.9, 8), (0.0, 40)))) == [
        (20 * WINDOW - PAD, 28 * WINDOW + PAD, "silence")
    ]
    # A dip below offset_threshold restarts the count; a dip between the thresholds does not.
    assert run_script(scripted((0.0, 20), (0.9, 5), (0.2, 1), (0.9, 5), (0.0, 40))) == []
    assert len(closed(run_script(scripted((0.0, 20), (0.9, 5), (0.4, 1), (0.9, 5), (0.0, 40))))) == 1


def test_offset_needs_min_silence_ms():
    # 500 ms = 8000 samples: 15 silent windows (7680) keep one segment, 16 (8192) close it.
    one = run_script(scripted((0.0, 20), (0.9, 20), (0.1, 15), (0.9, 20), (0.0, 40)))
    assert spans(one) == [(20 * WINDOW - PAD, 75 * WINDOW + PAD, "silence")]
    two = run_script(scripted((0.0, 20), (0.9, 20), (0.1, 16), (0.9, 20), (0.0, 40)))
    assert spans(two) == [
        (20 * WINDOW - PAD, 40 * WINDOW + PAD, "silence"),
        (56 * WINDOW - PAD, 76 * WINDOW + PAD, "silence"),
    ]
    # Probabilities between the thresholds neither start nor cancel silence (hysteresis).
    held = run_script(scripted((0.0, 20), (0.9, 20), (0.4, 100), (0.0, 40)))
    assert spans(held) == [(20 * WINDOW - PAD, 140 * WINDOW + PAD, "silence")]
    counted = run_script(scripted((0.0, 20), (0.9, 20), (0.1, 5), (0.4, 11), (0.9, 5), (0.0, 40)))
    assert spans(counted)[0] == (20 * WINDOW - PAD, 40 * WINDOW + PAD, "silence")


def test_padding_is_clipped_at_stream_start_and_previous_segment():
    settings = VadSettings(min_silence_ms=100, speech_pad_ms=300)  # pad > silence: pads would overlap
    events = run_script(scripted((0.9, 10), (0.0, 4), (0.9, 10), (0.0, 40)), settings)
    first, second = spans(events)
    assert first[0] == 0  # clipped at the stream start
    assert first[1] == 10 * WINDOW + 4 * WINDOW  # pad clipped to what the VAD has seen
    assert second[0] == first[1]  # not before the previous segment's end


def test_max_length_split_at_quietest_point():
    settings = VadSettings(max_segment_ms=10_000, split_search_ms=2_000)
    seconds = 25
    audio = np.full(seconds * RATE_HZ, 0.1, np.float32)
    quiet = 9 * RATE_HZ  # a 100 ms pause at 9 s, inside the final 2 s of the first 10 s segment
    audio[quiet : quiet + 1600] = 0.0
    events = run_script([0.99] * (audio.size // WINDOW), settings, audio)
    check_event_stream(events, audio)
    got = spans(events)
    assert got[0] == (0, quiet + 800, "max_length")
    assert got[1][0] == quiet + 800 and got[1][2] == "max_length"
    assert got[1][1] - got[1][0] <= 10 * RATE_HZ and got[1][1] - got[1][0] >= 8 * RATE_HZ
    assert got[-1][1] == audio.size and got[-1][2] == "flush"


def test_settings_validation():
    with pytest.raises(ValidationError, match="offset_threshold"):
        VadSettings(onset_threshold=0.3, offset_threshold=0.5)
    with pytest.raises(ValidationError, match="split_search_ms"):
        VadSettings(max_segment_ms=4000, split_search_ms=5000)
    defaults = VadSettings()
    assert (defaults.onset_threshold, defaults.offset_threshold) == (0.5, 0.35)
    assert (defaults.min_speech_ms, defaults.min_silence_ms, defaults.speech_pad_ms) == (250, 500, 200)
    assert (defaults.max_segment_ms, defaults.model_path) == (30_000, None)
