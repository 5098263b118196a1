"""Predicted outputs: a request's expected tokens are verified in the prefill run.

Real ONNX Runtime sessions on the tiny bundle. Whatever the prediction (right, right for a while,
wrong from the start, longer than ``max_tokens``, spanning prefill chunks, rejected beyond the
sliding window), the output must equal the run without one; only the work changes.
"""

from __future__ import annotations

import numpy as np
import pytest

from gemma_mesh.decoder.engine import Engine, Finished, GenerationRequest
from gemma_mesh.model.sampling import SamplingParams
from tests.decoder.test_engine_batching import STORAGES, _collect, _engine, _prompt, _run, _submit_together


def _request(bundle, words: int, salt: int, max_tokens: int, prediction=None, **kw) -> GenerationRequest:
    return GenerationRequest(
        f"r{salt}",
        _prompt(bundle, words, salt),
        max_tokens=max_tokens,
        prediction=None if prediction is None else np.asarray(prediction, dtype=np.int64),
        **kw,
    )


def _solo(bundle, request: GenerationRequest) -> list[int]:
    plain = GenerationRequest(**{**request.__dict__, "prediction": None})
    return _run(_engine(bundle, prefix_cache_bytes=0), [plain])[0][0]


def _corrupt(tokens: list[int], at: int, vocab: int) -> list[int]:
    """``tokens`` with a different token at index ``at`` (and the rest kept)."""
    out = list(tokens)
    out[at] = (out[at] + 7) % vocab
    return out


def _decode_steps(engine: Engine) -> int:
    """Decode steps the engine ran (each observes its batch size; prefill runs do not)."""
    return int(engine.metrics.registry.get_sample_value("gemma_mesh_decoder_batch_size_count") or 0)


@STORAGES
def test_any_prediction_gives_the_plain_output_and_counts_what_it_accepted(tiny_bundle, storage):
    vocab = tiny_bundle.manifest.text.vocab_size
    base = [
        _request(tiny_bundle, n, i, max_tokens=m, ignore_eos=True)
        for i, (n, m) in enumerate([(6, 12), (20, 9), (3, 10), (11, 14), (8, 6)])
    ]
    solo = [_solo(tiny_bundle, r) for r in base]
    predictions = [
        solo[0],  # right: the whole output in the prefill run (its last token is the bonus)
        _corrupt(solo[1], 4, vocab),  # right for 4 tokens
        _corrupt(solo[2], 0, vocab),  # wrong from the start
        solo[3] + solo[3],  # right, then longer than max_tokens allows
        [],  # empty: plain decoding
    ]
    requests = [
        GenerationRequest(**{**r.__dict__, "prediction": np.asarray(p, dtype=np.int64)})
        for r, p in zip(base, predictions, strict=True)
    ]
    out, finished = _run(_engine(tiny_bundle, storage, prefix_cache_bytes=0), requests)
    assert out == solo
    assert [f.accepted_prediction_tokens for f in finished] == [11, 4, 0, 13, 0]
    assert [f.rejected_prediction_tokens for f in finished] == [0, 4, 9, 0, 0]
    assert [f.completion_tokens for f in finished] == [12, 9, 10, 14, 6]


@STORAGES
def test_a_prediction_split_over_prefill_chunks_and_rejected_in_a_later_one(tiny_bundle, storage):
    """An 8-token budget for 3 rows: the prediction is verified 2 tokens a run, over many runs."""
    vocab = tiny_bundle.manifest.text.vocab_size
    base = [_request(tiny_bundle, n, i, max_tokens=20, ignore_eos=True) for i, n in enumerate([4, 9, 15])]
    solo = [_solo(tiny_bundle, r) for r in base]
    requests = [
        GenerationRequest(**{**r.__dict__, "prediction": np.asarray(_corrupt(s, at, vocab))})
        for r, s, at in zip(base, solo, [13, 2, 18], strict=True)
    ]
    out, finished = _run(
        _engine(tiny_bundle, storage, prefill_chunk_tokens=8, prefix_cache_bytes=0), requests
    )
    assert out == solo
    assert [f.accepted_prediction_tokens for f in finished] == [13, 2, 18]


@STORAGES
def test_tokens_rejected_past_the_sliding_window_leave_the_ring_intact(tiny_bundle, storage):
    """A prediction rejected at its 2nd token with 3 windows of tokens after it: had they been
    committed, their ring slots would hold keys the next positions still attend to."""
    window = tiny_bundle.manifest.text.sliding_window
    request = _request(tiny_bundle, 12, 3, max_tokens=3 * window + 8, ignore_eos=True)
    solo = _solo(tiny_bundle, request)
    wrong = _corrupt(solo, 1, tiny_bundle.manifest.text.vocab_size)
    out, finished = _run(
        _engine(tiny_bundle, storage, prefix_cache_bytes=0),
        [GenerationRequest(**{**request.__dict__, "prediction": np.asarray(wrong)})],
    )
    assert out[0] == solo
    assert finished[0].accepted_prediction_tokens == 1
    # The prediction is capped at max_tokens - 1 (with the bonus token, all that can be generated).
    assert finished[0].rejected_prediction_tokens == request.max_tokens - 1 - 1


def test_a_stop_string_inside_an_accepted_prediction_ends_the_request_there(tiny_bundle):
    """The prediction is the unstopped output; with a stop string from its middle the request must
    finish inside the prefill walk, with the same tokens and text as decoding with that stop."""
    free = _request(tiny_bundle, 8, 5, max_tokens=24, ignore_eos=True)
    tokens = _solo(tiny_bundle, free)
    text = tiny_bundle.tokenizer.decode(tokens[:14], skip_special_tokens=True)
    stop = text[-3:]
    assert stop.strip() and len(text) > 6
    stopped = GenerationRequest(**{**free.__dict__, "stop": [stop]})
    solo = _solo(tiny_bundle, stopped)
    assert len(solo) < 24  # the stop string ended the plain run early
    engine = _engine(tiny_bundle, prefix_cache_bytes=0)
    out, finished = _run(
        engine, [GenerationRequest(**{**stopped.__dict__, "prediction": np.asarray(tokens)})]
    )
    assert out[0] == solo
    assert finished[0].reason.value == "stop"
    assert _decode_steps(engine) == 0  # it ended in the prefill run


def test_seeded_sampling_draws_the_same_tokens_with_a_prediction(tiny_bundle):
    """The sampler draws once per token in the prefill walk as in decoding: same seed, same output."""
    sampling = SamplingParams(temperature=1.3, top_k=40, seed=11)
    request = _request(tiny_bundle, 9, 2, max_tokens=24, sampling=sampling, ignore_eos=True)
    solo = _solo(tiny_bundle, request)
    assert solo != _solo(tiny_bundle, GenerationRequest(**{**request.__dict__, "sampling": SamplingParams()}))
    for prediction in (solo, _corrupt(solo, 9, tiny_bundle.manifest.text.vocab_size)):
        out, finished = _run(
            _engine(tiny_bundle, prefix_cache_bytes=0),
            [GenerationRequest(**{**request.__dict__, "prediction": np.asarray(prediction)})],
        )
        assert out[0] == solo
    assert finished[0].accepted_prediction_tokens == 9


@pytest.mark.parametrize("with_cache", [False, True])
def test_a_right_prediction_replaces_decode_steps_with_one_run(tiny_bundle, with_cache):
    request = _request(tiny_bundle, 10, 4, max_tokens=16, ignore_eos=True)
    solo = _solo(tiny_bundle, request)
    engine = _engine(tiny_bundle, prefix_cache_bytes=(64 << 20) if with_cache else 0)
    engine.start()
    try:
        before = 0
        if with_cache:  # the prompt's KV from a first round: the prediction is all that is prefilled
            _collect(_submit_together(engine, [request]))
            before = _decode_steps(engine)
        predicted = GenerationRequest(**{**request.__dict__, "prediction": np.asarray(solo[:10])})
        out, finished = _collect(_submit_together(engine, [predicted]))
    finally:
        engine.stop()
    assert out[0] == solo
    assert _decode_steps(engine) - before == 16 - 11  # 10 accepted + the bonus token come from the prefill
    assert finished[0].cached_prompt_tokens > 0 if with_cache else finished[0].cached_prompt_tokens == 0
    metrics = engine.metrics.registry
    assert (
        metrics.get_sample_value("gemma_mesh_decoder_prediction_tokens_total", {"outcome": "accepted"}) == 10
    )
    assert (
        metrics.get_sample_value("gemma_mesh_decoder_prediction_tokens_total", {"outcome": "rejected"}) == 0
    )


def test_finished_reports_prompt_tokens_without_the_prediction(tiny_bundle):
    request = _request(tiny_bundle, 5, 1, max_tokens=8, ignore_eos=True, prediction=[30, 31, 32])
    out, finished = _run(_engine(tiny_bundle), [request])
    assert isinstance(finished[0], Finished)
    assert finished[0].prompt_tokens == len(request.input_ids)
    assert len(out[0]) == 8


def test_predictions_are_verified_block_by_block(tiny_bundle):
    """``prediction_block_tokens`` 16: a prediction wrong at its 2nd token costs one block of prefill,
    a right one of 40 tokens three runs (16, 16, 8) and no decode step; both give the plain output."""
    request = _request(tiny_bundle, 9, 6, max_tokens=61, ignore_eos=True)
    solo = _solo(tiny_bundle, request)
    prompt_len = len(request.input_ids)
    for prediction, most_prefilled, decode_steps in (
        (_corrupt(solo, 1, tiny_bundle.manifest.text.vocab_size), prompt_len + 16, 61 - 2),
        (solo[:40], prompt_len + 40, 61 - 41),
    ):
        engine = _engine(
            tiny_bundle, prefix_cache_bytes=0, prefill_chunk_tokens=256, prediction_block_tokens=16
        )
        prefilled: list[int] = []
        real = engine._run_step

        def spy(rows, embeds, per_layer, positions, logits_at, prefilled=prefilled, real=real, engine=engine):
            if engine._prefilling and rows.start == len(engine._decoding):  # a prefill run
                prefilled.append(positions.shape[1])
            return real(rows, embeds, per_layer, positions, logits_at)

        engine._run_step = spy
        out, _ = _run(
            engine, [GenerationRequest(**{**request.__dict__, "prediction": np.asarray(prediction)})]
        )
        assert out[0] == solo
        assert sum(prefilled) <= most_prefilled
        assert _decode_steps(engine) == decode_steps
