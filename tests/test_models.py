"""Response models (docs/api.md, "Models"): parsing, dumping, secrecy."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from typing import Any, Dict

import pytest

import spaps_client
from spaps_client import (
    BalanceOverview,
    CryptoInvoice,
    MagicLinkAuthResponse,
    NonceResponse,
    PaymentIntent,
    PaymentMethodUpdateResult,
    RegistrationResponse,
    RegistrationTokens,
    RegistrationUser,
    SessionError,
    SessionListResult,
    SessionRecord,
    SessionSummary,
    SessionValidationResult,
    Settings,
    SpapsClient,
    StoredTokens,
    TokenPair,
    TokenUser,
    UsageFeature,
    UserProfile,
    WalletDeposit,
)
from spaps_mock import MockServer

ACCESS = "at_secret_access_value_123"
REFRESH = "rt_secret_refresh_value_456"

TOKEN_PAIR_JSON: Dict[str, Any] = {
    "access_token": ACCESS,
    "refresh_token": REFRESH,
    "expires_in": 900,
    "token_type": "Bearer",
    "user": {"id": "user_123", "email": "a@example.com", "wallets": ["0xabc"],
             "email_confirmed": True, "favourite_colour": "blue"},
}

SESSION_JSON: Dict[str, Any] = {
    "id": "sess_123",
    "user_id": "user_123",
    "application_id": "app_1",
    "tier": "basic",
    "created_at": "2025-01-01T00:00:00Z",
    "expires_at": "2025-01-31T00:00:00Z",
    "last_activity": "2025-01-01T00:05:00Z",
    "wallets_count": 2,
    "duration_minutes": 600,
    "idle_minutes": 5,
}

UTC = timezone.utc


# --------------------------------------------------------------------------------------------
# model_validate / model_dump
# --------------------------------------------------------------------------------------------


def test_token_pair_validate_with_nested_user() -> None:
    pair = TokenPair.model_validate(TOKEN_PAIR_JSON)
    assert (pair.access_token, pair.refresh_token) == (ACCESS, REFRESH)
    assert pair.expires_in == 900
    assert pair.token_type == "Bearer"
    assert isinstance(pair.user, TokenUser)
    assert pair.user.user_id == "user_123"
    assert pair.user.wallets == ["0xabc"]
    assert pair.user.email_confirmed is True
    assert pair.user.username is None
    # Unknown keys are kept, as the server sent them, and read like attributes.
    assert pair.user.model_extra == {"favourite_colour": "blue"}
    assert pair.user.favourite_colour == "blue"  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        pair.user.favourite_food  # type: ignore[attr-defined]  # noqa: B018


def test_refresh_reply_without_user_parses() -> None:
    pair = TokenPair.model_validate({k: v for k, v in TOKEN_PAIR_JSON.items() if k != "user"})
    assert pair.user is None and pair.access_token == ACCESS
    assert TokenPair.model_validate({**TOKEN_PAIR_JSON, "user": None}).user is None


def test_model_dump_uses_attribute_names_and_nests_dicts() -> None:
    pair = TokenPair.model_validate(TOKEN_PAIR_JSON)
    dumped = pair.model_dump()
    assert dumped["access_token"] == ACCESS
    assert isinstance(dumped["user"], dict)
    assert dumped["user"]["user_id"] == "user_123"
    assert "id" not in dumped["user"]
    assert dumped["user"]["favourite_colour"] == "blue"  # extra keys travel with the model


def test_model_dump_by_alias_uses_json_names() -> None:
    pair = TokenPair.model_validate(TOKEN_PAIR_JSON)
    assert pair.model_dump(by_alias=True)["user"]["id"] == "user_123"
    assert "user_id" not in pair.model_dump(by_alias=True)["user"]
    session = SessionSummary.model_validate(SESSION_JSON)
    by_alias = session.model_dump(by_alias=True)
    assert by_alias["id"] == "sess_123" and "session_id" not in by_alias
    assert session.model_dump()["session_id"] == "sess_123"


@pytest.mark.parametrize("by_alias", [False, True])
def test_dump_validate_round_trip(by_alias: bool) -> None:
    for model, raw in ((TokenPair, TOKEN_PAIR_JSON), (SessionSummary, SESSION_JSON)):
        original = model.model_validate(raw)
        assert model.model_validate(original.model_dump(by_alias=by_alias)) == original


def test_equality_is_field_wise() -> None:
    assert SessionSummary.model_validate(SESSION_JSON) == SessionSummary.model_validate(
        dict(SESSION_JSON))
    assert SessionSummary.model_validate(SESSION_JSON) != SessionSummary.model_validate(
        {**SESSION_JSON, "tier": "pro"})


def test_model_validate_accepts_an_instance() -> None:
    session = SessionSummary.model_validate(SESSION_JSON)
    assert SessionSummary.model_validate(session) is session


@pytest.mark.parametrize("raw", [None, [], "sess_123", 42])
def test_model_validate_rejects_non_objects(raw: Any) -> None:
    with pytest.raises(ValueError):
        SessionSummary.model_validate(raw)


def test_unknown_keys_are_ignored_everywhere() -> None:
    noisy = {**SESSION_JSON, "new_field": {"nested": True}, "another": [1, 2]}
    assert SessionSummary.model_validate(noisy) == SessionSummary.model_validate(SESSION_JSON)
    assert SessionValidationResult.model_validate({"valid": True, "x": 1}).valid is True


# --------------------------------------------------------------------------------------------
# Aliases
# --------------------------------------------------------------------------------------------


def test_session_id_read_from_id_or_attribute_name() -> None:
    assert SessionSummary.model_validate(SESSION_JSON).session_id == "sess_123"
    by_name = {k: v for k, v in SESSION_JSON.items() if k != "id"}
    by_name["session_id"] = "sess_by_name"
    assert SessionSummary.model_validate(by_name).session_id == "sess_by_name"


@pytest.mark.parametrize(
    ("model", "attribute", "extra"),
    [
        (SessionSummary, "session_id", {k: v for k, v in SESSION_JSON.items() if k != "id"}),
        (SessionRecord, "session_id", {"user_id": "u", "application_id": "a",
                                       "created_at": "2025-01-01T00:00:00Z"}),
        (TokenUser, "user_id", {}),
        (CryptoInvoice, "invoice_id", {"asset": "USDC", "network": "base", "amount": "1",
                                       "status": "pending"}),
    ],
)
def test_id_wins_over_attribute_name(model: Any, attribute: str, extra: Dict[str, Any]) -> None:
    parsed = model.model_validate({**extra, attribute: "from_name", "id": "from_id"})
    assert getattr(parsed, attribute) == "from_id"
    parsed = model.model_validate({**extra, "id": "from_id", attribute: "from_name"})
    assert getattr(parsed, attribute) == "from_id"


def test_registration_user_keeps_attribute_id() -> None:
    user = RegistrationUser.model_validate({"id": "user_9", "email": "r@example.com"})
    assert user.id == "user_9"
    assert not hasattr(user, "user_id")
    assert user.model_dump()["id"] == "user_9"


# --------------------------------------------------------------------------------------------
# Datetimes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2025-01-02T03:04:05Z", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2025-01-02T03:04:05.123Z", datetime(2025, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)),
        ("2025-01-02T03:04:05+02:00",
         datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))),
        ("2025-01-02T03:04:05-05:30",
         datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(-timedelta(hours=5, minutes=30)))),
        ("2025-01-02T03:04:05+00:00", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2025-01-02T03:04:05", datetime(2025, 1, 2, 3, 4, 5)),
        ("2025-01-02", datetime(2025, 1, 2)),
        ("2025-01-02 03:04:05", datetime(2025, 1, 2, 3, 4, 5)),
        ("2025-01-02 03:04:05Z", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2025-01-02T03:04:05.123456789Z",
         datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2025-01-02T03:04:05.9999999+01:00",
         datetime(2025, 1, 2, 3, 4, 5, 999999, tzinfo=timezone(timedelta(hours=1)))),
        (1735787045, datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (1735787045.5, datetime(2025, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
        ("1735787045", datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("1735787045.25", datetime(2025, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)),
    ],
)
def test_datetime_parsing(raw: Any, expected: datetime) -> None:
    parsed = SessionValidationResult.model_validate({"valid": True, "expires_at": raw})
    assert parsed.expires_at == expected
    assert parsed.expires_at is not None
    # Equal is not enough: naive must stay naive and offsets must be kept.
    assert parsed.expires_at.utcoffset() == expected.utcoffset()
    assert (parsed.expires_at.tzinfo is None) == (expected.tzinfo is None)


def test_datetime_from_real_shaped_payloads() -> None:
    session = SessionSummary.model_validate(SESSION_JSON)
    assert session.created_at == datetime(2025, 1, 1, tzinfo=UTC)
    assert session.created_at.tzinfo is not None
    nonce = NonceResponse.model_validate({"nonce": "n", "message": "m", "wallet_address": "w",
                                          "expires_at": "2025-06-01T12:00:00.000Z"})
    assert nonce.expires_at == datetime(2025, 6, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    "raw", ["yesterday", "2025-13-01T00:00:00Z", "2025-01-32", "01/02/2025", "", True, [], {}],
)
def test_datetime_rejections(raw: Any) -> None:
    with pytest.raises(ValueError, match="created_at"):  # a required field
        SessionSummary.model_validate({**SESSION_JSON, "created_at": raw})
    # An optional field the server shaped differently takes its default; the value is kept.
    parsed = SessionValidationResult.model_validate({"valid": True, "expires_at": raw})
    assert parsed.expires_at is None
    assert parsed.model_extra == {"expires_at": raw}


@pytest.mark.parametrize("raw", [1e20, 10**30])
def test_out_of_range_epoch_is_value_error(raw: Any) -> None:
    with pytest.raises(ValueError, match="created_at"):
        SessionSummary.model_validate({**SESSION_JSON, "created_at": raw})
    assert SessionValidationResult.model_validate({"valid": True, "expires_at": raw}
                                                  ).expires_at is None


def test_out_of_range_epoch_in_a_response_is_a_spaps_error(server: MockServer,
                                                           signed_in: SpapsClient) -> None:
    server.inject("GET", "/api/sessions/current", {
        "raw_body": '{"success":true,"data":{"session":{"id":"s","user_id":"u",'
                    '"application_id":"a","created_at":1e20,"expires_at":1}}}',
        "content_type": "application/json",
    })
    with pytest.raises(SessionError) as caught:
        signed_in.sessions.get_current_session()
    assert caught.value.status_code == 200
    assert caught.value.error_code == "INVALID_RESPONSE"


def test_malformed_optional_datetime_in_a_response_does_not_fail_the_call(
        server: MockServer, signed_in: SpapsClient) -> None:
    server.inject("POST", "/api/sessions/validate", {
        "raw_body": '{"success":true,"data":{"valid":true,"expires_at":"not a date"}}',
        "content_type": "application/json",
    })
    result = signed_in.sessions.validate_session()
    assert result.valid is True and result.expires_at is None
    assert result.model_extra["expires_at"] == "not a date"


# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [(900, 900), (900.0, 900), ("900", 900),
                                               (" 12 ", 12), (0, 0)])
def test_int_coercions(raw: Any, expected: int) -> None:
    value = TokenPair.model_validate({**TOKEN_PAIR_JSON, "expires_in": raw}).expires_in
    assert value == expected and type(value) is int


@pytest.mark.parametrize("raw", [12.5, "12.5", "abc", "", None, [], {}])
def test_int_rejections(raw: Any) -> None:
    with pytest.raises(ValueError, match="expires_in"):
        TokenPair.model_validate({**TOKEN_PAIR_JSON, "expires_in": raw})


@pytest.mark.parametrize(("raw", "expected"), [(8500, 8500.0), (2.5, 2.5), ("2.5", 2.5),
                                               ("10", 10.0)])
def test_float_coercions(raw: Any, expected: float) -> None:
    value = WalletDeposit.model_validate({"deposit_id": "d", "amount": raw}).amount
    assert value == expected and type(value) is float


@pytest.mark.parametrize("raw", ["ten", "", [], {}])
def test_float_rejections(raw: Any) -> None:
    with pytest.raises(ValueError, match="available"):
        BalanceOverview.model_validate({"balance": {"available": raw, "pending": 0,
                                                    "currency": "USD"}})
    deposit = WalletDeposit.model_validate({"deposit_id": "d", "amount": raw})
    assert deposit.amount is None  # optional: the default, never a failed call


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("false", False),
     ("yes", True), ("no", False), ("1", True), ("0", False), ("TRUE", True)],
)
def test_bool_coercions(raw: Any, expected: bool) -> None:
    value = SessionValidationResult.model_validate({"valid": raw}).valid
    assert value is expected


@pytest.mark.parametrize("raw", [2, -1, "maybe", "", 0.5, [], {}])
def test_bool_rejections(raw: Any) -> None:
    with pytest.raises(ValueError, match="valid"):
        SessionValidationResult.model_validate({"valid": raw})


def test_str_attribute_accepts_numbers_as_text() -> None:
    # Deliberate difference from the reference (docs/compatibility.md): an id or amount the
    # server sends as a JSON number is kept as its text instead of failing a call that
    # already took effect server-side. Booleans and objects are still rejected.
    invoice = CryptoInvoice.model_validate({"id": 7, "asset": "USDC", "network": "base",
                                            "amount": 10, "status": "pending"})
    assert (invoice.invoice_id, invoice.amount) == ("7", "10")
    for bad in (True, {"v": 1}, [1]):
        with pytest.raises(ValueError, match="amount"):
            CryptoInvoice.model_validate({"id": "inv", "asset": "USDC", "network": "base",
                                          "amount": bad, "status": "pending"})


def test_list_and_object_attributes_check_their_shape() -> None:
    user = TokenUser.model_validate({"id": "u", "wallets": "0xabc"})
    assert user.wallets is None and user.model_extra == {"wallets": "0xabc"}
    profile = UserProfile.model_validate({"id": "u", "metadata": ["not", "an", "object"]})
    assert profile.metadata is None and profile.model_extra["metadata"] == ["not", "an", "object"]
    assert UserProfile.model_validate({"id": "u", "wallets": None}).wallets == []
    profile = UserProfile.model_validate({"id": "u", "wallets": [{"wallet_address": "0x1"}]})
    assert profile.wallets[0].wallet_address == "0x1"
    assert profile.wallets[0].verified is None


# --------------------------------------------------------------------------------------------
# Required and optional
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["id", "user_id", "application_id", "created_at",
                                     "expires_at"])
def test_required_missing_is_value_error(missing: str) -> None:
    raw = {k: v for k, v in SESSION_JSON.items() if k != missing}
    name = "session_id" if missing == "id" else missing
    with pytest.raises(ValueError, match=name):
        SessionSummary.model_validate(raw)


@pytest.mark.parametrize("field_name", ["access_token", "refresh_token", "expires_in"])
def test_token_pair_required_fields(field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        TokenPair.model_validate({k: v for k, v in TOKEN_PAIR_JSON.items() if k != field_name})
    with pytest.raises(ValueError, match=field_name):
        TokenPair.model_validate({**TOKEN_PAIR_JSON, field_name: None})


def test_null_for_required_nested_object_is_value_error() -> None:
    overview = BalanceOverview.model_validate({"balance": {"available": 1, "pending": 0,
                                                           "currency": "USD"}, "usage": None})
    assert overview.usage.credits_used is None  # optional: null gives the default object
    with pytest.raises(ValueError, match="balance"):
        BalanceOverview.model_validate({"usage": {}})
    with pytest.raises(ValueError, match="balance"):
        BalanceOverview.model_validate({"balance": None})


def test_optional_fields_default_to_none() -> None:
    result = SessionValidationResult.model_validate({"valid": False, "session_id": None})
    assert result == SessionValidationResult(valid=False)
    assert (result.session_id, result.expires_at, result.renewed) == (None, None, None)
    feature = UsageFeature.model_validate({"name": "api_calls"})
    assert feature.used is None and feature.limit is None


def test_session_list_defaults() -> None:
    record = {"id": "s1", "user_id": "u", "application_id": "a",
              "created_at": "2025-01-01T00:00:00Z"}
    assert SessionListResult.model_validate({}).sessions == []
    assert SessionListResult.model_validate({}).total == 0
    assert SessionListResult.model_validate({"sessions": None}).sessions == []
    listing = SessionListResult.model_validate({"sessions": [record, {**record, "id": "s2"}]})
    assert listing.total == 2
    assert [s.session_id for s in listing.sessions] == ["s1", "s2"]
    assert SessionListResult.model_validate({"sessions": [record], "total": None}).total == 1


def test_payment_method_update_is_default_false_when_missing() -> None:
    result = PaymentMethodUpdateResult.model_validate({"payment_method_id": "pm_1"})
    assert result.is_default is False


# --------------------------------------------------------------------------------------------
# Dataclasses and secrecy
# --------------------------------------------------------------------------------------------


def test_models_are_dataclasses_with_the_reference_attributes() -> None:
    names = [name for name in spaps_client.__all__ if isinstance(getattr(spaps_client, name),
                                                                 type)]
    models = [getattr(spaps_client, name) for name in names
              if hasattr(getattr(spaps_client, name), "model_validate")]
    assert len(models) >= 40
    for model in models:
        assert dataclasses.is_dataclass(model), model
    assert {f.name for f in dataclasses.fields(SessionSummary)} == {
        "session_id", "user_id", "application_id", "tier", "created_at", "expires_at",
        "last_activity", "wallets_count", "duration_minutes", "idle_minutes"}
    assert {f.name for f in dataclasses.fields(TokenPair)} == {
        "access_token", "refresh_token", "expires_in", "token_type", "user",
        "mfa_method", "recovery_codes_remaining"}  # the last two after an MFA sign-in
    assert {f.name for f in dataclasses.fields(StoredTokens)} == {
        "access_token", "refresh_token", "expires_at", "token_type"}
    assert dataclasses.is_dataclass(StoredTokens) and dataclasses.is_dataclass(Settings)


def test_token_pair_repr_hides_tokens() -> None:
    pair = TokenPair.model_validate(TOKEN_PAIR_JSON)
    for text in (repr(pair), str(pair)):
        assert ACCESS not in text and REFRESH not in text
        assert "user_123" in text  # the rest is still useful for debugging


def test_registration_tokens_repr_hides_tokens() -> None:
    tokens = {"access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 60}
    user = {"id": "user_1"}
    for value in (
        RegistrationTokens.model_validate(tokens),
        RegistrationResponse.model_validate({"user": user, "tokens": tokens}),
        MagicLinkAuthResponse.model_validate({"user": user, "tokens": tokens}),
    ):
        assert ACCESS not in repr(value) and REFRESH not in repr(value)


def test_stored_tokens_repr_hides_tokens() -> None:
    stored = StoredTokens(access_token=ACCESS, refresh_token=REFRESH,
                          expires_at=datetime(2030, 1, 1, tzinfo=UTC), token_type="Bearer")
    assert ACCESS not in repr(stored) and REFRESH not in repr(stored)
    assert "2030" in repr(stored)
    # Hidden from repr, still compared.
    assert stored != StoredTokens(access_token="other", refresh_token=REFRESH,
                                  expires_at=stored.expires_at, token_type="Bearer")


def test_settings_repr_hides_api_key() -> None:
    settings = Settings(base_url="https://spaps.example.com", api_key="sk_live_very_secret",
                        request_timeout=3)
    assert "sk_live_very_secret" not in repr(settings)
    assert "https://spaps.example.com" in repr(settings)
    assert settings.api_key == "sk_live_very_secret"


def test_client_repr_hides_api_key() -> None:
    with SpapsClient(base_url="https://spaps.example.com", api_key="sk_live_very_secret") as c:
        assert "sk_live_very_secret" not in repr(c)
        assert "sk_live_very_secret" not in repr(c.settings)


def test_payment_intent_repr_hides_client_secret() -> None:
    intent = PaymentIntent.model_validate({"payment_intent_id": "pi_1",
                                           "client_secret": "pi_1_secret_abcdef",
                                           "status": "requires_payment_method"})
    assert intent.client_secret == "pi_1_secret_abcdef"
    assert "pi_1_secret_abcdef" not in repr(intent)
    assert "pi_1" in repr(intent)
