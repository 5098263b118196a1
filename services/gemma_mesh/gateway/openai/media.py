"""Media in chat requests: base64 data URLs of images and videos (the gateway fetches nothing).

Each helper raises ``InvalidRequest`` naming the request field at fault.
"""

from __future__ import annotations

import base64
import binascii

from gemma_mesh.common.errors import InvalidRequest


def decode_base64(data: str, *, param: str) -> bytes:
    """Strict base64 (whitespace ignored). Raises InvalidRequest naming ``param``."""
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param} is not valid base64", param=param) from None


_EXAMPLE_TYPE = {"image": "image/jpeg", "video": "video/mp4"}


def image_bytes(url: str, *, param: str, kind: str = "image") -> bytes:
    """The bytes of an ``image_url`` (or, ``kind="video"``, a ``video_url``): only
    ``data:<kind>/<type>;base64,<data>`` URLs.

    Raises:
        InvalidRequest: a remote (http/https) or other URL, a media type of another kind, no
            ``;base64``, bad base64 or empty data.
    """
    example = f"data:{_EXAMPLE_TYPE[kind]};base64,..."
    if url.startswith(("http://", "https://")):
        raise InvalidRequest(
            f"{param}: remote {kind} URLs are not fetched (this server has no network access); "
            f"send the {kind} inline as a data URL: {example}",
            param=param,
        )
    header, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma:
        raise InvalidRequest(f"{param} must be a data URL ({example})", param=param)
    media_type, *params = header[len("data:") :].split(";")
    if media_type and not media_type.startswith(f"{kind}/"):
        raise InvalidRequest(
            f"{param}: the data URL holds {media_type}, not {'an' if kind == 'image' else 'a'} {kind}",
            param=param,
        )
    if "base64" not in params:
        raise InvalidRequest(f"{param}: only base64 data URLs are accepted (;base64,)", param=param)
    data = decode_base64(payload, param=param)
    if not data:
        raise InvalidRequest(f"{param}: the {kind} data is empty", param=param)
    return data
