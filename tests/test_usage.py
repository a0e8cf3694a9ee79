"""Usage metering (docs/api.md, "Usage"; docs/usage-metering.md), sync and async: features,
record, history."""

from __future__ import annotations

from typing import Any, Dict, Iterator, List

import pytest
from conftest import grant_usage, is_uuid, user_id_of
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
    SpapsClient,
    UsageAuthorization,
    UsageError,
    UsageEvent,
    UsageFeature,
    UsageFeaturesResponse,
    UsageHistoryResponse,
    UsageRecordResult,
    UsageRecordUsage,
)
from spaps_mock import MockServer

FEATURES = "/api/usage/features"
AUTHORIZE = "/api/usage/authorize"
RECORD = "/api/usage/record"
HISTORY = "/api/usage/history"
# What the admin grants the demo user: feature -> limits per dimension.
GRANTS = {"api_calls": {"requests": 1000}, "storage_gb": {"gb": 100}}


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    """The demo user, signed in and entitled to both features (SPAPS meters only those)."""
    with aggregate(server, request.param) as twin:
        for feature, limits in GRANTS.items():
            grant_usage(server, user_id_of(twin), feature, dict(limits))
        yield twin



def used(api: Twin, feature: str) -> float:
    """What the history says was counted for ``feature`` (its only dimension)."""
    (dimension,) = GRANTS[feature]
    events = api.usage.get_history(feature=feature).events
    return float(sum(event.dimensions.get(dimension, 0) for event in events))


def posts(server: MockServer, path: str) -> List[Any]:
    return [r for r in server.requests if (r.method, r.path) == ("POST", path)]


# --- features -----------------------------------------------------------------------------


def test_features(api: Twin, server: MockServer) -> None:
    result = api.usage.get_features()

    request = last_request(server, "GET", FEATURES)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(result, UsageFeaturesResponse)
    by_name = {feature.name: feature for feature in result.features}
    assert set(by_name) == {"api_calls", "storage_gb"}
    api_calls = by_name["api_calls"]
    assert isinstance(api_calls, UsageFeature)
    assert api_calls.name == "api_calls"  # read from feature_key
    assert api_calls.display_name == "Api Calls"
    assert api_calls.dimensions == ["requests"]
    assert api_calls.limits == {"requests": 1000}
    assert api_calls.active is True
    assert api_calls.policy_key == "api_calls_default"
    assert api_calls.active_entitlements == ["api_calls"]
    assert by_name["storage_gb"].dimensions == ["gb"]
    # SPAPS's catalogue names no user, tier, period or per-feature usage.
    assert (result.user_id, result.tier, result.overage) == (None, None, None)
    assert (api_calls.used, api_calls.limit, api_calls.percentage) == (None, None, None)


@pytest.mark.parametrize("surface", SURFACES)
def test_features_empty_before_any_grant(server: MockServer, surface: str) -> None:
    with aggregate(server, surface) as api:
        assert api.usage.get_features().features == []


def test_features_error(api: Twin, server: MockServer) -> None:
    server.inject("GET", FEATURES, {"status": 403, "code": "FORBIDDEN",
                                    "headers": {"x-request-id": "req_usage_403"}})

    with pytest.raises(UsageError) as caught:
        api.usage.get_features()

    assert_service_error(caught.value, UsageError, 403, "FORBIDDEN", "req_usage_403")


# --- authorize ----------------------------------------------------------------------------


def test_authorize_usage(api: Twin, server: MockServer) -> None:
    result = api.usage.authorize_usage(feature_key="api_calls", dimensions={"requests": 4})

    sent = last_request(server, "POST", AUTHORIZE)
    assert_auth(sent, access_token(api))
    assert_json_body(sent, {"feature_key": "api_calls", "resource_type": "user",
                            "dimensions": {"requests": 4}, "subject_user_id": user_id_of(api)})
    assert isinstance(result, UsageAuthorization)
    assert result.decision == "allowed" and result.allowed is True
    assert is_uuid(result.authorization_ref)
    assert result.subject_user_id == user_id_of(api)
    assert result.remaining == {"requests": 996}
    assert result.reasons[0].code == "ENTITLEMENT_ALLOWED"
    assert used(api, "api_calls") == 0  # authorizing counts nothing


# --- record -------------------------------------------------------------------------------


def test_record_usage(api: Twin, server: MockServer) -> None:
    start = len(server.requests)
    result = api.usage.record_usage(feature="api_calls", quantity=3)

    # The one dimension comes from the catalogue, then the use is authorized and recorded.
    sent = server.requests[start:]
    assert [(r.method, r.path) for r in sent] == [("GET", FEATURES), ("POST", AUTHORIZE),
                                                  ("POST", RECORD)]
    subject = user_id_of(api)
    assert_json_body(sent[1], {"feature_key": "api_calls", "resource_type": "user",
                               "dimensions": {"requests": 3}, "subject_user_id": subject})
    request = sent[2]
    assert_auth(request, access_token(api))
    key = request.headers.get("x-idempotency-key")
    assert key  # always sent, generated when none is given
    assert_json_body(request, {"authorization_ref": result.authorization_ref,
                               "idempotency_key": key, "feature_key": "api_calls",
                               "resource_type": "user", "dimensions": {"requests": 3},
                               "subject_user_id": subject})
    assert isinstance(result, UsageRecordResult)
    assert is_uuid(result.record_id)
    assert is_uuid(result.authorization_ref)
    assert result.idempotency_key == key
    assert result.feature == "api_calls"
    assert result.quantity == 3.0 and isinstance(result.quantity, float)
    assert isinstance(result.recorded_at, str)
    assert (result.status, result.replayed) == ("recorded", False)
    assert result.window_totals == {"requests": 3}
    assert result.warning is None
    assert isinstance(result.current_usage, UsageRecordUsage)
    assert result.current_usage.used == 3.0
    assert result.current_usage.limit == 1000.0
    assert result.current_usage.remaining == 997.0
    assert used(api, "api_calls") == 3.0

    # The dimension is looked up once per client; each record gets its own key.
    start = len(server.requests)
    again = api.usage.record_usage(feature="api_calls", quantity=2)
    assert [(r.method, r.path) for r in server.requests[start:]] == [("POST", AUTHORIZE),
                                                                     ("POST", RECORD)]
    assert again.idempotency_key and again.idempotency_key != key
    assert again.current_usage.used == 5.0 and again.current_usage.remaining == 995.0


def test_record_usage_with_dimensions_and_authorization_ref(api: Twin,
                                                            server: MockServer) -> None:
    authorization = api.usage.authorize_usage(feature_key="storage_gb",
                                              dimensions={"gb": 2.5})
    start = len(server.requests)
    result = api.usage.record_usage(feature="storage_gb", dimensions={"gb": 2.5},
                                    authorization_ref=authorization.authorization_ref,
                                    idempotency_key="upload-1")

    (sent,) = server.requests[start:]  # no lookup, no second authorization
    assert sent.headers.get("x-idempotency-key") == "upload-1"
    assert sent.json["authorization_ref"] == authorization.authorization_ref
    assert sent.json["dimensions"] == {"gb": 2.5}
    assert result.authorization_ref == authorization.authorization_ref
    assert result.window_totals == {"gb": 2.5}
    assert used(api, "storage_gb") == 2.5


def test_record_usage_needs_quantity_or_dimensions(api: Twin, server: MockServer) -> None:
    count = len(server.requests)
    with pytest.raises(ValueError):
        api.usage.record_usage(feature="api_calls")
    with pytest.raises(ValueError):
        api.usage.record_usage(feature="api_calls", quantity=1, dimensions={"requests": 1})
    assert len(server.requests) == count


def test_record_usage_sends_metadata_and_timestamp_when_not_none(
    api: Twin, server: MockServer
) -> None:
    api.usage.record_usage(feature="storage_gb", quantity=1.5, metadata={},
                           timestamp="2024-01-15T10:00:00Z")

    request = last_request(server, "POST", RECORD)
    body = dict(request.json)
    assert is_uuid(body.pop("authorization_ref"))
    assert body.pop("idempotency_key") == request.headers.get("x-idempotency-key")
    assert body == {"feature_key": "storage_gb", "resource_type": "user",
                    "dimensions": {"gb": 1.5}, "subject_user_id": user_id_of(api),
                    "metadata": {}, "occurred_at": "2024-01-15T10:00:00Z"}
    assert posts(server, AUTHORIZE)[-1].json["metadata"] == {}


def test_record_usage_same_idempotency_key_counts_once(api: Twin, server: MockServer) -> None:
    first = api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-42")
    second = api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-42")

    records = posts(server, RECORD)
    assert [r.headers.get("x-idempotency-key") for r in records] == ["req-42", "req-42"]
    assert [r.json["idempotency_key"] for r in records] == ["req-42", "req-42"]
    assert second.record_id == first.record_id
    assert (first.replayed, second.replayed) == (False, True)
    assert second.window_totals == {"requests": 7}
    assert used(api, "api_calls") == 7.0

    api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-43")
    assert used(api, "api_calls") == 14.0


def test_replayed_record_reports_the_real_limit(api: Twin, server: MockServer) -> None:
    api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-42")
    second = api.usage.record_usage(feature="api_calls", quantity=7, idempotency_key="req-42")
    assert second.replayed is True
    assert second.current_usage.used == 7.0
    assert second.current_usage.limit == 1000.0
    assert second.current_usage.remaining == 993.0


def test_record_usage_empty_idempotency_key_is_replaced(api: Twin, server: MockServer) -> None:
    api.usage.record_usage(feature="api_calls", quantity=1, idempotency_key="")
    api.usage.record_usage(feature="api_calls", quantity=1, idempotency_key="")

    keys = [r.json["idempotency_key"] for r in posts(server, RECORD)]
    assert all(keys) and len(set(keys)) == 2
    assert [r.headers.get("x-idempotency-key") for r in posts(server, RECORD)] == keys
    assert used(api, "api_calls") == 2.0


def test_record_usage_unknown_feature(api: Twin, server: MockServer) -> None:
    with pytest.raises(UsageError) as caught:
        api.usage.record_usage(feature="teleports", quantity=1)

    # Found out from the catalogue: nothing is authorized or recorded.
    assert type(caught.value) is UsageError
    assert caught.value.error_code == "FEATURE_NOT_FOUND"
    assert "teleports" in str(caught.value) and "api_calls" in str(caught.value)
    assert last_request(server, "GET", FEATURES)
    assert posts(server, AUTHORIZE) == [] and posts(server, RECORD) == []


def test_record_usage_without_entitlement(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", AUTHORIZE)

    with pytest.raises(UsageError) as caught:
        api.usage.record_usage(feature="teleports", dimensions={"jumps": 1})

    assert_service_error(caught.value, UsageError, 403, "USAGE_ENTITLEMENT_REQUIRED")
    assert posts(server, RECORD) == []


def test_record_usage_over_the_limit_is_refused_and_not_recorded(api: Twin,
                                                                 server: MockServer) -> None:
    api.usage.record_usage(feature="api_calls", quantity=999)

    with pytest.raises(UsageError) as caught:
        api.usage.record_usage(feature="api_calls", quantity=2)

    assert caught.value.error_code == "USAGE_LIMIT_EXCEEDED"
    assert "blocked" in str(caught.value)
    assert len(posts(server, RECORD)) == 1
    assert used(api, "api_calls") == 999.0


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
    assert result.events == []
    assert (result.has_more, result.next_offset) == (False, None)
    assert result.history == []
    assert result.period is None


@pytest.mark.parametrize(
    ("filters", "query"),
    [
        ({"period": "month", "start_date": "", "end_date": None, "feature": "api_calls",
          "format": ""}, {"period": ["month"], "feature_key": ["api_calls"]}),
        ({"start_date": "2024-01-01", "end_date": "2024-01-31", "format": "daily"},
         {"start_date": ["2024-01-01"], "end_date": ["2024-01-31"], "format": ["daily"]}),
        ({"limit": 10, "offset": 0}, {"limit": ["10"], "offset": ["0"]}),
    ],
    ids=["falsy-dropped", "dates-and-format", "limit-and-zero-offset"],
)
def test_history_sends_only_truthy_filters(
    api: Twin, server: MockServer, filters: Dict[str, Any], query: Dict[str, List[str]]
) -> None:
    api.usage.get_history(**filters)

    request = last_request(server, "GET", HISTORY)
    assert request.query == query
    assert "feature" not in request.query
    assert_auth(request, access_token(api))


def test_history_reflects_recorded_usage(api: Twin, server: MockServer) -> None:
    first = api.usage.record_usage(feature="api_calls", quantity=5)
    second = api.usage.record_usage(feature="storage_gb", quantity=2)
    third = api.usage.record_usage(feature="api_calls", quantity=1)

    everything = api.usage.get_history()

    assert isinstance(everything, UsageHistoryResponse)
    assert [event.event_id for event in everything.events] == [
        third.record_id, second.record_id, first.record_id]  # newest first
    assert (everything.has_more, everything.next_offset) == (False, None)
    newest = everything.events[0]
    assert isinstance(newest, UsageEvent)
    assert newest.feature_key == "api_calls"
    assert newest.dimensions == {"requests": 1}
    assert newest.subject_user_id == user_id_of(api)
    assert newest.authorization_ref == third.authorization_ref
    assert newest.idempotency_key == third.idempotency_key
    assert newest.recorded_at is not None and newest.recorded_at.tzinfo is not None

    only_api_calls = api.usage.get_history(feature="api_calls")
    assert [event.dimensions for event in only_api_calls.events] == [
        {"requests": 1}, {"requests": 5}]

    page1 = api.usage.get_history(limit=2)
    assert len(page1.events) == 2
    assert (page1.has_more, page1.next_offset) == (True, 2)
    page2 = api.usage.get_history(limit=2, offset=page1.next_offset)
    assert [event.event_id for event in page2.events] == [first.record_id]
    assert (page2.has_more, page2.next_offset) == (False, None)


def test_history_bad_filter(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "GET", HISTORY)

    with pytest.raises(UsageError) as caught:
        api.usage.get_history(limit=0)

    assert_service_error(caught.value, UsageError, 400, "VALIDATION_ERROR")
    assert caught.value.details == {
        "fields": {"query.limit": "Input should be greater than or equal to 1"}}
    assert last_request(server, "GET", HISTORY).query == {"limit": ["0"]}


@pytest.mark.parametrize("surface", SURFACES)
def test_usage_needs_sign_in(server: MockServer, surface: str) -> None:
    with aggregate(server, surface, sign_in=False) as client, pytest.raises(ValueError):
        client.usage  # noqa: B018 - the property itself refuses

    assert server.requests == []


def test_record_waits_for_its_own_authorization_to_become_visible(
        entitled: SpapsClient, server: MockServer) -> None:
    # SPAPS stores an authorization after answering it: a record sent at once may find it
    # missing. The client authorized it itself, so it sends the (keyed) record again.
    expired = {"status": 409, "content_type": "application/json", "raw_body": (
        '{"success":false,"error":{"code":"USAGE_AUTHORIZATION_EXPIRED",'
        '"message":"Authorization not found or expired","details":{}}}')}
    server.inject("POST", RECORD, expired, expired)
    result = entitled.usage.record_usage(feature="api_calls", quantity=1)
    records = posts(server, RECORD)
    assert len(records) == 3 and result.replayed is False
    assert len({r.json["idempotency_key"] for r in records}) == 1
    assert used(entitled, "api_calls") == 1.0


def test_record_with_a_given_authorization_reports_its_expiry(
        entitled: SpapsClient, server: MockServer) -> None:
    authorization = entitled.usage.authorize_usage(feature_key="api_calls",
                                                   dimensions={"requests": 1})
    server.inject("POST", RECORD, {"status": 409, "content_type": "application/json",
                                   "raw_body": '{"success":false,"error":{"code":'
                                   '"USAGE_AUTHORIZATION_EXPIRED","message":"expired"}}'})
    with pytest.raises(UsageError) as caught:
        entitled.usage.record_usage(feature="api_calls", dimensions={"requests": 1},
                                    authorization_ref=authorization.authorization_ref)
    assert caught.value.error_code == "USAGE_AUTHORIZATION_EXPIRED"
    assert len(posts(server, RECORD)) == 1  # the caller's authorization: not ours to wait for
