"""The audio frontend service: PCM or audio files -> 16 kHz log-mel -> Gemma 4 audio soft tokens.

Modules: ``settings`` (AudioSettings), ``streaming`` (pure incremental-encoding policy),
``splitting`` (cuts at the quietest points), ``serving`` (AudioEngine, no gRPC), ``servicer`` (the
gRPC binding), ``metrics``, ``server`` (AudioServer, ``run_audio_server``). See docs/encoders.md.
"""
