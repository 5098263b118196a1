"""``GatewayState``: what every request handler of one gateway replica shares (built by
``gateway.app.create_app`` in the app's lifespan and kept on ``app.state.gw``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gemma_mesh.gateway.auth import Authenticator
from gemma_mesh.gateway.captioning import VadSettings
from gemma_mesh.gateway.clients import MeshClient
from gemma_mesh.gateway.drain import LiveConnections
from gemma_mesh.gateway.live.latency import CaptionLatencyMonitor
from gemma_mesh.gateway.live.vad_batcher import VadBatcher
from gemma_mesh.gateway.metrics import GatewayMetrics
from gemma_mesh.gateway.sessions import SessionStore
from gemma_mesh.gateway.sessions.lease import SessionLeases
from gemma_mesh.gateway.settings import GatewaySettings


@dataclass
class GatewayState:
    """What every request handler of one replica shares."""

    settings: GatewaySettings
    clients: MeshClient
    store: SessionStore
    metrics: GatewayMetrics
    auth: Authenticator
    vad_settings: VadSettings
    leases: SessionLeases
    vad_batcher: VadBatcher
    caption_latency: CaptionLatencyMonitor
    analysis_slots: asyncio.Semaphore  # max_concurrent_analyses, shared by every session's frames
    live: LiveConnections = field(default_factory=LiveConnections)  # drained on shutdown
