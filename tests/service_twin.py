"""Helpers for the per-service tests: run each call on the sync client or on its async twin.

A test takes a ``surface`` ("sync" or "async") and gets a :class:`Twin` that exposes the same
attributes as ``SpapsClient`` / a service client; on the async surface every service method must
be a coroutine function and is driven to completion with ``asyncio.run``, so one test body proves
both surfaces over real loopback HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional

from conftest import API_KEY, DEMO_EMAIL, DEMO_PASSWORD

import spaps_client
from spaps_client import SpapsError
from spaps_mock import MockServer, RecordedRequest

SURFACES = ("sync", "async")

# Plain (non-awaitable) helpers that the async classes keep synchronous (docs/async.md, "How a
# call runs"; docs/api.md, "AsyncSpapsClient").
_PLAIN_METHODS = frozenset(
    {"get_tokens", "set_tokens", "clear_tokens", "get_stored_tokens", "clear_stored_tokens"}
)

# The x-request-id the emulator is told to send (see ``tag_request_id``).
REQUEST_ID = "req_header_wins_0001"


class Twin:
    """A client seen through one surface: async calls are awaited with ``asyncio.run``."""

    def __init__(self, target: Any, is_async: bool) -> None:
        self._target = target
        self._is_async = is_async

    @property
    def target(self) -> Any:
        """The wrapped ``spaps_client`` object."""
        return self._target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if type(value).__name__.endswith("Client"):
            return Twin(value, self._is_async)  # a service reached through a property
        if not callable(value) or not self._is_async or name in _PLAIN_METHODS:
            return value
        assert inspect.iscoroutinefunction(value), f"async {name}() is not a coroutine function"

        def run(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run(value(*args, **kwargs))

        return run


@contextlib.contextmanager
def aggregate(
    server: MockServer, surface: str, *, sign_in: bool = True, **options: Any
) -> Iterator[Twin]:
    """``SpapsClient`` or ``AsyncSpapsClient`` on ``server``, signed in as the demo user."""
    kind = spaps_client.AsyncSpapsClient if surface == "async" else spaps_client.SpapsClient
    raw = kind(base_url=server.url, api_key=API_KEY, **options)
    twin = Twin(raw, surface == "async")
    try:
        if sign_in:
            twin.auth.sign_in_with_password(email=DEMO_EMAIL, password=DEMO_PASSWORD)
        yield twin
    finally:
        close(twin)


def standalone(surface: str, name: str, **kwargs: Any) -> Twin:
    """A standalone service client (``name`` or ``Async<name>``) built with ``kwargs``."""
    cls = getattr(spaps_client, ("Async" if surface == "async" else "") + name)
    return Twin(cls(**kwargs), surface == "async")


def close(twin: Twin) -> None:
    """Close a client on its own surface (``aclose()`` for async objects)."""
    if twin._is_async:
        asyncio.run(twin.target.aclose())
    else:
        twin.target.close()


def access_token(twin: Twin) -> str:
    """The access token stored by an aggregate client."""
    tokens = twin.get_tokens()
    assert tokens is not None and tokens.access_token
    return str(tokens.access_token)


def demo_token(server: MockServer) -> str:
    """A fresh access token for the demo user, obtained by a throwaway sync client."""
    with spaps_client.SpapsClient(base_url=server.url, api_key=API_KEY) as client:
        return client.auth.sign_in_with_password(
            email=DEMO_EMAIL, password=DEMO_PASSWORD
        ).access_token


def last_request(server: MockServer, method: str, path: str) -> RecordedRequest:
    """The most recent request, checked to be ``method`` on the exact raw ``path``."""
    request = server.requests[-1]
    assert (request.method, request.path) == (method, path)
    return request


def assert_auth(request: RecordedRequest, token: Optional[str]) -> None:
    """``X-API-Key`` always; ``Authorization: Bearer <token>`` exactly when ``token`` is given."""
    assert request.headers.get("x-api-key") == API_KEY
    if token is None:
        assert "authorization" not in request.headers
    else:
        assert request.headers.get("authorization") == f"Bearer {token}"


def assert_json_body(request: RecordedRequest, expected: Any) -> None:
    """The request carried exactly this JSON value, labelled as JSON."""
    assert request.headers.get("content-type", "").startswith("application/json")
    assert request.json == expected


def assert_no_body(request: RecordedRequest) -> None:
    """A body-less request: no bytes and no content type."""
    assert request.body == b""
    assert "content-type" not in request.headers


def tag_request_id(server: MockServer, method: str, path: str) -> None:
    """Let the next ``method path`` be processed normally but answered with x-request-id
    ``REQUEST_ID`` (the error body's ``metadata.request_id`` keeps a different, random id)."""
    server.inject(method, path, {"passthrough": True, "headers": {"x-request-id": REQUEST_ID}})


def assert_service_error(
    exc: BaseException, cls: type, status: int, code: str, request_id: str = REQUEST_ID
) -> None:
    """``exc`` is exactly the service's error class, carrying the server's status and code."""
    assert type(exc) is cls, f"expected {cls.__name__}, got {type(exc).__name__}: {exc}"
    assert isinstance(exc, SpapsError)
    assert exc.status_code == status
    assert exc.error_code == code
    assert exc.request_id == request_id
    assert str(exc)


def count_requests(server: MockServer, predicate: Callable[[RecordedRequest], bool]) -> int:
    """How many recorded requests satisfy ``predicate``."""
    return sum(1 for request in server.requests if predicate(request))
