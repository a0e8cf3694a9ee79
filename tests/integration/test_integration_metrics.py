"""Health and metrics of the real SPAPS, sync and async (no credentials needed)."""

from __future__ import annotations

from typing import Any, Dict

import pytest
from _realsupport import Flavor

pytestmark = pytest.mark.realserver


def _payload(document: Dict[str, Any]) -> Dict[str, Any]:
    """The document's ``data`` object if it is enveloped, else the document."""
    inner = document.get("data")
    return inner if isinstance(inner, dict) else document


def test_health(flavor: Flavor) -> None:
    async def flow(c: Flavor) -> None:
        health = await c(c.client().metrics.health())
        assert isinstance(health, dict)
        assert _payload(health)["status"] == "ok"
        assert _payload(health)["version"]

    flavor.run(flow)


def test_readiness(flavor: Flavor) -> None:
    async def flow(c: Flavor) -> None:
        ready = _payload(await c(c.client().metrics.readiness()))
        assert ready["status"] == "ready"
        checks = ready["checks"]
        assert checks["database"]["status"] == "connected"
        assert checks["redis"]["status"] == "connected"

    flavor.run(flow)


def test_prometheus_metrics(flavor: Flavor) -> None:
    async def flow(c: Flavor) -> None:
        text = await c(c.client().metrics.get_prometheus_metrics())
        assert isinstance(text, str)
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        assert samples["spaps_requests_total"] >= 1
        assert samples["spaps_uptime_seconds"] >= 0
        assert "spaps_errors_total" in samples

    flavor.run(flow)


def test_metrics_json(flavor: Flavor) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        first = _payload(await c(spaps.metrics.get_metrics_json()))
        second = _payload(await c(spaps.metrics.get_metrics_json()))
        assert first["requests_total"] >= 1
        assert second["requests_total"] > first["requests_total"]  # it counts our requests
        assert first["uptime_seconds"] >= 0
        assert "errors_total" in first and first["version"]

    flavor.run(flow)
