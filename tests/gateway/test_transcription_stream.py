"""``POST /v1/audio/transcriptions`` with ``stream=true`` through the official SDK
(``client.audio.transcriptions.create(stream=True)``) against the real mesh, and the ``prompt``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf

from gemma_mesh.model.audio_io import decode_audio

MODEL = "gemma-4-e4b-it"


@pytest.fixture(scope="module")
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=300)


def wav(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, 16000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def prompt_tokens(backends) -> float:
    registry = backends.decoder_server.engine.metrics.registry
    return registry.get_sample_value("gemma_mesh_decoder_prompt_tokens_total") or 0.0


def test_streamed_transcription_deltas_join_to_the_text(client, backends, librivox_clips: list[Path]) -> None:
    """A file longer than one segment (every clip twice, 1 s of silence between): one delta per
    segment with words, in order (the verbose response's segments); done's text is the deltas
    joined and the non-streamed text; usage adds up."""
    pieces = []
    for clip in [*librivox_clips, *librivox_clips]:
        pieces += [decode_audio(clip, 16000), np.zeros(16000, np.float32)]
    data = wav(np.concatenate(pieces))
    events = list(client.audio.transcriptions.create(model=MODEL, file=("all.wav", data), stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events] == ["transcript.text.delta"] * len(deltas) + ["transcript.text.done"]
    done = events[-1]
    assert done.text == "".join(d.delta for d in deltas)
    verbose = client.audio.transcriptions.create(
        model=MODEL, file=("all.wav", data), response_format="verbose_json"
    )
    assert len(verbose.segments) >= 2
    assert [d.delta.strip() for d in deltas] == [s.text for s in verbose.segments]
    assert done.text == verbose.text
    usage = done.usage
    assert usage.type == "tokens" and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens == usage.input_token_details.audio_tokens > 0 and usage.output_tokens > 0


def test_prompt_is_given_to_the_model(client, backends, librivox_clips: list[Path]) -> None:
    """The prompt reaches the decoder as context: the request prefills more prompt tokens than the
    same audio without it (the prompt's tokens), streamed or not."""
    data = wav(decode_audio(librivox_clips[0], 16000))
    before = prompt_tokens(backends)
    client.audio.transcriptions.create(model=MODEL, file=("a.wav", data))
    without = prompt_tokens(backends) - before
    prompt = "Marianne and Elinor Dashwood at Norland Park, Sussex."
    before = prompt_tokens(backends)
    events = list(
        client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), prompt=prompt, stream=True)
    )
    with_prompt = prompt_tokens(backends) - before
    assert events[-1].type == "transcript.text.done"
    assert with_prompt >= without + 8, (with_prompt, without)


def test_streamed_translation_is_refused(client, librivox_clips: list[Path]) -> None:
    data = wav(decode_audio(librivox_clips[0], 16000)[:16000])
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model=MODEL, file=("a.wav", data), extra_body={"stream": True})
    assert info.value.body["param"] == "stream"
