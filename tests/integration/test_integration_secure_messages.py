"""Secure messages against the real SPAPS, sync and async, between two registered users that
the admin made members of the application."""

from __future__ import annotations

import uuid

import pytest
from _realsupport import Flavor, RawApi

pytestmark = pytest.mark.realserver


def test_create_and_list_messages(flavor: Flavor, raw: RawApi) -> None:
    patient, practitioner = raw.register_user("patient"), raw.register_user("practitioner")
    raw.add_member(patient.id)
    raw.add_member(practitioner.id)
    content = f"Results are attached ({uuid.uuid4().hex[:8]})."

    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, patient.email, patient.password)
        sent = await c(spaps.secure_messages.create_message(
            patient_id=patient.id, practitioner_id=practitioner.id, content=content,
            metadata={"priority": "normal"}))
        assert sent.id
        assert sent.patient_id == patient.id
        assert sent.practitioner_id == practitioner.id
        assert sent.content == content
        assert sent.metadata == {"priority": "normal"}
        assert content not in repr(sent)

        mine = {message.id: message for message in await c(spaps.secure_messages.list_messages())}
        assert sent.id in mine
        assert mine[sent.id].content == content
        assert mine[sent.id].practitioner_id == practitioner.id

        # The other participant sees it too.
        other = c.client()
        await c.sign_in(other, practitioner.email, practitioner.password)
        theirs = {message.id for message in await c(other.secure_messages.list_messages())}
        assert sent.id in theirs

    flavor.run(flow)
