"""One multimodal request end to end, in process: files -> preprocessing -> encoders -> prompt -> engine.

``gemma-mesh generate`` runs this; the services split the same steps over gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.model.audio_io import decode_audio
from gemma_mesh.model.bundle import ModelBundle
from gemma_mesh.model.generation import PromptInput
from gemma_mesh.model.sampling import SamplingParams


@dataclass
class GenerateResult:
    """The answer: text (special tokens removed) and the generated ids (stop token included)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int


def build_user_turn(
    bundle: ModelBundle,
    prompt: str,
    images: Sequence[bytes],
    audios: Sequence[np.ndarray],
    system: str | None = None,
    *,
    enable_thinking: bool = False,
) -> PromptInput:
    """Encode media and build the prompt of one user turn: images, then audio clips, then text.

    Args:
        images: encoded image files (JPEG, PNG, WebP, GIF).
        audios: mono float32 waveforms at ``bundle.manifest.audio.sampling_rate``.

    Raises:
        InvalidRequest: bad media (see ``ImageProcessor`` and ``LogMelExtractor``).
    """
    content: list[dict] = [{"type": "image"} for _ in images]
    content += [{"type": "audio"} for _ in audios]
    content.append({"type": "text", "text": prompt})
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})

    processed = [bundle.image_processor.preprocess(bundle.image_processor.decode_image(b)) for b in images]
    image_tokens = bundle.encode_images(processed)
    audio_tokens = [bundle.encode_audio(a) for a in audios]
    built = bundle.prompt_builder.build(
        messages,
        image_soft_tokens=[t.shape[0] for t in image_tokens],
        audio_soft_tokens=[t.shape[0] for t in audio_tokens],
        enable_thinking=enable_thinking,
    )
    soft = [(bundle.manifest.token_id("image"), t) for t in image_tokens]
    soft += [(bundle.manifest.token_id("audio"), t) for t in audio_tokens]
    return PromptInput(input_ids=built.input_ids, soft_tokens=soft)


def run_generate(
    *,
    bundle_path: Path | None,
    prompt: str,
    images: Sequence[Path] = (),
    audios: Sequence[Path] = (),
    system: str | None = None,
    max_tokens: int = 64,
    temperature: float | None = None,
    seed: int | None = None,
    on_text: Callable[[str], object] | None = None,
) -> GenerateResult:
    """Load a bundle (the embedded one when ``bundle_path`` is None), run one turn, stream text to ``on_text``.

    Raises:
        InvalidRequest: unreadable files, bad media, bad sampling settings, a prompt over the context.
    """
    bundle = ModelBundle(bundle_path)
    for path in [*images, *audios]:
        if not Path(path).is_file():
            raise InvalidRequest(f"no such file: {path}")
    rate = bundle.manifest.audio.sampling_rate
    # Longer clips are refused from their header, before hours of samples are decoded (0.4 s of
    # slack for container padding; the exact sample limit is enforced by the log-mel extractor).
    max_s = bundle.manifest.audio.max_samples / rate + 0.4
    waveforms = [decode_audio(Path(p), rate, max_duration_s=max_s) for p in audios]
    request = build_user_turn(bundle, prompt, [Path(p).read_bytes() for p in images], waveforms, system)
    sampling = SamplingParams(temperature=temperature or 0.0, seed=seed)
    # The decoder service's engine, in process: chunked prefill and a window-bounded sliding KV cache,
    # so long prompts cost what they cost in the service.
    from gemma_mesh.decoder.engine import Engine, Finished, GenerationRequest
    from gemma_mesh.decoder.output import Channel
    from gemma_mesh.decoder.settings import DecoderSettings

    settings = DecoderSettings(
        max_batch_size=1, max_queue_size=0, prefix_cache_bytes=0, providers=bundle.providers
    )
    engine = Engine(bundle, settings)
    engine.start()
    ids: list[int] = []
    text_parts: list[str] = []
    try:
        handle = engine.submit(
            GenerationRequest(
                "generate", request.input_ids, request.soft_tokens, sampling=sampling, max_tokens=max_tokens
            )
        )
        for event in handle.iter_events():
            if isinstance(event, Finished):
                break
            ids.extend(event.token_ids)
            if event.channel == Channel.ANSWER and event.text:
                text_parts.append(event.text)
                if on_text:
                    on_text(event.text)
    finally:
        engine.stop()
    return GenerateResult(
        text="".join(text_parts), token_ids=ids, prompt_tokens=int(request.input_ids.shape[0])
    )
