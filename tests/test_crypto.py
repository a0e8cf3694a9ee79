"""Crypto invoices (``payments.crypto``, docs/api.md, "Crypto invoices") sync and async, and
the crypto webhook signature helper (docs/api.md, "Webhooks")."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from datetime import datetime
from typing import Any, Dict, Iterator, List, Optional

import pytest
from conftest import API_KEY
from service_twin import (
    SURFACES,
    Twin,
    access_token,
    aggregate,
    assert_auth,
    assert_json_body,
    assert_no_body,
    assert_service_error,
    demo_token,
    last_request,
    standalone,
    tag_request_id,
)

from spaps_client import (
    CryptoInvoice,
    CryptoInvoiceStatus,
    CryptoPaymentsError,
    CryptoReconcileJob,
    PaymentsError,
    RetryAsyncClient,
    RetryClient,
    WebhookVerificationError,
    verify_crypto_webhook_signature,
)
from spaps_mock import MockServer

INVOICES = "/api/payments/crypto/invoices"
RECONCILE = "/api/payments/crypto/reconcile"


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    with aggregate(server, request.param) as twin:
        yield twin


def new_invoice(api: Twin, **options: Any) -> CryptoInvoice:
    invoice: CryptoInvoice = api.payments.crypto.create_invoice(
        asset="USDC", network="base", amount="42.75", **options
    )
    return invoice


# --- create -------------------------------------------------------------------------------


def test_create_invoice_minimal(api: Twin, server: MockServer) -> None:
    invoice = new_invoice(api)

    request = last_request(server, "POST", INVOICES)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_json_body(request, {"asset": "USDC", "network": "base", "amount": "42.75"})
    assert isinstance(invoice, CryptoInvoice)
    assert str(uuid.UUID(invoice.invoice_id)) == invoice.invoice_id  # SPAPS ids are UUIDs
    assert (invoice.asset, invoice.network, invoice.amount) == ("USDC", "base", "42.75")
    assert invoice.status == "pending"
    assert invoice.expires_at is None  # no expires_in_seconds asked for
    assert invoice.settled_at is None
    assert invoice.beneficiary is None
    assert invoice.metadata == {}
    assert isinstance(invoice.application_id, str) and invoice.application_id
    assert isinstance(invoice.created_at, str)
    assert datetime.fromisoformat(invoice.created_at).tzinfo is not None


def test_create_invoice_with_expiry_reports_it(api: Twin, server: MockServer) -> None:
    invoice = new_invoice(api, expires_in_seconds=600)

    assert last_request(server, "POST", INVOICES).json["expires_in_seconds"] == 600
    assert isinstance(invoice.expires_at, str) and isinstance(invoice.created_at, str)
    lifetime = (datetime.fromisoformat(invoice.expires_at)
                - datetime.fromisoformat(invoice.created_at)).total_seconds()
    assert 599 <= lifetime <= 601


@pytest.mark.parametrize(("amount", "sent"), [("42.75", "42.75"), (42.75, "42.75"), (10, "10")])
def test_create_invoice_sends_amount_as_string(
    api: Twin, server: MockServer, amount: Any, sent: str
) -> None:
    invoice = api.payments.crypto.create_invoice(asset="USDC", network="base", amount=amount)

    assert last_request(server, "POST", INVOICES).json["amount"] == sent
    assert invoice.amount == sent


def test_create_invoice_sends_optional_keys_when_not_none(api: Twin, server: MockServer) -> None:
    invoice = new_invoice(api, expires_in_seconds=600, beneficiary={}, metadata={})

    assert_json_body(
        last_request(server, "POST", INVOICES),
        {"asset": "USDC", "network": "base", "amount": "42.75", "expires_in_seconds": 600,
         "beneficiary": {}, "metadata": {}},
    )
    assert invoice.beneficiary == {}
    assert invoice.metadata == {}


def test_create_invoice_returns_beneficiary_and_metadata(api: Twin, server: MockServer) -> None:
    invoice = new_invoice(api, beneficiary={"wallet": "0xBEEF"}, metadata={"order": "o-1"})

    assert last_request(server, "POST", INVOICES).json["beneficiary"] == {"wallet": "0xBEEF"}
    assert invoice.beneficiary == {"wallet": "0xBEEF"}
    assert invoice.metadata == {"order": "o-1"}


def test_create_invoice_error_is_crypto_payments_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", INVOICES)

    with pytest.raises(CryptoPaymentsError) as caught:
        api.payments.crypto.create_invoice(asset="USDC", network="base", amount="lots")

    assert_service_error(caught.value, CryptoPaymentsError, 400, "VALIDATION_ERROR")
    assert not isinstance(caught.value, PaymentsError)


# --- get and status -----------------------------------------------------------------------


def test_get_invoice_by_positional_id(api: Twin, server: MockServer) -> None:
    created = new_invoice(api, metadata={"order": "o-2"})

    invoice = api.payments.crypto.get_invoice(created.invoice_id)

    request = last_request(server, "GET", f"{INVOICES}/{created.invoice_id}")
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(invoice, CryptoInvoice)
    assert invoice == created


def test_get_unknown_invoice(api: Twin, server: MockServer) -> None:
    missing = str(uuid.uuid4())
    tag_request_id(server, "GET", f"{INVOICES}/{missing}")

    with pytest.raises(CryptoPaymentsError) as caught:
        api.payments.crypto.get_invoice(missing)

    last_request(server, "GET", f"{INVOICES}/{missing}")
    assert_service_error(caught.value, CryptoPaymentsError, 404, "INVOICE_NOT_FOUND")
    assert missing in str(caught.value)


def test_get_invoice_with_non_uuid_id_is_a_validation_error(
    api: Twin, server: MockServer
) -> None:
    tag_request_id(server, "GET", f"{INVOICES}/inv_missing")

    with pytest.raises(CryptoPaymentsError) as caught:
        api.payments.crypto.get_invoice("inv_missing")

    assert_service_error(caught.value, CryptoPaymentsError, 400, "VALIDATION_ERROR")


def test_invoice_id_is_percent_encoded(api: Twin, server: MockServer) -> None:
    path = f"{INVOICES}/inv%2F..%2F..%2Fbalance"
    tag_request_id(server, "GET", path)

    with pytest.raises(CryptoPaymentsError) as caught:
        api.payments.crypto.get_invoice("inv/../../balance")

    last_request(server, "GET", path)  # one segment: no other route was reached
    assert server.request_count("GET", "/api/payments/balance") == 0
    assert_service_error(caught.value, CryptoPaymentsError, 400, "VALIDATION_ERROR")


def test_invoice_status_moves_to_confirmed(api: Twin, server: MockServer) -> None:
    invoice = new_invoice(api)
    path = f"{INVOICES}/{invoice.invoice_id}/status"

    pending = api.payments.crypto.get_invoice_status(invoice.invoice_id)

    request = last_request(server, "GET", path)
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(pending, CryptoInvoiceStatus)
    assert pending.invoice_id == invoice.invoice_id  # SPAPS answers it as "id"
    assert pending.status == "pending"
    assert pending.amount == "42.75"
    assert pending.settled_at is None
    assert pending.expires_at is None

    server.set_invoice_status(invoice.invoice_id, "confirmed")
    confirmed = api.payments.crypto.get_invoice_status(invoice.invoice_id)

    assert confirmed.invoice_id == invoice.invoice_id
    assert confirmed.status == "confirmed"
    assert confirmed.amount == "42.75"
    assert isinstance(confirmed.settled_at, str)
    assert datetime.fromisoformat(confirmed.settled_at).tzinfo is not None
    settled = api.payments.crypto.get_invoice(invoice.invoice_id)
    assert settled.status == "confirmed"
    assert settled.settled_at == confirmed.settled_at


def test_invoice_status_unknown(api: Twin, server: MockServer) -> None:
    missing = str(uuid.uuid4())
    tag_request_id(server, "GET", f"{INVOICES}/{missing}/status")

    with pytest.raises(CryptoPaymentsError) as caught:
        api.payments.crypto.get_invoice_status(missing)

    assert_service_error(caught.value, CryptoPaymentsError, 404, "INVOICE_NOT_FOUND")


# --- reconcile ----------------------------------------------------------------------------


def test_reconcile_without_cursor_sends_empty_object(api: Twin, server: MockServer) -> None:
    job = api.payments.crypto.reconcile()

    request = last_request(server, "POST", RECONCILE)
    assert_auth(request, access_token(api))
    assert_json_body(request, {})
    assert "x-recon-token" not in request.headers
    assert isinstance(job, CryptoReconcileJob)
    # SPAPS 0.6 reconciles at once: no job is scheduled.
    assert job.reconciled is True
    assert job.message == "Payment reconciliation completed"
    assert job.job_id is None and job.scheduled_at is None


def test_reconcile_from_a_server_that_schedules_jobs(api: Twin, server: MockServer) -> None:
    server.inject("POST", RECONCILE, {
        "raw_body": '{"success": true, "data": {"job_id": "job_1", '
                    '"scheduled_at": "2026-12-01T00:00:00Z", "cursor": {"last_invoice_id": "i"}}}',
        "content_type": "application/json"})

    job = api.payments.crypto.reconcile()

    assert (job.job_id, job.scheduled_at) == ("job_1", "2026-12-01T00:00:00Z")
    assert job.cursor == {"last_invoice_id": "i"}
    assert job.reconciled is None


def test_reconcile_with_cursor_and_recon_token(api: Twin, server: MockServer) -> None:
    invoice = new_invoice(api)

    job = api.payments.crypto.reconcile(recon_token="recon-secret",
                                        cursor={"last_invoice_id": invoice.invoice_id})

    request = last_request(server, "POST", RECONCILE)
    assert_auth(request, access_token(api))
    assert request.headers.get("x-recon-token") == "recon-secret"
    assert_json_body(request, {"cursor": {"last_invoice_id": invoice.invoice_id}})
    assert job.reconciled is True


def test_reconcile_empty_recon_token_is_not_sent(api: Twin, server: MockServer) -> None:
    api.payments.crypto.reconcile(recon_token="", cursor="c-1")

    request = last_request(server, "POST", RECONCILE)
    assert "x-recon-token" not in request.headers
    assert_json_body(request, {"cursor": "c-1"})


def test_reconcile_error(api: Twin, server: MockServer) -> None:
    server.inject("POST", RECONCILE, {"status": 403, "code": "FORBIDDEN", "message": "no",
                                      "headers": {"x-request-id": "req_recon_1"}})

    with pytest.raises(CryptoPaymentsError) as caught:
        api.payments.crypto.reconcile(recon_token="wrong")

    assert_service_error(caught.value, CryptoPaymentsError, 403, "FORBIDDEN", "req_recon_1")


# --- standalone construction --------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_standalone_crypto_client_uses_header_builder(server: MockServer, surface: str) -> None:
    token = demo_token(server)
    overrides: List[Optional[str]] = []

    def header_builder(override: Optional[str]) -> Dict[str, str]:
        overrides.append(override)
        return {"X-API-Key": API_KEY, "Authorization": f"Bearer {override or token}"}

    transport_class = RetryAsyncClient if surface == "async" else RetryClient
    transport = transport_class(base_url=server.url)
    try:
        crypto = standalone(surface, "CryptoPaymentsClient", client=transport,
                            header_builder=header_builder)
        invoice = crypto.create_invoice(asset="ETH", network="ethereum", amount="0.5")
        assert isinstance(invoice, CryptoInvoice)
        assert_auth(last_request(server, "POST", INVOICES), token)

        status = crypto.get_invoice_status(invoice.invoice_id)
        assert status.status == "pending"

        # The override reaches the header builder and goes out; SPAPS needs only the API
        # key for crypto invoices, so the call still succeeds.
        fetched = crypto.get_invoice(invoice.invoice_id, access_token_override="override-token")
        assert fetched == invoice
        assert_auth(last_request(server, "GET", f"{INVOICES}/{invoice.invoice_id}"),
                    "override-token")
        assert overrides[-1] == "override-token"
        assert overrides[0] is None

        server.inject("GET", f"{INVOICES}/{invoice.invoice_id}",
                      {"status": 401, "code": "INVALID_APPLICATION", "message": "Invalid API key"})
        with pytest.raises(CryptoPaymentsError) as caught:
            crypto.get_invoice(invoice.invoice_id)
        assert caught.value.status_code == 401
        assert caught.value.error_code == "INVALID_APPLICATION"
    finally:
        transport.close()


# --- webhook signatures (docs/api.md, "verify_crypto_webhook_signature") ------------------

SECRET = "whsec_test_secret"
BODY = b'{"type":"invoice.confirmed","data":{"invoice_id":"inv_1"}}'


def sign(body: bytes, secret: str = SECRET, timestamp: Optional[int] = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def digest_of(header: str) -> str:
    return header.split("v1=", 1)[1]


@pytest.mark.parametrize("body", [BODY, bytearray(BODY), BODY.decode()],
                         ids=["bytes", "bytearray", "str"])
def test_webhook_valid_signature(body: Any) -> None:
    assert verify_crypto_webhook_signature(body=body, signature=sign(BODY), secret=SECRET) is True


def test_webhook_tolerates_spaces_and_uppercase_hex() -> None:
    header = sign(BODY)
    t, v1 = header.split(",")
    assert verify_crypto_webhook_signature(
        body=BODY, signature=f" {t} , v1={digest_of(header).upper()} ", secret=SECRET
    ) is True
    assert v1.startswith("v1=")


def test_webhook_accepts_a_timestamp_inside_the_window() -> None:
    header = sign(BODY, timestamp=int(time.time()) - 100)
    assert verify_crypto_webhook_signature(body=BODY, signature=header, secret=SECRET,
                                           tolerance_seconds=300) is True


def test_webhook_secret_rotation_any_v1_may_match() -> None:
    now = int(time.time())
    good = digest_of(sign(BODY, timestamp=now))
    stale = digest_of(sign(BODY, secret="whsec_old_secret", timestamp=now))

    for header in (f"t={now},v1={stale},v1={good}", f"t={now},v1={good},v1={stale}"):
        assert verify_crypto_webhook_signature(body=BODY, signature=header, secret=SECRET)


REJECTED = {
    "tampered-body": (BODY.replace(b"inv_1", b"inv_2"), lambda now: sign(BODY, timestamp=now)),
    "wrong-secret": (BODY, lambda now: sign(BODY, secret="whsec_other", timestamp=now)),
    "several-v1-none-matching": (
        BODY,
        lambda now: f"t={now},v1={digest_of(sign(BODY, secret='a', timestamp=now))},"
        f"v1={digest_of(sign(BODY, secret='b', timestamp=now))}",
    ),
    "missing-t": (BODY, lambda now: "v1=" + digest_of(sign(BODY, timestamp=now))),
    "missing-v1": (BODY, lambda now: f"t={now}"),
    "empty-header": (BODY, lambda now: ""),
    "garbage-header": (BODY, lambda now: "not a signature"),
    "non-hex-v1": (BODY, lambda now: f"t={now},v1=zz{'0' * 62}"),
    "short-v1": (BODY, lambda now: f"t={now},v1=abcd"),
    "old-timestamp": (BODY, lambda now: sign(BODY, timestamp=now - 3600)),
    "far-future-timestamp": (BODY, lambda now: sign(BODY, timestamp=now + 3600)),
    "non-integer-timestamp": (
        BODY,
        lambda now: "t=soon,v1=" + hmac.new(SECRET.encode(), b"soon." + BODY,
                                            hashlib.sha256).hexdigest(),
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_webhook_rejections_raise_webhook_verification_error(case: str) -> None:
    body, make_header = REJECTED[case]

    with pytest.raises(WebhookVerificationError) as caught:
        verify_crypto_webhook_signature(body=body, signature=make_header(int(time.time())),
                                        secret=SECRET)

    assert isinstance(caught.value, ValueError)  # what the reference helper raised


def test_webhook_parsed_body_is_refused() -> None:
    with pytest.raises(ValueError, match="raw request body"):
        verify_crypto_webhook_signature(body={"type": "invoice.confirmed"},  # type: ignore[arg-type]
                                        signature=sign(BODY), secret=SECRET)


@pytest.mark.parametrize("tolerance", [0, -1])
def test_webhook_replay_protection_cannot_be_disabled(tolerance: int) -> None:
    stale = sign(BODY, timestamp=int(time.time()) - 30 * 86400)

    with pytest.raises(ValueError):
        verify_crypto_webhook_signature(body=BODY, signature=stale, secret=SECRET,
                                        tolerance_seconds=tolerance)
