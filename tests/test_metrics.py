"""Metrics and health (docs/api.md, "Metrics and health"): raw bodies, no credentials,
MetricsError on failure."""

from __future__ import annotations

import asyncio
from typing import Any, Dict

import pytest
from conftest import API_KEY, only

from spaps_client import (
    AsyncMetricsClient,
    AsyncSpapsClient,
    MetricsClient,
    MetricsError,
    RetryConfig,
    SpapsClient,
    SpapsError,
)
from spaps_mock import MockServer, RecordedRequest

NO_RETRY = RetryConfig(max_attempts=1)



def assert_healthy(document: Dict[str, Any]) -> None:
    """SPAPS's raw /health body: the verdict is under ``data`` (docs/compatibility.md, row S19)."""
    assert document["success"] is True
    assert document["data"]["status"] == "ok"
    assert isinstance(document["data"]["version"], str)
    assert isinstance(document["data"]["started_at"], str)


def assert_ready(document: Dict[str, Any]) -> None:
    """SPAPS's raw /health/ready body, every dependency reported connected."""
    assert document["success"] is True
    data = document["data"]
    assert data["status"] == "ready"
    assert set(data["checks"]) == {"database", "redis", "pii_encryption"}
    assert all(check["status"] == "connected" for check in data["checks"].values())
    assert isinstance(document["metadata"]["timestamp"], str)


def assert_no_credentials(request: RecordedRequest) -> None:
    assert "x-api-key" not in request.headers
    assert "authorization" not in request.headers
    assert request.body == b""
    assert request.raw_query == ""


def test_health_and_readiness(server: MockServer, signed_in: SpapsClient) -> None:
    # Signed in on purpose: the token must still not be sent to the metrics endpoints.
    assert_healthy(signed_in.metrics.health())
    assert_ready(signed_in.metrics.readiness())
    assert_no_credentials(only(server, "GET", "/health"))
    assert_no_credentials(only(server, "GET", "/health/ready"))


def test_prometheus_text(server: MockServer, signed_in: SpapsClient) -> None:
    text = signed_in.metrics.get_prometheus_metrics()
    assert isinstance(text, str)
    assert "# TYPE spaps_mock_http_requests_total counter" in text
    # The sign-in made before is counted: the text is the server's live exposition.
    assert 'route="/api/auth/login",status="200"' in text
    request = only(server, "GET", "/api/metrics")
    assert_no_credentials(request)
    assert request.headers.get("accept") == "text/plain"


def test_metrics_json_is_the_whole_document(server: MockServer, signed_in: SpapsClient) -> None:
    document = signed_in.metrics.get_metrics_json()
    assert isinstance(document, dict)
    # The whole document, envelope included: nothing is unwrapped.
    assert document["success"] is True
    assert isinstance(document["metadata"]["timestamp"], str)
    data = document["data"]
    assert set(data) >= {"uptime_seconds", "requests_total", "errors_total", "version"}
    # The sign-in made before is counted: these are the server's live numbers.
    assert isinstance(data["requests_total"], int) and data["requests_total"] >= 1
    assert data["errors_total"] == 0
    assert isinstance(data["uptime_seconds"], (int, float)) and data["uptime_seconds"] >= 0
    request = only(server, "GET", "/api/metrics/json")
    assert_no_credentials(request)
    assert request.headers.get("accept") == "application/json"


def test_metrics_need_no_sign_in(server: MockServer, client: SpapsClient) -> None:
    assert_healthy(client.metrics.health())
    assert_no_credentials(only(server, "GET", "/health"))


@pytest.mark.parametrize(
    ("path", "call"),
    [
        ("/health", lambda m: m.health()),
        ("/health/ready", lambda m: m.readiness()),
        ("/api/metrics", lambda m: m.get_prometheus_metrics()),
        ("/api/metrics/json", lambda m: m.get_metrics_json()),
    ],
)
def test_error_status_raises_metrics_error(server: MockServer, path: str, call: Any) -> None:
    server.inject("GET", path, {"status": 503, "headers": {"x-request-id": "req_metrics"}})
    spaps = SpapsClient(base_url=server.url, api_key=API_KEY, retry_config=NO_RETRY)
    with spaps, pytest.raises(MetricsError) as caught:
        call(spaps.metrics)
    error = caught.value
    assert isinstance(error, SpapsError)
    assert error.status_code == 503
    assert error.request_id == "req_metrics"
    assert server.request_count("GET", path) == 1


def test_persistent_503_with_retries_is_metrics_error(server: MockServer) -> None:
    server.inject("GET", "/health", {"status": 503}, {"status": 503}, {"status": 503})
    fast = RetryConfig(backoff_factor=0, jitter=False)  # the default 3 attempts, no waiting
    spaps = SpapsClient(base_url=server.url, api_key=API_KEY, retry_config=fast)
    with spaps, pytest.raises(MetricsError) as caught:
        spaps.metrics.health()
    assert caught.value.status_code == 503
    assert server.request_count("GET", "/health") == 3


def test_health_error_carries_server_code(server: MockServer) -> None:
    server.inject("GET", "/health", {"status": 503, "code": "MAINTENANCE",
                                     "message": "down for maintenance"})
    metrics = MetricsClient(base_url=server.url, retry_config=NO_RETRY)
    with metrics, pytest.raises(MetricsError) as caught:
        metrics.health()
    assert caught.value.error_code == "MAINTENANCE"
    assert str(caught.value) == "down for maintenance"


def test_standalone_metrics_client(server: MockServer) -> None:
    with MetricsClient(base_url=server.url + "/") as metrics:
        assert metrics.base_url == server.url
        assert_ready(metrics.readiness())
    assert_no_credentials(only(server, "GET", "/health/ready"))


def test_async_metrics(server: MockServer) -> None:
    async def scenario() -> Dict[str, Any]:
        async with AsyncSpapsClient(base_url=server.url, api_key=API_KEY) as spaps:
            return {
                "health": await spaps.metrics.health(),
                "ready": await spaps.metrics.readiness(),
                "text": await spaps.metrics.get_prometheus_metrics(),
                "json": await spaps.metrics.get_metrics_json(),
            }

    out = asyncio.run(scenario())
    assert_healthy(out["health"])
    assert_ready(out["ready"])
    assert "spaps_uptime_seconds" in out["text"]
    assert 'spaps_info{version="1.0.0"}' in out["text"]
    assert out["json"]["data"]["requests_total"] >= 3  # the three calls before it
    for path in ("/health", "/health/ready", "/api/metrics", "/api/metrics/json"):
        assert_no_credentials(only(server, "GET", path))


def test_async_metrics_error(server: MockServer) -> None:
    server.inject("GET", "/health", {"status": 503})

    async def scenario() -> None:
        async with AsyncMetricsClient(base_url=server.url, retry_config=NO_RETRY) as metrics:
            await metrics.health()

    with pytest.raises(MetricsError) as caught:
        asyncio.run(scenario())
    assert caught.value.status_code == 503
