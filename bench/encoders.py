"""Encoder benchmark: gemma-mesh's audio frontend and vision encoder vs transformers, same checkpoint, same run.

Ours runs through real gRPC servers (in-process, loopback, port 0): audio ``Encode`` on one WAV file
(decode, log-mel, ONNX Runtime tower), ``EncodeStream`` in 40 ms and 100 ms PCM chunks sent as fast as
possible, and vision ``EncodeBatch`` at batch 1, 8 and 32 (JPEG decode, preprocessing, cross-request
batcher, ONNX Runtime) plus 32 concurrent one-image ``Encode`` calls. transformers runs the
checkpoint's processor (``Gemma4AudioFeatureExtractor`` / ``Gemma4ImageProcessor``) and the PyTorch
towers (``get_audio_features`` / ``get_image_features``, fp32, no_grad) on the same inputs.

Audio is the five LibriVox clips of pocketsphinx-testdata joined (24.7 s of real speech); images are
scikit-image photos as JPEGs. Figures are medians over ``--repeats`` runs after one warm-up.
Real-time factor = processing seconds / audio seconds (lower is better).

    python bench/encoders.py                                  # tiny checkpoint (make-tiny) + embedded bundle
    python bench/encoders.py --checkpoint CKPT --bundle BUNDLE  # any Gemma 4 checkpoint and its export

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

from gemma_mesh.audio.server import AudioServer  # noqa: E402
from gemma_mesh.audio.serving import AudioEngine  # noqa: E402
from gemma_mesh.audio.settings import AudioSettings  # noqa: E402
from gemma_mesh.common.grpc_server import open_channel  # noqa: E402
from gemma_mesh.common.logging import configure_logging  # noqa: E402
from gemma_mesh.common.settings import MiB  # noqa: E402
from gemma_mesh.model.audio_io import decode_audio  # noqa: E402
from gemma_mesh.model.bundle import ModelBundle, embedded_bundle_path  # noqa: E402
from gemma_mesh.proto.v1 import audio_pb2, audio_pb2_grpc, vision_pb2, vision_pb2_grpc  # noqa: E402
from gemma_mesh.samples import LIBRIVOX_DIR  # noqa: E402
from gemma_mesh.vision.server import VisionServer  # noqa: E402
from gemma_mesh.vision.settings import VisionSettings  # noqa: E402

RATE = 16_000
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")  # bundled


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _amedian_s(fn, repeats: int) -> float:
    await fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _speech() -> tuple[np.ndarray, bytes]:
    import soundfile as sf

    wav = np.concatenate([decode_audio(p, RATE) for p in sorted(LIBRIVOX_DIR.glob("*.wav"))])
    buf = io.BytesIO()
    sf.write(buf, wav, RATE, format="WAV", subtype="PCM_16")
    data = buf.getvalue()
    return decode_audio(data, RATE), data


@functools.cache
def _jpegs(count: int) -> list[bytes]:
    from PIL import Image
    from skimage import data as skdata

    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(getattr(skdata, PHOTOS[i % len(PHOTOS)])()).convert("RGB").save(
            buf, "JPEG", quality=90
        )
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------ gemma-mesh
async def bench_ours(bundle: ModelBundle, wav: np.ndarray, wav_file: bytes, batches: list[int], repeats: int):
    audio = AudioServer(AudioSettings(port=0, encode_threads=2))
    vision = VisionServer(VisionSettings(port=0, batch_wait_ms=2.0, max_batch_size=max(batches)))
    await audio.start(bundle)
    await vision.start(bundle)
    audio_ch = open_channel(f"127.0.0.1:{audio.port}", 256 * MiB)
    vision_ch = open_channel(f"127.0.0.1:{vision.port}", 256 * MiB)
    a_stub = audio_pb2_grpc.AudioFrontendStub(audio_ch)
    v_stub = vision_pb2_grpc.VisionEncoderStub(vision_ch)
    seconds = len(wav) / RATE
    out: dict[str, float] = {}
    try:
        request = audio_pb2.EncodeAudioRequest(file=audio_pb2.EncodedAudio(data=wav_file))
        out["audio_rtf_grpc_encode"] = await _amedian_s(lambda: a_stub.Encode(request), repeats) / seconds
        pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
        for chunk_ms in (40, 100):

            async def stream(chunk_bytes=2 * 16 * chunk_ms):
                async def requests():
                    cfg = audio_pb2.AudioStreamConfig(
                        encoding=audio_pb2.S16LE, sample_rate_hz=RATE, channels=1
                    )
                    yield audio_pb2.AudioStreamRequest(config=cfg)
                    for i in range(0, len(pcm), chunk_bytes):
                        yield audio_pb2.AudioStreamRequest(pcm=pcm[i : i + chunk_bytes])

                return [m async for m in a_stub.EncodeStream(requests())]

            out[f"audio_rtf_grpc_stream_{chunk_ms}ms"] = await _amedian_s(stream, repeats) / seconds
        jpegs = _jpegs(max(batches))
        for n in batches:
            images = [vision_pb2.ImageInput(encoded=j) for j in jpegs[:n]]
            req = vision_pb2.EncodeImageBatchRequest(images=images)
            out[f"images_per_s_grpc_batch{n}"] = n / await _amedian_s(
                lambda req=req: v_stub.EncodeBatch(req), repeats
            )
        n = max(batches)

        async def clients():
            reqs = [vision_pb2.EncodeImageRequest(image=vision_pb2.ImageInput(encoded=j)) for j in jpegs[:n]]
            return await asyncio.gather(*(v_stub.Encode(r) for r in reqs))

        out[f"images_per_s_grpc_{n}_concurrent_clients"] = n / await _amedian_s(clients, repeats)
    finally:
        await audio_ch.close()
        await vision_ch.close()
        await audio.stop(0)
        await vision.stop(0)
    return out


def bench_ours_inprocess(bundle: ModelBundle, wav: np.ndarray, batches: list[int], repeats: int):
    """The same work without gRPC (ModelBundle + preprocessing): the service's overhead is the difference."""
    seconds = len(wav) / RATE
    out = {"audio_rtf_inprocess": _median_s(lambda: bundle.encode_audio(wav), repeats) / seconds}
    engine = AudioEngine(bundle, AudioSettings(port=0))
    pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
    for chunk_ms in (40, 100):  # one step per chunk, as a live client in real time gets

        def stream(step=2 * 16 * chunk_ms):
            s = engine.open_stream("s16le", RATE, 1)
            for i in range(0, len(pcm), step):
                s.push(pcm[i : i + step])
            s.finish()
            s.close()

        out[f"audio_rtf_inprocess_stream_{chunk_ms}ms_steps"] = _median_s(stream, repeats) / seconds
    jpegs = _jpegs(max(batches))
    proc = bundle.image_processor
    for n in batches:
        out[f"images_per_s_inprocess_batch{n}"] = n / _median_s(
            lambda n=n: bundle.encode_images([proc.preprocess(proc.decode_image(j)) for j in jpegs[:n]]),
            repeats,
        )
    return out


# ---------------------------------------------------------------------------------- transformers
def bench_transformers(checkpoint: Path, wav: np.ndarray, batches: list[int], repeats: int):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = Gemma4ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out: dict[str, float] = {}

    def audio():
        feats = processor.feature_extractor([wav], sampling_rate=RATE, return_tensors="pt")
        with torch.no_grad():
            return model.model.get_audio_features(feats["input_features"], feats["input_features_mask"])

    out["audio_rtf_transformers"] = _median_s(audio, repeats) / (len(wav) / RATE)
    jpegs = _jpegs(max(batches))
    for n in batches:

        def images(n=n):
            pil = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs[:n]]
            inputs = processor.image_processor(pil, return_tensors="pt")
            with torch.no_grad():
                return model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])

        out[f"images_per_s_transformers_batch{n}"] = n / _median_s(images, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="Gemma 4 checkpoint (default: make-tiny --seed 0)")
    parser.add_argument(
        "--bundle",
        type=Path,
        help="its bundle (default: the embedded tiny bundle, or an export of --checkpoint)",
    )
    parser.add_argument("--batches", default="1,8,32", help="comma-separated image batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    args = parser.parse_args()
    configure_logging("WARNING")
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        checkpoint, bundle_dir = args.checkpoint, args.bundle
        if checkpoint is None:
            from gemma_mesh.model.tiny import make_tiny_checkpoint

            checkpoint = Path(tmp) / "gemma-mesh-tiny"
            make_tiny_checkpoint(checkpoint, seed=0)  # the embedded bundle is this checkpoint's export
            bundle_dir = bundle_dir or embedded_bundle_path()
        if bundle_dir is None:
            from gemma_mesh.model.export.exporter import export_bundle

            bundle_dir = Path(tmp) / "bundle"
            export_bundle(checkpoint, bundle_dir, dtype="float32", progress=False)
        bundle = ModelBundle(bundle_dir)
        wav, wav_file = _speech()
        figures: dict[str, object] = {
            "checkpoint": str(args.checkpoint or "make-tiny --seed 0"),
            "bundle": str(bundle_dir),
            "providers": bundle.providers,
            "audio_seconds": round(len(wav) / RATE, 2),
            "repeats": args.repeats,
        }
        figures.update(asyncio.run(bench_ours(bundle, wav, wav_file, batches, args.repeats)))
        figures.update(bench_ours_inprocess(bundle, wav, batches, args.repeats))
        figures.update(bench_transformers(checkpoint, wav, batches, args.repeats))
    for key, value in figures.items():
        print(f"{key:45s} {value:.4g}" if isinstance(value, float) else f"{key:45s} {value}")
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
