"""SPAPS webhook verification (docs/api.md, "Webhooks"): ``verify_spaps_webhook`` and
``generate_test_signature``."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any, Dict

import pytest

from spaps_client import (
    SpapsWebhookPayload,
    WebhookVerificationError,
    generate_test_signature,
    verify_spaps_webhook,
)

SECRET = "whsec_spaps_test"
NOW = 1_700_000_000
PAYLOAD: Dict[str, Any] = {
    "id": "evt_123",
    "type": "entitlement.granted",
    "schema_version": 1,
    "application_id": "app_mock",
    "created_at": "2023-11-14T22:13:20Z",
    "data": {"entitlement_id": "ent_1", "entitlement_key": "pro", "source": "stripe"},
}
BODY = json.dumps(PAYLOAD)


def sign_text(body: str, secret: str = SECRET, timestamp: int = NOW) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def rejection(body: Any, signature: str, **options: Any) -> WebhookVerificationError:
    with pytest.raises(WebhookVerificationError) as caught:
        verify_spaps_webhook(body, signature, SECRET, **options)
    return caught.value


def test_generate_test_signature_format() -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=NOW)

    assert re.fullmatch(r"t=1700000000,v1=[0-9a-f]{64}", header)
    assert header == sign_text(BODY)  # json.dumps with default separators, "<t>.<body>"


def test_generate_test_signature_defaults_to_now() -> None:
    before = int(time.time())
    header = generate_test_signature(PAYLOAD, SECRET)
    match = re.fullmatch(r"t=(\d+),v1=[0-9a-f]{64}", header)
    assert match is not None
    assert int(match.group(1)) >= before


@pytest.mark.parametrize("body", [BODY, BODY.encode("utf-8")], ids=["str", "bytes"])
def test_valid_webhook_returns_the_payload(body: Any) -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=NOW)

    payload = verify_spaps_webhook(body, header, SECRET, timestamp=NOW + 10)

    assert isinstance(payload, SpapsWebhookPayload)
    assert payload.id == "evt_123"
    assert payload.type == "entitlement.granted"
    assert payload.schema_version == 1 and isinstance(payload.schema_version, int)
    assert payload.application_id == "app_mock"
    assert payload.created_at == "2023-11-14T22:13:20Z"
    assert payload.data == PAYLOAD["data"]


def test_valid_webhook_against_the_real_clock() -> None:
    header = generate_test_signature(PAYLOAD, SECRET)

    assert verify_spaps_webhook(BODY, header, SECRET).id == "evt_123"


def test_non_ascii_body() -> None:
    payload = {**PAYLOAD, "data": {"name": "Zoë ✓"}}
    header = generate_test_signature(payload, SECRET, timestamp=NOW)
    body = json.dumps(payload).encode("utf-8")

    assert verify_spaps_webhook(body, header, SECRET, timestamp=NOW).data == {"name": "Zoë ✓"}


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "garbage",
        "t=1700000000",
        "v1=" + "a" * 64,
        "t=1700000000,v1=" + "A" * 64,  # upper-case hex
        "t=1700000000,v1=" + "a" * 63,  # too short
        "t=1700000000, v1=" + "a" * 64,  # space
        "t=1700000000,v1=" + "a" * 64 + ",v0=abc",  # extra part
        "v1=" + "a" * 64 + ",t=1700000000",  # wrong order
        "t=-5,v1=" + "a" * 64,
    ],
)
def test_invalid_format(signature: str) -> None:
    assert rejection(BODY, signature, timestamp=NOW).code == "INVALID_FORMAT"


def test_timestamp_far_in_the_future() -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=NOW + 3600)

    error = rejection(BODY, header, timestamp=NOW)
    assert error.code == "TIMESTAMP_FUTURE"


def test_timestamp_future_against_the_real_clock() -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=int(time.time()) + 86400)

    assert rejection(BODY, header).code == "TIMESTAMP_FUTURE"


def test_signature_expired() -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=NOW)

    assert verify_spaps_webhook(BODY, header, SECRET, timestamp=NOW + 300).id == "evt_123"
    assert rejection(BODY, header, timestamp=NOW + 301).code == "SIGNATURE_EXPIRED"


def test_max_age_seconds_widens_the_window() -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=NOW)

    payload = verify_spaps_webhook(BODY, header, SECRET, max_age_seconds=3600,
                                   timestamp=NOW + 3000)
    assert payload.id == "evt_123"
    assert rejection(BODY, header, max_age_seconds=60, timestamp=NOW + 61).code == (
        "SIGNATURE_EXPIRED"
    )


def test_expired_old_webhook_against_the_real_clock() -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=int(time.time()) - 3600)

    assert rejection(BODY, header).code == "SIGNATURE_EXPIRED"


def test_time_window_is_checked_before_the_hmac() -> None:
    header = sign_text(BODY, secret="whsec_wrong", timestamp=NOW)

    assert rejection(BODY, header, timestamp=NOW + 10_000).code == "SIGNATURE_EXPIRED"


@pytest.mark.parametrize(
    ("body", "secret"),
    [(BODY, "whsec_wrong"), (BODY.replace("evt_123", "evt_999"), SECRET)],
    ids=["wrong-secret", "tampered-body"],
)
def test_invalid_signature(body: str, secret: str) -> None:
    header = generate_test_signature(PAYLOAD, secret, timestamp=NOW)

    assert rejection(body, header, timestamp=NOW).code == "INVALID_SIGNATURE"


def test_invalid_json() -> None:
    body = "{not json"

    assert rejection(body, sign_text(body), timestamp=NOW).code == "INVALID_JSON"


@pytest.mark.parametrize(
    "payload",
    [
        {key: value for key, value in PAYLOAD.items() if key != "type"},
        {**PAYLOAD, "schema_version": "one"},
        {**PAYLOAD, "data": "not an object"},
        ["not", "an", "object"],
    ],
    ids=["missing-type", "bad-schema-version", "data-not-object", "array"],
)
def test_invalid_payload(payload: Any) -> None:
    body = json.dumps(payload)

    assert rejection(body, sign_text(body), timestamp=NOW).code == "INVALID_PAYLOAD"


def test_timestamp_override_replaces_now() -> None:
    header = generate_test_signature(PAYLOAD, SECRET, timestamp=NOW)

    # Without the override the 2023 signature is long expired.
    assert rejection(BODY, header).code == "SIGNATURE_EXPIRED"
    assert verify_spaps_webhook(BODY, header, SECRET, timestamp=NOW).id == "evt_123"


def test_error_carries_code_and_message() -> None:
    error = WebhookVerificationError("bad things", code="INVALID_SIGNATURE")

    assert error.code == "INVALID_SIGNATURE"
    assert str(error) == "bad things"
    assert WebhookVerificationError("no code").code is None


def test_non_utf8_body_is_a_verification_failure() -> None:
    forged = b"\xff\xfe{}"

    with pytest.raises(WebhookVerificationError):
        verify_spaps_webhook(forged, f"t={NOW},v1={'0' * 64}", SECRET, timestamp=NOW)
