"""``gemma_mesh.v1.VisionEncoder`` over grpc.aio: protobuf <-> `VisionEngine`, the batcher, metrics.

Decoding and preprocessing run on a thread pool (in parallel across the images of a call); every
image then joins the shared `Batcher`, so frames from many sessions share encoder runs. Errors are
raised as ``MeshError`` values and mapped once by ``common.grpc_server.ErrorInterceptor``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc

from gemma_mesh.common.errors import EngineDead, InvalidRequest, MeshError
from gemma_mesh.common.logging import get_logger
from gemma_mesh.common.tensors import to_tensor_pb
from gemma_mesh.proto.v1 import vision_pb2, vision_pb2_grpc
from gemma_mesh.vision import metrics
from gemma_mesh.vision.batcher import Batcher, BatchStats
from gemma_mesh.vision.serving import EncodedImage, ImageJob, VisionEngine
from gemma_mesh.vision.settings import VisionSettings

log = get_logger("vision")
T = TypeVar("T")

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name


def error_code(exc: BaseException) -> str:
    """The gRPC status name a failed call ends with (for ``errors_total``)."""
    if isinstance(exc, MeshError):
        return exc.grpc_status
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "ABORTED" if isinstance(exc, grpc.aio.AbortError) else "INTERNAL"


def image_to_pb(result: EncodedImage) -> vision_pb2.EncodeImageResponse:
    """`EncodedImage` -> ``EncodeImageResponse`` (one Tensor ``[n, H]``)."""
    return vision_pb2.EncodeImageResponse(
        soft_tokens=to_tensor_pb(result.tokens),
        num_soft_tokens=int(result.tokens.shape[0]),
        width=result.width,
        height=result.height,
        timestamp_s=result.timestamp_s,
    )


def _record_batch(stats: BatchStats) -> None:
    metrics.BATCH_SIZE.observe(stats.size)
    metrics.BATCH_WAIT_SECONDS.observe(stats.wait_s)
    metrics.BATCH_RUN_SECONDS.observe(stats.run_s)


class VisionEncoderServicer(vision_pb2_grpc.VisionEncoderServicer):
    """The RPCs. ``attach`` an engine once the bundle is loaded; until then calls get UNAVAILABLE."""

    def __init__(self, settings: VisionSettings) -> None:
        self.settings = settings
        self.engine: VisionEngine | None = None
        self._pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="vision-prep")
        self._encode_pool = ThreadPoolExecutor(1, thread_name_prefix="vision-encode")
        self.batcher: Batcher[ImageJob, EncodedImage] | None = None

    def attach(self, engine: VisionEngine) -> None:
        """Serve with ``engine``: start the batcher on the running loop."""
        self.batcher = Batcher(
            engine.encode,
            max_batch_size=self.settings.max_batch_size,
            max_wait_ms=self.settings.batch_wait_ms,
            max_queue=self.settings.max_queue_images,
            executor=self._encode_pool,
            on_batch=_record_batch,
            on_queue=metrics.QUEUE_DEPTH.set,
        )
        self.batcher.start()
        self.engine = engine

    async def close(self) -> None:
        """Stop the batcher and the worker threads (after the server has stopped)."""
        if self.batcher is not None:
            await self.batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    def _ready(self) -> tuple[VisionEngine, Batcher[ImageJob, EncodedImage]]:
        if self.engine is None or self.batcher is None:
            raise EngineDead("the vision encoder is still loading")
        return self.engine, self.batcher

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @contextmanager
    def _observe(self, rpc: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BaseException as exc:
            metrics.ERRORS.labels(rpc, error_code(exc)).inc()
            raise
        finally:
            metrics.REQUEST_SECONDS.labels(rpc).observe(time.perf_counter() - start)

    def _prepare(self, image: vision_pb2.ImageInput, param: str) -> ImageJob:
        engine, _ = self._ready()
        try:
            source = image.WhichOneof("source")
            if source == "encoded":
                return engine.prepare_encoded(
                    image.encoded, image.max_soft_tokens, image.timestamp_s, video_frame=image.video_frame
                )
            if source == "raw":
                raw = image.raw
                return engine.prepare_raw(
                    raw.rgb,
                    raw.width,
                    raw.height,
                    image.max_soft_tokens,
                    image.timestamp_s,
                    video_frame=image.video_frame,
                )
            raise InvalidRequest("set encoded or raw", param="source")
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"{param}: {exc.message}", param=f"{param}.{exc.param}" if exc.param else param
            ) from exc

    def _count(self, rpc: str, results: list[EncodedImage]) -> None:
        metrics.IMAGES.labels(rpc).inc(len(results))
        metrics.SOFT_TOKENS.labels(rpc).inc(sum(r.tokens.shape[0] for r in results))

    # -------------------------------------------------------------------------------- RPCs
    async def Encode(
        self, request: vision_pb2.EncodeImageRequest, unused_context: grpc.aio.ServicerContext
    ) -> vision_pb2.EncodeImageResponse:
        """One image -> soft tokens."""
        with self._observe("Encode"):
            _, batcher = self._ready()
            job = await self._run(self._prepare, request.image, "image")
            result = await batcher.submit(job)
            self._count("Encode", [result])
            log.debug("encoded", rpc="Encode", soft_tokens=int(result.tokens.shape[0]))
            return image_to_pb(result)

    async def EncodeBatch(
        self, request: vision_pb2.EncodeImageBatchRequest, unused_context: grpc.aio.ServicerContext
    ) -> vision_pb2.EncodeImageBatchResponse:
        """Many images (or camera frames) -> soft tokens each, in order."""
        with self._observe("EncodeBatch"):
            _, batcher = self._ready()
            count, limit = len(request.images), self.settings.max_images_per_request
            if count == 0 or count > limit:
                raise InvalidRequest(f"send 1 to {limit} images, got {count}", param="images")
            jobs = await asyncio.gather(
                *(self._run(self._prepare, im, f"images[{i}]") for i, im in enumerate(request.images))
            )
            results = await batcher.submit_many(jobs)
            self._count("EncodeBatch", results)
            log.info("encoded", rpc="EncodeBatch", images=count)
            return vision_pb2.EncodeImageBatchResponse(results=[image_to_pb(r) for r in results])

    async def Describe(
        self, request: vision_pb2.DescribeRequest, unused_context: grpc.aio.ServicerContext
    ) -> vision_pb2.DescribeResponse:
        """The loaded bundle's soft-token budgets (UNAVAILABLE while it loads)."""
        with self._observe("Describe"):
            engine, _ = self._ready()
            return vision_pb2.DescribeResponse(
                supported_soft_tokens=list(engine.supported_budgets),
                default_max_soft_tokens=engine.default_budget,
                max_soft_tokens_per_frame=engine.video_defaults.max_soft_tokens,
            )

    async def EncodeVideo(
        self, request: vision_pb2.EncodeVideoRequest, unused_context: grpc.aio.ServicerContext
    ) -> vision_pb2.EncodeVideoResponse:
        """An encoded video -> sampled frames with timestamps, each at the per-frame budget."""
        with self._observe("EncodeVideo"):
            engine, batcher = self._ready()
            jobs = await self._run(
                engine.prepare_video, request.data, request.max_soft_tokens, request.num_frames
            )
            results = await batcher.submit_many(jobs)
            self._count("EncodeVideo", results)
            log.info("encoded", rpc="EncodeVideo", frames=len(results))
            return vision_pb2.EncodeVideoResponse(frames=[image_to_pb(r) for r in results])
