"""``python -m gemma_mesh.audio --bundle DIR --port N --metrics-port M``: the audio frontend.

The same as ``gemma-mesh serve audio``; every other setting comes from ``GEMMA_MESH_AUDIO_*``.
"""

from __future__ import annotations

from gemma_mesh.audio.server import run_audio_server
from gemma_mesh.audio.settings import AudioSettings
from gemma_mesh.common.service import module_main

main = module_main("python -m gemma_mesh.audio", __doc__, AudioSettings, run_audio_server)

if __name__ == "__main__":
    main()
