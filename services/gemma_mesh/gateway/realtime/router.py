"""Routes of the OpenAI Realtime API: ``WS /v1/realtime`` (transcription sessions),
``WS /v1/realtime/translations`` and ``POST /v1/realtime/client_secrets``.

``client_secrets`` (OpenAI's ephemeral keys) mints the gateway's session token for the caller's
key: a browser presents it as ``Authorization: Bearer`` in place of the key, until it expires
(``expires_after.seconds``, at most ``token_ttl_s``; default ``token_ttl_s``).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, WebSocket
from pydantic import BaseModel, Field, ValidationError

from gemma_mesh.common.errors import InvalidRequest
from gemma_mesh.gateway.realtime.protocol import TranscriptionSession, TranslationSession, new_id
from gemma_mesh.gateway.realtime.transcription import TranscriptionConnection
from gemma_mesh.gateway.realtime.translation import TranslationConnection

router = APIRouter(prefix="/v1/realtime", tags=["OpenAI Realtime API"])


class ExpiresAfter(BaseModel):
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(600, ge=10, le=7200)


class ClientSecretRequest(BaseModel):
    """``POST /v1/realtime/client_secrets`` (OpenAI's ``ClientSecretCreateParams``)."""

    expires_after: ExpiresAfter | None = None
    session: dict | None = None


@router.websocket("")
async def realtime(websocket: WebSocket) -> None:
    """A transcription session (``?intent=transcription``; the only kind served)."""
    await TranscriptionConnection(websocket, websocket.app.state.gw).run()


@router.websocket("/translations")
async def translations(websocket: WebSocket) -> None:
    """A live speech translation session (``?model=…``)."""
    await TranslationConnection(websocket, websocket.app.state.gw).run()


@router.post("/client_secrets")
async def client_secrets(request: Request) -> dict:
    """A short-lived secret for a browser: ``{value, expires_at, session}``.

    Raises:
        Unauthenticated (401), PermissionDenied (403 origin), InvalidRequest (400: a bad body, an
        expiry beyond ``token_ttl_s``, a session type other than transcription or translation).
    """
    gw = request.app.state.gw
    gw.auth.check_origin(request.headers.get("origin"), request.headers.get("host"))
    kid = gw.auth.check_key(request.headers.get("authorization"))
    try:
        body = ClientSecretRequest.model_validate_json(await request.body() or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None
    ttl = body.expires_after.seconds if body.expires_after else gw.auth.token_ttl_s
    if ttl > gw.auth.token_ttl_s:
        raise InvalidRequest(
            f"expires_after.seconds {ttl} exceeds the limit of {gw.auth.token_ttl_s} s (token_ttl_s)",
            param="expires_after.seconds",
        )
    session = body.session or {"type": "transcription"}
    kind = session.get("type", "transcription")
    try:
        if kind == "transcription":
            effective = TranscriptionSession.model_validate(session).model_dump(mode="json")
        elif kind == "translation":
            effective = TranslationSession.model_validate({**session, "id": new_id("sess")}).model_dump(
                mode="json"
            )
        else:
            raise InvalidRequest(
                "session.type must be 'transcription' or 'translation'", param="session.type"
            )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "session." + ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{where}: {first['msg']}", param=where) from None
    value, expires = gw.auth.mint_token(kid, ttl_s=ttl)
    return {"value": value, "expires_at": expires, "session": effective}
