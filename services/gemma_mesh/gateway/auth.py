"""API keys, short-lived browser session tokens, allowed origins and per-key limits.

* HTTP: ``Authorization: Bearer <api key>`` (as OpenAI clients send it).
* Browsers cannot set headers on a WebSocket, so a page first calls ``POST /v1/stream/token`` with
  its key (or, with authentication off, without one) and presents the returned token in
  ``session.start``. Tokens are HMAC-SHA256 signed (``v1.<key id>.<expiry>.<signature>``), expire
  after ``token_ttl_s`` and need no shared state, so any gateway replica with the same
  ``token_secret`` accepts them.
* Keys are never logged or stored: sessions and logs carry the key id, the first 12 hex digits
  of the key's SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from gemma_mesh.common.errors import PermissionDenied, RateLimited, Unauthenticated
from gemma_mesh.gateway.settings import GatewaySettings

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    """The loggable id of an API key: first 12 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class Authenticator:
    """Checks keys, mints and verifies session tokens, checks origins, counts requests per key.

    With no ``api_keys`` configured, authentication is off and every caller is ``anonymous``
    (local use); origins and per-key limits still apply.
    """

    def __init__(self, settings: GatewaySettings, shared_secret: str | None = None) -> None:
        self._keys = {key_id(k.get_secret_value()): k.get_secret_value() for k in settings.api_keys}
        # The configured key, else the one the replicas share through Redis (gateway.token_secret),
        # else one of this process.
        secret = (
            settings.token_secret.get_secret_value()
            if settings.token_secret
            else shared_secret or secrets.token_hex(32)
        )
        self._secret = secret.encode()
        self.token_ttl_s = settings.token_ttl_s
        self.allowed_origins = {o.rstrip("/") for o in settings.allowed_origins}
        self.max_requests = settings.max_requests_per_key
        self._in_flight: dict[str, int] = defaultdict(int)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check_key(self, authorization: str | None) -> str:
        """``Authorization`` header -> key id.

        Raises:
            Unauthenticated: authentication is on and the header is missing, malformed or an unknown key.
        """
        if not self.enabled:
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        presented = authorization[7:].strip()
        kid = key_id(presented)
        known = self._keys.get(kid)
        if known is None or not hmac.compare_digest(known, presented):
            raise Unauthenticated("unknown API key")
        return kid

    def mint_token(self, kid: str, now: float | None = None, ttl_s: int | None = None) -> tuple[str, int]:
        """A session token for key id ``kid`` valid ``ttl_s`` (default ``token_ttl_s``) -> (token,
        expiry as Unix seconds)."""
        expires = int((now or time.time()) + (ttl_s or self.token_ttl_s))
        body = f"v1.{kid}.{expires}"
        return f"{body}.{self._sign(body)}", expires

    def check_token(self, token: str | None, now: float | None = None) -> str:
        """A session token -> key id.

        Raises:
            Unauthenticated: missing (with authentication on), malformed, forged or expired.
        """
        if not token:
            if not self.enabled:
                return ANONYMOUS
            raise Unauthenticated("missing session token: mint one with POST /v1/stream/token")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[2].isdigit():
            raise Unauthenticated("malformed session token")
        body = ".".join(parts[:3])
        if not hmac.compare_digest(self._sign(body), parts[3]):
            raise Unauthenticated("invalid session token")
        if int(parts[2]) < (now or time.time()):
            raise Unauthenticated("session token expired: mint a new one")
        if self.enabled and parts[1] not in self._keys:
            raise Unauthenticated("session token of a revoked API key")
        return parts[1]

    def _sign(self, body: str) -> str:
        digest = hmac.new(self._secret, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def check_origin(self, origin: str | None, host: str | None) -> None:
        """Allow requests without an Origin (non-browser clients), same-origin pages and ``allowed_origins``.

        Raises:
            PermissionDenied: a page from another origin that is not allowed.
        """
        if not origin:
            return
        origin = origin.rstrip("/")
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return
        if host and urlsplit(origin).netloc == host:
            return
        raise PermissionDenied(f"origin {origin} is not allowed (allowed_origins)")

    @contextmanager
    def request_slot(self, kid: str) -> Iterator[None]:
        """Hold one of the key's ``max_requests_per_key`` in-flight HTTP requests.

        Raises:
            RateLimited: the key already has that many requests in flight.
        """
        if self._in_flight[kid] >= self.max_requests:
            raise RateLimited(
                f"{self.max_requests} requests already in flight for this key (max_requests_per_key)"
            )
        self._in_flight[kid] += 1
        try:
            yield
        finally:
            self._in_flight[kid] -= 1
