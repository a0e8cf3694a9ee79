"""Secure messages (contract 2.6), sync and async: camelCase requests, snake_case models."""

from __future__ import annotations

from typing import Iterator

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
    close,
    demo_token,
    last_request,
    standalone,
    tag_request_id,
)

from spaps_client import SecureMessage, SecureMessagesError
from spaps_mock import MockServer

MESSAGES = "/api/secure-messages"


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer) -> Iterator[Twin]:
    with aggregate(server, request.param) as twin:
        yield twin


def test_create_sends_camel_case_and_returns_snake_case_model(
    api: Twin, server: MockServer
) -> None:
    message = api.secure_messages.create_message(
        patient_id="patient-1", practitioner_id="practitioner-1", content="Hello, doctor"
    )

    request = last_request(server, "POST", MESSAGES)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_json_body(request, {"patientId": "patient-1", "practitionerId": "practitioner-1",
                               "content": "Hello, doctor"})
    assert isinstance(message, SecureMessage)
    assert message.id.startswith("msg-")
    assert message.patient_id == "patient-1"
    assert message.practitioner_id == "practitioner-1"
    assert message.content == "Hello, doctor"
    assert message.application_id == "app_mock"
    assert message.metadata == {}
    assert isinstance(message.created_at, str) and message.created_at.endswith("Z")


@pytest.mark.parametrize("metadata", [{}, {"priority": "high"}], ids=["empty", "filled"])
def test_create_sends_metadata_when_not_none(
    api: Twin, server: MockServer, metadata: dict
) -> None:
    message = api.secure_messages.create_message(
        patient_id="p", practitioner_id="d", content="x", metadata=metadata
    )

    assert last_request(server, "POST", MESSAGES).json["metadata"] == metadata
    assert message.metadata == metadata


def test_create_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", MESSAGES)

    with pytest.raises(SecureMessagesError) as caught:
        api.secure_messages.create_message(patient_id="p", practitioner_id="d", content="")

    assert_service_error(caught.value, SecureMessagesError, 400, "VALIDATION_ERROR")


def test_list_returns_what_was_created_in_order(api: Twin, server: MockServer) -> None:
    assert api.secure_messages.list_messages() == []

    created = [
        api.secure_messages.create_message(patient_id=f"patient-{n}",
                                           practitioner_id="practitioner-1",
                                           content=f"message {n}", metadata={"n": n})
        for n in range(3)
    ]

    listed = api.secure_messages.list_messages()

    request = last_request(server, "GET", MESSAGES)
    assert_auth(request, access_token(api))
    assert_no_body(request)
    assert isinstance(listed, list)
    assert all(isinstance(message, SecureMessage) for message in listed)
    assert [message.id for message in listed] == [message.id for message in created]
    assert listed == created
    assert [message.metadata for message in listed] == [{"n": 0}, {"n": 1}, {"n": 2}]


def test_list_error(api: Twin, server: MockServer) -> None:
    server.inject("GET", MESSAGES, {"status": 403, "code": "SECURE_MESSAGE_LIST_FAILED",
                                    "message": "nope",
                                    "headers": {"x-request-id": "req_messages_1"}})

    with pytest.raises(SecureMessagesError) as caught:
        api.secure_messages.list_messages()

    assert_service_error(caught.value, SecureMessagesError, 403, "SECURE_MESSAGE_LIST_FAILED",
                         "req_messages_1")
    assert str(caught.value) == "nope"


@pytest.mark.parametrize("surface", SURFACES)
def test_secure_messages_need_sign_in_on_the_aggregate(server: MockServer, surface: str) -> None:
    with aggregate(server, surface, sign_in=False) as client, pytest.raises(ValueError):
        client.secure_messages  # noqa: B018 - the property itself refuses

    assert server.requests == []


@pytest.mark.parametrize("surface", SURFACES)
def test_standalone_secure_messages_client(server: MockServer, surface: str) -> None:
    token = demo_token(server)
    client = standalone(surface, "SecureMessagesClient", base_url=server.url, api_key=API_KEY,
                        access_token=token)
    try:
        message = client.create_message(patient_id="p1", practitioner_id="d1", content="hi")
        assert_auth(last_request(server, "POST", MESSAGES), token)
        assert client.list_messages() == [message]
        assert_auth(last_request(server, "GET", MESSAGES), token)
    finally:
        close(client)


def test_sync_client_without_token_sends_the_request_without_bearer(server: MockServer) -> None:
    """Contract 1.3: sync secure messages send ``Authorization`` only when a token exists."""
    client = standalone("sync", "SecureMessagesClient", base_url=server.url, api_key=API_KEY)
    try:
        with pytest.raises(SecureMessagesError) as caught:
            client.list_messages()
    finally:
        close(client)

    assert_auth(last_request(server, "GET", MESSAGES), None)
    assert caught.value.status_code == 401
    assert caught.value.error_code == "UNAUTHORIZED"
