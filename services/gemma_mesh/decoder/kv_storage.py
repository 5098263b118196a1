"""Where the decoder's batch KV cache lives: host numpy arrays (``kv_cache.BatchKVCache``) or
OrtValues on the decoder session's device (``device_kv.DeviceKVCache``), chosen from
``DecoderSettings.kv_storage`` and the session's execution provider."""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_mesh.common.logging import get_logger
from gemma_mesh.decoder.kv_cache import BatchKVCache
from gemma_mesh.decoder.settings import DecoderSettings

log = get_logger("decoder.kv_storage")

# ORT device names of the execution providers that keep tensors in their own memory.
_PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "ROCMExecutionProvider": "cuda"}


def make_kv_cache(session: Any, manifest: Any, settings: DecoderSettings, dtype: np.dtype) -> BatchKVCache:
    """The engine's KV cache: on the session's device (``DeviceKVCache``) when ``kv_storage`` is
    ``device``, or ``auto`` and the decoder runs on a GPU provider; numpy arrays otherwise."""
    provider = session.get_providers()[0]
    device = _PROVIDER_DEVICES.get(provider, "cpu")
    storage = settings.kv_storage
    if storage == "auto":
        storage = "device" if device != "cpu" else "host"
    args = (manifest.text, settings.max_batch_size, dtype, settings.kv_initial_tokens)
    if storage == "host":
        return BatchKVCache(*args)
    from gemma_mesh.decoder.device_kv import DeviceKVCache

    log.info("KV cache on the device", device=device, provider=provider)
    return DeviceKVCache(*args, device=device, device_id=0, providers=session.get_providers())
