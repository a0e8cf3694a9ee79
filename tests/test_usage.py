"""Usage metering (contract 2.4), sync and async: features, record, history."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import pytest
from service_twin import (
    SURFACES,
    Twin,
    access_token,
    aggregate,
    assert_auth,
    assert_json_body,
    assert_no_body,
    assert_service_error,
    last_request,
    tag_request_id,
)

from spaps_client import (
    HttpRequest,
    UsageError,
    UsageFeature,
    UsageFeaturesResponse,
    UsageHistoryEntry,
    UsageHistoryResponse,
    UsagePeriod,
    UsageRecordResult,
    UsageRecordUsage,
)
from spaps_mock import MockServer

FEATURES = "/api/usage/features"
RECORD = "/api/usage/record"
HISTORY = "/api/usage/history"


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    with aggregate(server, request.param) as twin:
        yield twin


def used(api: Twin, feature: str) -> Any:
    features = api.usage.get_features().features
    return next(item.used for item in features if item.name == feature)


# --- features -----------------------------------------------------------------------------


def test_features(api: Twin, server: MockServer) -> None:
    result = api.usage.get_features()

    request = last_request(server, "GET", FEATURES)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(result, UsageFeaturesResponse)
    assert isinstance(result.user_id, str) and result.user_id
    assert result.tier == "basic"
    assert isinstance(result.period, UsagePeriod)
    assert isinstance(result.period.start, str) and isinstance(result.period.end, str)
    assert result.overage == {}
    by_name = {feature.name: feature for feature in result.features}
    assert set(by_name) == {"api_calls", "storage_gb"}
    api_calls = by_name["api_calls"]
    assert isinstance(api_calls, UsageFeature)
    assert api_calls.used == 0 and isinstance(api_calls.used, float)
    assert api_calls.limit == 1000.0 and isinstance(api_calls.limit, float)
    assert api_calls.percentage == 0
    assert isinstance(api_calls.description, str)
    assert isinstance(api_calls.reset_at, str)


def test_features_error(api: Twin, server: MockServer) -> None:
    server.inject("GET", FEATURES, {"status": 403, "code": "FORBIDDEN",
                                    "headers": {"x-request-id": "req_usage_403"}})

    with pytest.raises(UsageError) as caught:
        api.usage.get_features()

    assert_service_error(caught.value, UsageError, 403, "FORBIDDEN", "req_usage_403")


# --- record -------------------------------------------------------------------------------


def test_record_usage(api: Twin, server: MockServer) -> None:
    result = api.usage.record_usage(feature="api_calls", quantity=3)

    request = last_request(server, "POST", RECORD)
    assert_auth(request, access_token(api))
    assert "x-idempotency-key" not in request.headers
    assert_json_body(request, {"feature": "api_calls", "quantity": 3})
    assert isinstance(result, UsageRecordResult)
    assert result.record_id.startswith("usage_")
    assert result.feature == "api_calls"
    assert result.quantity == 3.0 and isinstance(result.quantity, float)
    assert isinstance(result.recorded_at, str)
    assert result.warning is None
    assert isinstance(result.current_usage, UsageRecordUsage)
    assert result.current_usage.used == 3.0
    assert result.current_usage.limit == 1000.0
    assert result.current_usage.remaining == 997.0
    assert used(api, "api_calls") == 3.0


def test_record_usage_sends_metadata_and_timestamp_when_not_none(
    api: Twin, server: MockServer
) -> None:
    api.usage.record_usage(feature="storage_gb", quantity=1.5, metadata={},
                           timestamp="2024-01-15T10:00:00Z")

    assert_json_body(
        last_request(server, "POST", RECORD),
        {"feature": "storage_gb", "quantity": 1.5, "metadata": {},
         "timestamp": "2024-01-15T10:00:00Z"},
    )


def test_record_usage_same_idempotency_key_counts_once(api: Twin, server: MockServer) -> None:
    first = api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-42")
    second = api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-42")

    records = [r for r in server.requests if (r.method, r.path) == ("POST", RECORD)]
    assert [r.headers.get("x-idempotency-key") for r in records] == ["req-42", "req-42"]
    assert second.record_id == first.record_id
    assert used(api, "api_calls") == 7.0

    api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-43")
    assert used(api, "api_calls") == 14.0


def test_record_usage_empty_idempotency_key_is_not_sent(api: Twin, server: MockServer) -> None:
    api.usage.record_usage(feature="api_calls", quantity=1, idempotency_key="")
    api.usage.record_usage(feature="api_calls", quantity=1, idempotency_key="")

    assert "x-idempotency-key" not in last_request(server, "POST", RECORD).headers
    assert used(api, "api_calls") == 2.0


def test_record_usage_unknown_feature(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", RECORD)

    with pytest.raises(UsageError) as caught:
        api.usage.record_usage(feature="teleports", quantity=1)

    assert_service_error(caught.value, UsageError, 404, "FEATURE_NOT_FOUND")


# --- history ------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_history_without_filters_has_no_query_string(server: MockServer, surface: str) -> None:
    urls: List[str] = []

    def on_request(request: HttpRequest) -> None:
        urls.append(request.url)

    with aggregate(server, surface, logging_hooks={"on_request": on_request}) as api:
        result = api.usage.get_history()
        token = access_token(api)

    request = last_request(server, "GET", HISTORY)
    assert request.raw_query == ""
    assert_auth(request, token)
    assert_no_body(request)
    assert urls[-1].endswith(HISTORY)  # no "?" at all
    assert isinstance(result, UsageHistoryResponse)
    assert result.history == []
    assert result.period is None


@pytest.mark.parametrize(
    ("filters", "query"),
    [
        ({"period": "month", "start_date": "", "end_date": None, "feature": "api_calls",
          "format": ""}, {"period": ["month"], "feature": ["api_calls"]}),
        ({"start_date": "2024-01-01", "end_date": "2024-01-31", "format": "daily"},
         {"start_date": ["2024-01-01"], "end_date": ["2024-01-31"], "format": ["daily"]}),
    ],
    ids=["falsy-dropped", "dates-and-format"],
)
def test_history_sends_only_truthy_filters(
    api: Twin, server: MockServer, filters: Dict[str, Any], query: Dict[str, List[str]]
) -> None:
    api.usage.get_history(**filters)

    request = last_request(server, "GET", HISTORY)
    assert request.query == query
    assert_auth(request, access_token(api))


def test_history_reflects_recorded_usage(api: Twin, server: MockServer) -> None:
    api.usage.record_usage(feature="api_calls", quantity=5, timestamp="2024-01-15T10:00:00Z")
    api.usage.record_usage(feature="storage_gb", quantity=2, timestamp="2024-01-16T08:30:00Z")
    api.usage.record_usage(feature="api_calls", quantity=1, timestamp="2024-01-16T09:00:00Z")

    everything = api.usage.get_history(period="custom")

    assert isinstance(everything, UsageHistoryResponse)
    assert everything.period == "custom"
    assert (everything.start_date, everything.end_date) == ("2024-01-15", "2024-01-16")
    assert [entry.date for entry in everything.history] == ["2024-01-15", "2024-01-16"]
    first, second = everything.history
    assert isinstance(first, UsageHistoryEntry)
    assert first.features == {"api_calls": 5}
    assert second.features == {"storage_gb": 2, "api_calls": 1}
    assert isinstance(first.total_cost, float)
    assert everything.summary is not None and everything.summary["total_records"] == 3

    only_api_calls = api.usage.get_history(feature="api_calls")
    assert [entry.features for entry in only_api_calls.history] == [
        {"api_calls": 5}, {"api_calls": 1}
    ]

    from_16th = api.usage.get_history(start_date="2024-01-16")
    assert [entry.date for entry in from_16th.history] == ["2024-01-16"]


def test_history_bad_filter(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "GET", HISTORY)

    with pytest.raises(UsageError) as caught:
        api.usage.get_history(start_date="last tuesday")

    assert_service_error(caught.value, UsageError, 400, "VALIDATION_ERROR")
    assert last_request(server, "GET", HISTORY).query == {"start_date": ["last tuesday"]}


@pytest.mark.parametrize("surface", SURFACES)
def test_usage_needs_sign_in(server: MockServer, surface: str) -> None:
    with aggregate(server, surface, sign_in=False) as client, pytest.raises(ValueError):
        client.usage  # noqa: B018 - the property itself refuses

    assert server.requests == []
