"""Secure messages (docs/api.md, "Secure messages"), sync and async: camelCase requests,
snake_case models."""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime
from typing import Iterator

import pytest
from conftest import API_KEY, DEMO_EMAIL, is_uuid, user_id_of
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

from spaps_client import SecureMessage, SecureMessagesError, SpapsClient
from spaps_mock import ADMIN_EMAIL, ADMIN_PASSWORD, ADMIN_USER_ID, APPLICATION_ID, MockServer

MESSAGES = "/api/secure-messages"


DOCTOR_EMAIL = "doctor@example.com"


def add_member(server: MockServer, user_id: str) -> None:
    """Make ``user_id`` a member of the application, as an admin does (SPAPS lets only
    members take part in secure messages)."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as admin:
        token = admin.auth.sign_in_with_password(email=ADMIN_EMAIL,
                                                 password=ADMIN_PASSWORD).access_token
    request = urllib.request.Request(
        server.url + "/api/users/memberships", data=json.dumps({"user_id": user_id}).encode(),
        method="POST", headers={"X-API-Key": API_KEY, "Authorization": "Bearer " + token,
                                "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 201


@pytest.fixture
def doctor(server: MockServer) -> str:
    """The id of a second user, a member of the application."""
    user_id = str(server.add_user(DOCTOR_EMAIL, "Doctor-Password-1")["id"])
    add_member(server, user_id)
    return user_id


@pytest.fixture
def patient(server: MockServer) -> str:
    """The demo user's id, made a member of the application."""
    with SpapsClient(base_url=server.url, api_key=API_KEY) as demo:
        demo.auth.sign_in_with_password(email=DEMO_EMAIL, password="demo-password")
        user_id = user_id_of(demo)
    add_member(server, user_id)
    return user_id


@pytest.fixture(params=SURFACES)
def api(request: pytest.FixtureRequest, server: MockServer, patient: str,
        doctor: str) -> Iterator[Twin]:
    """The demo user (the patient), signed in, with a doctor to write to."""
    with aggregate(server, request.param) as twin:
        yield twin



def test_create_sends_camel_case_and_returns_snake_case_model(
    api: Twin, server: MockServer, patient: str, doctor: str
) -> None:
    message = api.secure_messages.create_message(
        patient_id=patient, practitioner_id=doctor, content="Hello, doctor"
    )

    request = last_request(server, "POST", MESSAGES)
    assert request.raw_query == ""
    assert_auth(request, access_token(api))
    assert_json_body(request, {"patientId": patient, "practitionerId": doctor,
                               "content": "Hello, doctor"})
    assert isinstance(message, SecureMessage)
    assert is_uuid(message.id)
    assert message.patient_id == patient
    assert message.practitioner_id == doctor
    assert message.content == "Hello, doctor"
    assert message.application_id == APPLICATION_ID
    assert message.metadata == {}
    assert isinstance(message.created_at, str)
    assert datetime.fromisoformat(message.created_at).tzinfo is not None


@pytest.mark.parametrize("metadata", [{}, {"priority": "high"}], ids=["empty", "filled"])
def test_create_sends_metadata_when_not_none(
    api: Twin, server: MockServer, metadata: dict, patient: str, doctor: str
) -> None:
    message = api.secure_messages.create_message(
        patient_id=patient, practitioner_id=doctor, content="x", metadata=metadata
    )

    assert last_request(server, "POST", MESSAGES).json["metadata"] == metadata
    assert message.metadata == metadata


def test_create_omits_metadata_when_none(api: Twin, server: MockServer, patient: str,
                                         doctor: str) -> None:
    api.secure_messages.create_message(patient_id=patient, practitioner_id=doctor,
                                       content="x")
    assert "metadata" not in last_request(server, "POST", MESSAGES).json


def test_create_error(api: Twin, server: MockServer) -> None:
    tag_request_id(server, "POST", MESSAGES)

    with pytest.raises(SecureMessagesError) as caught:
        api.secure_messages.create_message(patient_id="p", practitioner_id="d", content="")

    assert_service_error(caught.value, SecureMessagesError, 400, "VALIDATION_ERROR")
    assert "UUID" in str(caught.value)


def test_create_with_a_participant_who_is_no_member(api: Twin, server: MockServer,
                                                    patient: str) -> None:
    outsider = str(server.add_user("outsider@example.com", "Outsider-Pass-1")["id"])
    tag_request_id(server, "POST", MESSAGES)

    with pytest.raises(SecureMessagesError) as caught:
        api.secure_messages.create_message(patient_id=patient, practitioner_id=outsider,
                                           content="hi")

    assert_service_error(caught.value, SecureMessagesError, 403,
                         "SECURE_MESSAGES_FORBIDDEN_PARTICIPANT")
    assert api.secure_messages.list_messages() == []


def test_create_between_others_is_refused(api: Twin, server: MockServer, doctor: str) -> None:
    other = str(server.add_user("other@example.com", "Other-Pass-1")["id"])
    add_member(server, other)
    tag_request_id(server, "POST", MESSAGES)

    with pytest.raises(SecureMessagesError) as caught:
        api.secure_messages.create_message(patient_id=other, practitioner_id=doctor,
                                           content="not mine to send")

    assert_service_error(caught.value, SecureMessagesError, 403,
                         "SECURE_MESSAGES_FORBIDDEN_PARTICIPANT")


def test_list_returns_what_was_created_in_order(api: Twin, server: MockServer, patient: str,
                                                doctor: str) -> None:
    assert api.secure_messages.list_messages() == []

    created = [
        api.secure_messages.create_message(patient_id=patient, practitioner_id=doctor,
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


def test_list_shows_a_user_only_their_own_messages(api: Twin, server: MockServer,
                                                   patient: str, doctor: str) -> None:
    mine = api.secure_messages.create_message(patient_id=patient, practitioner_id=doctor,
                                              content="mine")
    other = str(server.add_user("other@example.com", "Other-Pass-1")["id"])
    add_member(server, other)
    with SpapsClient(base_url=server.url, api_key=API_KEY) as admin:
        admin.auth.sign_in_with_password(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        # An admin may write between any two members, and sees every message.
        theirs = admin.secure_messages.create_message(patient_id=other, practitioner_id=doctor,
                                                      content="theirs")
        assert [m.id for m in admin.secure_messages.list_messages()] == [mine.id, theirs.id]
        assert ADMIN_USER_ID not in (theirs.patient_id, theirs.practitioner_id)

    assert [m.id for m in api.secure_messages.list_messages()] == [mine.id]


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
def test_standalone_secure_messages_client(server: MockServer, surface: str, patient: str,
                                           doctor: str) -> None:
    token = demo_token(server)
    client = standalone(surface, "SecureMessagesClient", base_url=server.url, api_key=API_KEY,
                        access_token=token)
    try:
        message = client.create_message(patient_id=patient, practitioner_id=doctor,
                                        content="hi")
        assert_auth(last_request(server, "POST", MESSAGES), token)
        assert client.list_messages() == [message]
        assert_auth(last_request(server, "GET", MESSAGES), token)
    finally:
        close(client)


def test_sync_client_without_token_sends_the_request_without_bearer(server: MockServer) -> None:
    """Without a token the request goes out with no ``Authorization`` header (docs/api.md,
    "Secure messages")."""
    client = standalone("sync", "SecureMessagesClient", base_url=server.url, api_key=API_KEY)
    try:
        with pytest.raises(SecureMessagesError) as caught:
            client.list_messages()
    finally:
        close(client)

    assert_auth(last_request(server, "GET", MESSAGES), None)
    assert caught.value.status_code == 401
    assert caught.value.error_code == "UNAUTHORIZED"
