"""The vision encoder service: JPEG/PNG/WebP/GIF/raw frames and videos -> Gemma 4 image soft tokens.

Modules: ``settings`` (VisionSettings), ``batcher`` (bounded-wait cross-request batching),
``serving`` (VisionEngine, no gRPC), ``servicer`` (the gRPC binding), ``metrics``, ``server``
(VisionServer, ``run_vision_server``). See docs/encoders.md.
"""
