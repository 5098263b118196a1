"""``python -m gemma_mesh.vision --bundle DIR --port N --metrics-port M``: the vision encoder.

The same as ``gemma-mesh serve vision``; every other setting comes from ``GEMMA_MESH_VISION_*``.
"""

from __future__ import annotations

from gemma_mesh.common.service import module_main
from gemma_mesh.vision.server import run_vision_server
from gemma_mesh.vision.settings import VisionSettings

main = module_main("python -m gemma_mesh.vision", __doc__, VisionSettings, run_vision_server)

if __name__ == "__main__":
    main()
