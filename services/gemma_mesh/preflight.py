"""What ``gemma-mesh up`` and ``demo`` check before they start a service: the user's setup.

A bundle that is missing or incomplete, a VAD model path that names no file, or a Redis that does
not answer would otherwise surface as a child process dying while the mesh starts (its own error,
then the supervisor's). Checked here first, each is one ``MeshError`` naming the fix, which the
command line prints as one ``error:`` line (exit 2). The port of the gateway is checked by
``Mesh.start`` itself, right before the gateway binds it.
"""

from __future__ import annotations

from pathlib import Path

from gemma_mesh.common.errors import NotFound


def check_bundle(bundle: Path | None) -> None:
    """The bundle opens (manifest valid, tokenizer and processor files present) and every graph
    file its manifest names exists; nothing is loaded into ONNX Runtime.

    Raises:
        NotFound: the directory, its manifest or one of its files is missing.
        InvalidRequest: the manifest does not validate (e.g. an older bundle format).
    """
    from gemma_mesh.model.bundle import ModelBundle

    opened = ModelBundle(bundle, providers=["CPUExecutionProvider"])
    for name, entry in opened.manifest.graphs.items():
        if not (opened.path / entry.file).is_file():
            raise NotFound(
                f"bundle {opened.path}: the manifest's graph {name!r} file {entry.file} is missing; "
                "re-export the bundle with `gemma-mesh export`"
            )


def check_vad_model() -> None:
    """The gateway's VAD model (``GEMMA_MESH_GATEWAY_VAD_MODEL_PATH`` or the shipped file) exists.

    Raises:
        NotFound: no such file (the message names the setting).
        pydantic.ValidationError: a ``GEMMA_MESH_GATEWAY_*`` variable does not validate.
    """
    from gemma_mesh.gateway.captioning import find_silero_model
    from gemma_mesh.gateway.settings import GatewaySettings

    try:
        find_silero_model(GatewaySettings().vad_model_path)
    except FileNotFoundError as error:
        raise NotFound(str(error)) from None


def check_mesh_setup(bundle: Path | None, redis_url: str | None) -> None:
    """Every check above, then Redis (when ``redis_url`` is given) answers a PING within 2 s.

    Raises:
        MeshError: the first problem found, with its fix in the message.
    """
    from gemma_mesh.gateway.server import check_redis

    check_bundle(bundle)
    check_vad_model()
    check_redis(redis_url, require_reachable=True)
