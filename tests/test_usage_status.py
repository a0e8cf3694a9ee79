"""``usage.get_usage_status`` against the emulator, sync and async: 403 before any grant, then
where the feature stands (decision, totals, remaining) without authorizing anything."""

from __future__ import annotations

from typing import Iterator

import pytest
from conftest import grant_usage, subject_of
from service_twin import SURFACES, Twin, access_token, aggregate, last_request

from spaps_client import UsageAuthorization, UsageError
from spaps_mock import MockServer


def subject(twin: Twin) -> str:
    return subject_of(access_token(twin))


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    with aggregate(server, request.param) as twin:
        yield twin


def test_usage_status_before_and_after_a_grant(api: Twin, server: MockServer) -> None:
    uid = subject(api)
    with pytest.raises(UsageError) as caught:
        api.usage.get_usage_status(feature_key="api_calls")
    assert type(caught.value) is UsageError
    assert (caught.value.status_code, caught.value.error_code) == (
        403, "USAGE_ENTITLEMENT_REQUIRED")

    grant_usage(server, uid, limits={"requests": 10})
    status = api.usage.get_usage_status(feature_key="api_calls")

    request = last_request(server, "GET", "/api/usage/status")
    assert request.query == {"feature_key": ["api_calls"], "resource_type": ["user"],
                             "subject_user_id": [uid]}
    assert request.headers["authorization"] == "Bearer " + access_token(api)
    assert isinstance(status, UsageAuthorization)
    assert status.decision == "allowed"
    assert status.feature_key == "api_calls"
    assert status.authorization_ref is None
    assert status.active_entitlements == ["api_calls"]
    assert status.remaining == {"requests": 10}
    # a status read authorizes nothing, so the next authorize still sees the whole limit
    authorized = api.usage.authorize_usage(feature_key="api_calls", dimensions={"requests": 4})
    assert authorized.authorization_ref
    assert api.usage.get_usage_status(feature_key="api_calls").remaining == {"requests": 10}
