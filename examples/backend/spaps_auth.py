"""Protect your own endpoints with SPAPS: bearer-token validation, entitlement checks, a cache.

Framework-neutral; ``flask_app.py``, ``django_app.py`` and ``fastapi_app.py`` next to this file
plug it in. Guide: docs/backend.md.

- ``SpapsGuard`` / ``AsyncSpapsGuard`` validate a caller's ``Authorization: Bearer ...`` header
  with ``auth.get_current_user(access_token=...)`` and check entitlements with
  ``entitlements.check_access``, on ONE shared client per process.
- Every failure becomes an ``AuthProblem`` with a status for *your* caller (401, 403, 502, 503)
  and a message of our own: SPAPS's text never reaches the caller.
- ``TokenCache`` remembers successful validations for a short TTL, keyed by a SHA-256 digest of
  the token, so a burst of requests with one token costs one SPAPS call. A token revoked in
  SPAPS keeps working here for at most ``ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

from spaps_client import (
    AsyncSpapsClient,
    SpapsClient,
    SpapsError,
    SpapsTransportError,
    UserProfile,
)

log = logging.getLogger("spaps_auth")

MAX_TOKEN_LENGTH = 8192  # longer Authorization values are refused without asking SPAPS


def client_settings(**overrides: Any) -> Dict[str, Any]:
    """Keywords for the process's one SPAPS client: URL and secret API key from the
    environment (required: the client's built-in default key is for local development only),
    and a short timeout, since a caller is waiting on every validation."""
    settings: Dict[str, Any] = {"request_timeout": 5.0, **overrides}
    for keyword, variable in (("base_url", "SPAPS_API_URL"), ("api_key", "SPAPS_API_KEY")):
        if settings.get(keyword) is None:
            value = os.environ.get(variable)
            if not value:
                raise RuntimeError(f"{variable} is not set: the backend cannot reach SPAPS")
            settings[keyword] = value
    return settings


class AuthProblem(Exception):
    """What to answer the caller: ``status``, our own ``message`` and ``headers``."""

    def __init__(self, status: int, message: str, *, retry_after: Optional[float] = None
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers: Dict[str, str] = {}
        if status == 401:
            self.headers["WWW-Authenticate"] = 'Bearer realm="api"'
        if status == 503 and retry_after:
            self.headers["Retry-After"] = str(max(1, round(retry_after)))

    def body(self) -> Dict[str, str]:
        return {"error": self.message}


def fingerprint(token: str) -> str:
    """The cache key, and the only form of a token that may appear in logs."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenCache:
    """Successful validations, for ``ttl`` seconds, at most ``max_entries`` (oldest evicted).

    Keys are SHA-256 digests, never raw tokens. Thread-safe; the lock is held only for dict
    operations, so it is fine on an event loop too. ``clock`` is injectable for tests.
    """

    def __init__(self, ttl: float = 30.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("ttl must be positive and max_entries at least 1")
        self.ttl, self.max_entries, self.clock = ttl, max_entries, clock
        self._entries: OrderedDict[str, Tuple[float, UserProfile]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> Optional[UserProfile]:
        key, now = fingerprint(token), self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= now:
                del self._entries[key]
                return None
            return entry[1]

    def put(self, token: str, user: UserProfile) -> None:
        key, expires = fingerprint(token), self.clock() + self.ttl
        with self._lock:
            self._entries[key] = (expires, user)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self, token: str) -> None:
        with self._lock:
            self._entries.pop(fingerprint(token), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def bearer_token(authorization: Optional[str]) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or a 401 ``AuthProblem``.

    Never returns an empty string: an empty token passed as ``access_token=`` would make the
    client fall back to a token stored in it.
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthProblem(401, "Missing bearer token")
    if len(token) > MAX_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise AuthProblem(401, "Invalid or expired token")
    return token


def problem_from(exc: SpapsError, *, caller_token: Optional[str] = None,
                 cache: Optional[TokenCache] = None) -> AuthProblem:
    """Map a SPAPS failure to our answer. A 401 is the caller's fault only when it was about
    the caller's token (``caller_token``); otherwise it is ours (e.g. a wrong API key)."""
    if (caller_token and exc.status_code == 401 and not isinstance(exc, SpapsTransportError)
            and exc.error_code != "INVALID_APPLICATION"):
        if cache is not None:
            cache.invalidate(caller_token)
        return AuthProblem(401, "Invalid or expired token")
    # repr() is scrubbed of the API key and tokens by the client; still, only our log sees it.
    log.warning("SPAPS call failed: %r", exc)
    if isinstance(exc, SpapsTransportError) or exc.retryable:
        return AuthProblem(503, "Authentication service unavailable, try again later",
                           retry_after=exc.retry_after)
    return AuthProblem(502, "Authentication service error")


def _forbidden(entitlement_key: str) -> AuthProblem:
    return AuthProblem(403, f"This endpoint needs the {entitlement_key!r} entitlement")


class SpapsGuard:
    """Token validation and entitlement checks on one shared, token-less ``SpapsClient``."""

    def __init__(self, client: SpapsClient, cache: Optional[TokenCache] = None) -> None:
        self.client = client
        self.cache = cache if cache is not None else TokenCache()

    def authenticate(self, authorization: Optional[str]) -> UserProfile:
        """The caller's user, from the ``Authorization`` header; raises ``AuthProblem``."""
        token = bearer_token(authorization)
        user = self.cache.get(token)
        if user is not None:
            return user
        try:
            user = self.client.auth.get_current_user(access_token=token)
        except SpapsError as exc:
            raise problem_from(exc, caller_token=token, cache=self.cache) from None
        self.cache.put(token, user)
        return user

    def require_entitlement(self, user: UserProfile, entitlement_key: str) -> None:
        """Raise a 403 ``AuthProblem`` unless ``user`` holds ``entitlement_key`` now."""
        try:
            allowed = self.client.entitlements.check_access(user.id, entitlement_key)
        except SpapsError as exc:
            raise problem_from(exc) from None
        if not allowed:
            raise _forbidden(entitlement_key)

    def forget(self, token: str) -> None:
        """Drop a cached validation, e.g. after your own SPAPS call with it got a 401."""
        self.cache.invalidate(token)


class AsyncSpapsGuard:
    """``SpapsGuard`` for asyncio apps, on one shared ``AsyncSpapsClient``."""

    def __init__(self, client: AsyncSpapsClient, cache: Optional[TokenCache] = None) -> None:
        self.client = client
        self.cache = cache if cache is not None else TokenCache()

    async def authenticate(self, authorization: Optional[str]) -> UserProfile:
        token = bearer_token(authorization)
        user = self.cache.get(token)
        if user is not None:
            return user
        try:
            user = await self.client.auth.get_current_user(access_token=token)
        except SpapsError as exc:
            raise problem_from(exc, caller_token=token, cache=self.cache) from None
        self.cache.put(token, user)
        return user

    async def require_entitlement(self, user: UserProfile, entitlement_key: str) -> None:
        try:
            allowed = await self.client.entitlements.check_access(user.id, entitlement_key)
        except SpapsError as exc:
            raise problem_from(exc) from None
        if not allowed:
            raise _forbidden(entitlement_key)

    def forget(self, token: str) -> None:
        self.cache.invalidate(token)
