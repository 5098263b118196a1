"""One caption decode (``caption_soft_tokens``) against the real decoder: a decode whose text falls
into a loop is stopped there, and (on these clips, where loops do not nest) its caption equals the
guard's cut of the same request decoded to its budget."""

from __future__ import annotations

import asyncio
import math

import numpy as np

from gemma_mesh.gateway.captioning import RepetitionGuard
from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.live.captions import caption_soft_tokens
from gemma_mesh.gateway.mesh_types import ChatMessage, Part, Sampling
from gemma_mesh.gateway.prompts import transcription_instruction
from gemma_mesh.gateway.protocol import SessionConfig
from gemma_mesh.model.audio_io import decode_audio

MAX_TOKENS = 96
TOKENS_PER_S = 8.0


async def _compare(backends, clips) -> list[tuple[str, str, int, int]]:
    client = MeshClient(backends.decoder, backends.audio, backends.vision)
    config = SessionConfig()
    out = []
    try:
        for clip in clips[:3]:
            audio = decode_audio(clip, 16000)
            for seconds in (1.5, 3.0, 4.5, 6.0):
                piece = audio[: int(seconds * 16000)]
                segments, _ = await client.encode_audio(pcm_f32=piece, sample_rate_hz=16000)
                soft = [s.soft_tokens for s in segments]
                decoded = await caption_soft_tokens(
                    client, soft, seconds, config, MAX_TOKENS, tokens_per_audio_s=TOKENS_PER_S
                )
                caption, tokens = decoded.text, decoded.completion_tokens
                # the same request decoded to its budget, without the early stop
                budget = min(MAX_TOKENS, 8 + math.ceil(seconds * TOKENS_PER_S))
                parts = [Part(soft_tokens=t) for t in soft] + [Part(text=transcription_instruction(None))]
                full, done = await client.complete(
                    [ChatMessage("user", parts)], Sampling(max_tokens=budget, enable_thinking=False)
                )
                out.append((caption, full, tokens, done.completion_tokens))
    finally:
        await client.close()
    return out


def test_a_looping_decode_stops_early_and_is_cut_like_the_whole_decode(backends, librivox_clips):
    guard = RepetitionGuard()
    results = asyncio.run(_compare(backends, librivox_clips))
    stopped = 0
    for caption, full, tokens, full_tokens in results:
        assert caption == guard.clean(full.strip()), (caption, full)
        assert 1 <= tokens <= full_tokens
        if guard.check(full.strip()).looped:
            stopped += tokens < full_tokens
        else:
            assert tokens == full_tokens  # no loop: the decode runs to its end
    # the tiny random model falls into loops often: some decodes must have been cut short
    assert stopped >= 1, [r[1] for r in results]
    assert np.mean([r[2] for r in results]) < np.mean([r[3] for r in results])
