"""Usage metering against the real SPAPS, sync and async, after the admin granted an entitlement
for feature ``api_calls`` with usage limit dimension ``requests``."""

from __future__ import annotations

import pytest
from _realsupport import Flavor, RawApi

pytestmark = pytest.mark.realserver


def _feature_key(feature: object) -> object:
    return getattr(feature, "name", None) or getattr(feature, "feature_key", None)


def test_features_record_and_history(flavor: Flavor, raw: RawApi) -> None:
    metered = raw.register_user("usage")
    raw.grant_usage(metered.id, feature="api_calls", dimension="requests", limit=1000)

    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, metered.email, metered.password)

        features = await c(spaps.usage.get_features())
        keys = [_feature_key(feature) for feature in features.features]
        assert "api_calls" in keys

        recorded = await c(spaps.usage.record_usage(feature="api_calls", quantity=1))
        event_id = getattr(recorded, "record_id", None) or getattr(recorded, "event_id", None)
        assert isinstance(event_id, str) and event_id
        assert recorded.feature == "api_calls"

        again = await c(spaps.usage.record_usage(feature="api_calls", quantity=1))
        assert again.record_id != event_id  # a new use is a new event

        history = await c(spaps.usage.get_history())
        events = getattr(history, "events", None)
        if events is not None:
            ids = {getattr(event, "event_id", None) for event in events}
        else:  # a server that answers with a per-day history
            ids = set()
        assert event_id in ids or event_id in repr(history.model_dump())
        assert again.record_id in ids or again.record_id in repr(history.model_dump())

    flavor.run(flow)
