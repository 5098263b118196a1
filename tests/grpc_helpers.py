"""Run a grpc.aio server in a background thread with its own event loop, as a separate process would."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any


class ServerThread:
    """``with ServerThread(lambda: start_decoder(settings)) as started:`` -> the started server object.

    ``start`` is a coroutine factory returning an object with ``port`` and ``async stop(grace_s)``.
    """

    def __init__(self, start: Callable[[], Awaitable[Any]]) -> None:
        self._start = start
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.started: Any = None

    def __enter__(self) -> Any:
        self._thread.start()
        self.started = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=120)
        return self.started

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.started.stop(0), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


class LoopThread:
    """An event loop in a background thread: ``run(coro)`` waits for a result, ``submit(coro)``
    returns a ``concurrent.futures.Future`` (for a server that keeps loading while a test probes it)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def submit(self, coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Awaitable[Any], timeout_s: float = 120.0) -> Any:
        return self.submit(coro).result(timeout=timeout_s)

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


@contextlib.contextmanager
def decoder_stub(bundle: Any, **settings: Any) -> Iterator[Any]:
    """A decoder server on ``bundle`` in a thread (free ports, CPU provider, ``settings`` over
    ``DecoderSettings``' defaults), and a synchronous ``DecoderStub`` on a channel to it; both
    closed on exit."""
    import grpc

    from gemma_mesh.decoder.server import start_decoder
    from gemma_mesh.decoder.settings import DecoderSettings
    from gemma_mesh.proto.v1 import decoder_pb2_grpc

    settings = DecoderSettings(port=0, metrics_port=0, providers=["CPUExecutionProvider"], **settings)

    with ServerThread(lambda: start_decoder(settings, bundle)) as started:
        channel = grpc.insecure_channel(f"127.0.0.1:{started.port}")
        try:
            yield decoder_pb2_grpc.DecoderStub(channel)
        finally:
            channel.close()
