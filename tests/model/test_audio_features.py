"""LogMelExtractor vs transformers' Gemma4AudioFeatureExtractor on real LibriVox speech."""

from __future__ import annotations

import glob
import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from transformers import Gemma4AudioFeatureExtractor, Gemma4Processor

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.audio_features import LogMelExtractor, mel_filter_bank_htk, periodic_hann_window

LIBRIVOX = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))
AUDIO_SEQ_LENGTH = 750  # Gemma4Processor default
MAX_ABS_DIFF = 1e-5  # target; the port is in fact bit-exact on the same numpy


def _read(path: str) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32")
    assert rate == 16_000 and samples.ndim == 1
    return samples


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """All five clips end to end (395 680 samples, 24.7 s of real speech)."""
    assert len(LIBRIVOX) == 5
    return np.concatenate([_read(p) for p in LIBRIVOX])


@pytest.fixture(scope="module")
def reference() -> Gemma4AudioFeatureExtractor:
    return Gemma4AudioFeatureExtractor()


@pytest.fixture(scope="module")
def extractor(reference: Gemma4AudioFeatureExtractor) -> LogMelExtractor:
    # What a checkpoint holds on disk: the JSON form of to_dict().
    return LogMelExtractor.from_settings(
        json.loads(reference.to_json_string()), audio_seq_length=AUDIO_SEQ_LENGTH
    )


def _reference(fe: Gemma4AudioFeatureExtractor, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A bare 1-D array crashes in transformers 5.23 (see test_transformers_rejects_bare_1d_array);
    # a list of one clip is what Gemma4Processor passes.
    out = fe([waveform], return_tensors="np")
    return out["input_features"][0], out["input_features_mask"][0]


def _assert_matches(ours: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    features, mask = ours
    ref_features, ref_mask = ref
    assert features.dtype == np.float32 and mask.dtype == np.bool_
    assert features.shape == ref_features.shape and mask.shape == ref_mask.shape
    np.testing.assert_array_equal(mask, ref_mask)
    if features.size:
        assert np.abs(features - ref_features).max() <= MAX_ABS_DIFF
        np.testing.assert_array_equal(features, ref_features)


def _processor_count(mask: np.ndarray) -> int:
    """Gemma4Processor.replace_audio_token, run on transformers' own code with a stub tokenizer side."""
    stub = SimpleNamespace(boa_token="<boa>", audio_token="<a>", eoa_token="<eoa>")
    text = Gemma4Processor.replace_audio_token(stub, {"input_features_mask": [mask]}, 0)
    return text.count("<a>")


@pytest.mark.parametrize("path", LIBRIVOX, ids=lambda p: p.rsplit("-", 1)[-1])
def test_librivox_clip_matches_transformers(path, reference, extractor):
    waveform = _read(path)
    ours = extractor(waveform)
    ref = _reference(reference, waveform)
    _assert_matches(ours, ref)
    assert ours[0].shape[1] == 128
    assert extractor.num_soft_tokens(len(waveform)) == _processor_count(ref[1])


@pytest.mark.parametrize("num_samples", [1, 160, 161, 320, 321, 16_000, 16_001, 480_000])
def test_edge_lengths_match_transformers(num_samples, speech, reference, extractor):
    waveform = np.resize(speech, num_samples)  # real speech, tiled to reach 30 s
    ours = extractor(waveform)
    ref = _reference(reference, waveform)
    _assert_matches(ours, ref)
    assert len(ours[1]) == extractor.num_frames(num_samples)
    count = extractor.num_soft_tokens(num_samples)
    assert count == min(_processor_count(ref[1]), AUDIO_SEQ_LENGTH)
    stub = SimpleNamespace(feature_extractor=reference, audio_seq_length=AUDIO_SEQ_LENGTH)
    assert count == Gemma4Processor._compute_audio_num_tokens(stub, np.zeros(num_samples), 16_000)


def test_edge_length_shapes(extractor):
    # 1 sample: padded to 128 samples, shorter than one 321-sample window -> no frames at all.
    assert extractor(np.zeros(1, np.float32))[0].shape == (0, 128)
    assert extractor.num_soft_tokens(1) == 0
    # one hop: one frame, but it reaches into the padding, so it is masked out.
    features, mask = extractor(np.full(160, 0.1, np.float32))
    assert features.shape == (1, 128) and not mask.any() and not features.any()
    # exactly 30 s: 2999 frames, all real, 750 soft tokens (= audio_seq_length).
    features, mask = extractor(np.zeros(480_000, np.float32))
    assert features.shape == (2999, 128) and mask.all()
    assert extractor.num_soft_tokens(480_000) == 750


def test_num_soft_tokens_sweep(reference, extractor):
    stub = SimpleNamespace(feature_extractor=reference, audio_seq_length=AUDIO_SEQ_LENGTH)
    for n in [*range(1, 1300, 7), 15_999, 16_000, 16_001, 160_000, 479_999, 480_000]:
        mask = extractor.frame_mask(n)
        assert extractor.num_soft_tokens(n) == min(_processor_count(mask), AUDIO_SEQ_LENGTH)
        assert extractor.num_soft_tokens(n) == Gemma4Processor._compute_audio_num_tokens(
            stub, np.zeros(n), 16_000
        )


def test_float64_input_is_cast_like_transformers(speech, reference, extractor):
    waveform = speech[:50_000].astype(np.float64)
    _assert_matches(extractor(waveform), _reference(reference, waveform))


@pytest.mark.parametrize(
    "settings",
    [
        {"preemphasis": 0.97, "preemphasis_htk_flavor": True},
        {"preemphasis": 0.97, "preemphasis_htk_flavor": False},
        {"fft_overdrive": True, "input_scale_factor": 0.5, "mel_floor": 1e-5},
        {"feature_size": 80, "min_frequency": 125.0, "max_frequency": 7600.0, "frame_length_ms": 25.0},
        {"per_bin_mean": list(np.linspace(-8, 0, 128)), "per_bin_stddev": list(np.linspace(1, 3, 128))},
    ],
    ids=["preemph-htk", "preemph-plain", "overdrive-scale", "80-bins-25ms", "per-bin-norm"],
)
def test_non_default_settings_match_transformers(settings, speech):
    reference = Gemma4AudioFeatureExtractor(**settings)
    d = dict(settings)
    d.update(
        {k: v for k, v in reference.to_dict().items() if k in ("fft_length", "frame_length", "hop_length")}
    )
    extractor = LogMelExtractor.from_settings(d)
    waveform = speech[20_000:70_000]
    _assert_matches(extractor(waveform), _reference(reference, waveform))


def test_filter_bank_and_window_match_transformers(reference, extractor):
    np.testing.assert_array_equal(extractor.mel_filters, reference.mel_filters)
    np.testing.assert_array_equal(extractor.window, reference.window)
    assert extractor.mel_filters.shape == (257, 128)
    # The lowest filter (not the top one, as transformers' comment says) falls between FFT bins.
    assert np.flatnonzero(extractor.mel_filters.max(axis=0) == 0).tolist() == [0]
    assert mel_filter_bank_htk(257, 128, 0.0, 8000.0, 16_000).dtype == np.float64
    assert periodic_hann_window(4).tolist() == pytest.approx([0.0, 0.5, 1.0, 0.5])


def test_transformers_rejects_bare_1d_array(reference, speech):
    # Documented surprise: Gemma4AudioFeatureExtractor(waveform) with a 1-D array fails in 5.23.
    with pytest.raises(ValueError):
        reference(speech[:16_000], return_tensors="np")


@pytest.mark.parametrize(
    ("waveform", "match"),
    [
        (np.zeros(0, np.float32), "empty"),
        (np.zeros(480_001, np.float32), "480000 samples.*segment"),
        (np.array([0.0, np.nan, 0.1], np.float32), "NaN or infinite"),
        (np.array([0.0, np.inf, 0.1], np.float32), "NaN or infinite"),
        (np.zeros((2, 16_000), np.float32), "mono"),
        (np.zeros(16_000, np.int16), "floating point"),
    ],
    ids=["empty", "over-30s", "nan", "inf", "stereo", "int16"],
)
def test_bad_input_is_refused(waveform, match, extractor):
    with pytest.raises(InvalidRequest, match=match):
        extractor(waveform)


def test_max_length_setting_is_honoured(speech):
    extractor = LogMelExtractor.from_settings({"max_length": 16_000})
    extractor(speech[:16_000])
    with pytest.raises(InvalidRequest, match="16000 samples"):
        extractor(speech[:16_001])


def test_inconsistent_or_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="frame_length"):
        LogMelExtractor.from_settings({"frame_length": 400})  # 400 samples but frame_length_ms defaults to 20
    with pytest.raises(ValueError, match="padding_side"):
        LogMelExtractor.from_settings({"padding_side": "left"})
    LogMelExtractor.from_settings({"processor_class": "Gemma4Processor"})  # bookkeeping keys are ignored
    with pytest.raises(ValueError, match="per_bin_mean"):
        LogMelExtractor.from_settings({"per_bin_mean": [0.0] * 3})
