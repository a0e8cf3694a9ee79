"""TOTP MFA against the emulator, sync and async: enrol, activate, the sign-in challenge,
verification with a computed TOTP code or a recovery code, secrets kept out of repr/str, disable.

The emulator runs on a fake clock (``MockServer(clock=...)``), so codes are computed with
``spaps_mock.totp_code`` for exact instants and nothing waits on the wall clock.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Iterator

import pytest
from conftest import API_KEY
from service_twin import SURFACES, Twin, aggregate, assert_json_body, last_request

from spaps_client import (
    AuthError,
    AuthMethods,
    MessageResponse,
    MfaRequiredError,
    SessionContext,
    TokenPair,
    TotpActivation,
    TotpEnrollment,
)
from spaps_mock import MockServer, totp_code

EMAIL = "mfa-user@example.com"
PASSWORD = "Mfa-Password-1"
STEP = 30.0


class Clock:
    """A settable ``time.time`` for the emulator."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def mfa_server(clock: Clock) -> Iterator[MockServer]:
    with MockServer(clock=clock) as server:
        server.add_user(EMAIL, PASSWORD)
        yield server




@pytest.fixture(params=SURFACES)
def user(request: pytest.FixtureRequest, mfa_server: MockServer) -> Iterator[Twin]:
    with aggregate(mfa_server, request.param, sign_in=False) as twin:
        twin.auth.sign_in_with_password(email=EMAIL, password=PASSWORD)
        yield twin


@pytest.fixture
def other(request: pytest.FixtureRequest, mfa_server: MockServer, user: Twin) -> Iterator[Twin]:
    """A second, signed-out client on the same surface as ``user``."""
    surface = "async" if user._is_async else "sync"
    with aggregate(mfa_server, surface, sign_in=False) as twin:
        yield twin


def enable_totp(user: Twin, clock: Clock) -> tuple[str, list[str]]:
    """Enrol and activate with the current step's code; returns (secret, recovery codes)."""
    enrollment = user.auth.enroll_totp()
    activation = user.auth.activate_totp(code=totp_code(enrollment.secret, clock()))
    return enrollment.secret, list(activation.recovery_codes)


def challenge_of(client: Twin) -> MfaRequiredError:
    with pytest.raises(MfaRequiredError) as caught:
        client.auth.sign_in_with_password(email=EMAIL, password=PASSWORD)
    return caught.value


# --- enrolment and activation ---------------------------------------------------------------


def test_enroll_gives_a_base32_secret_and_a_provisioning_uri(
    user: Twin, mfa_server: MockServer
) -> None:
    enrollment = user.auth.enroll_totp()

    assert_json_body(last_request(mfa_server, "POST", "/api/auth/mfa/totp/enroll"), {})
    assert isinstance(enrollment, TotpEnrollment)
    assert len(base64.b32decode(enrollment.secret)) == 20
    assert enrollment.provisioning_uri.startswith("otpauth://totp/")
    assert f"secret={enrollment.secret}" in enrollment.provisioning_uri
    assert enrollment.account_name == EMAIL
    assert enrollment.issuer
    # Enrolling changes nothing until activation: sign-in still gives tokens.
    assert user.auth.get_session_context().mfa_enrolled is False


def test_activate_returns_ten_recovery_codes_and_enrols(
    user: Twin, mfa_server: MockServer, clock: Clock
) -> None:
    enrollment = user.auth.enroll_totp()
    code = totp_code(enrollment.secret, clock())

    activation = user.auth.activate_totp(code=code)

    assert_json_body(last_request(mfa_server, "POST", "/api/auth/mfa/totp/activate"),
                     {"code": code})
    assert isinstance(activation, TotpActivation)
    assert len(activation.recovery_codes) == 10
    assert len(set(activation.recovery_codes)) == 10
    assert isinstance(activation.activated_at, datetime)
    context = user.auth.get_session_context()
    assert isinstance(context, SessionContext)
    assert context.mfa_enrolled is True
    assert context.user.email == EMAIL


def test_activate_with_a_wrong_code_is_refused_and_can_be_retried(
    user: Twin, clock: Clock
) -> None:
    enrollment = user.auth.enroll_totp()
    right = totp_code(enrollment.secret, clock())
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"

    with pytest.raises(AuthError) as caught:
        user.auth.activate_totp(code=wrong)

    assert (caught.value.status_code, caught.value.error_code) == (401, "INVALID_CREDENTIALS")
    assert user.auth.get_session_context().mfa_enrolled is False
    assert len(user.auth.activate_totp(code=right).recovery_codes) == 10


def test_activate_without_enrolment_is_a_validation_error(user: Twin) -> None:
    with pytest.raises(AuthError) as caught:
        user.auth.activate_totp(code="123456")

    assert (caught.value.status_code, caught.value.error_code) == (400, "VALIDATION_ERROR")


# --- sign-in with a second factor -------------------------------------------------------------


def test_sign_in_raises_mfa_required_with_the_challenge(
    user: Twin, other: Twin, mfa_server: MockServer, clock: Clock
) -> None:
    enable_totp(user, clock)

    error = challenge_of(other)

    assert isinstance(error, AuthError)
    assert error.error_code == "MFA_REQUIRED"
    assert error.challenge_id and error.challenge
    assert error.methods == ["totp", "recovery_code"]
    assert error.expires_at is not None
    assert datetime.fromisoformat(error.expires_at).timestamp() == clock() + 300
    assert other.get_tokens() is None


def test_verify_with_the_next_steps_code_stores_tokens(
    user: Twin, other: Twin, mfa_server: MockServer, clock: Clock
) -> None:
    secret, _ = enable_totp(user, clock)
    error = challenge_of(other)
    clock.advance(STEP)
    code = totp_code(secret, clock())

    pair = other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                                 code=code)

    assert_json_body(last_request(mfa_server, "POST", "/api/auth/mfa/verify"),
                     {"challenge_id": error.challenge_id, "challenge": error.challenge,
                      "code": code})
    assert isinstance(pair, TokenPair)
    assert pair.mfa_method == "totp"
    assert pair.recovery_codes_remaining is None
    tokens = other.get_tokens()
    assert tokens is not None and tokens.access_token == pair.access_token
    assert tokens.refresh_token == pair.refresh_token
    assert other.auth.get_current_user().email == EMAIL


def test_the_activation_code_cannot_be_reused_in_its_step(
    user: Twin, other: Twin, clock: Clock
) -> None:
    enrollment = user.auth.enroll_totp()
    activation_code = totp_code(enrollment.secret, clock())
    user.auth.activate_totp(code=activation_code)
    error = challenge_of(other)

    with pytest.raises(AuthError) as caught:
        other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                              code=activation_code)

    assert (caught.value.status_code, caught.value.error_code) == (401, "INVALID_CREDENTIALS")
    # the next step's code (accepted within the ±1 step window) still works
    pair = other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                                 code=totp_code(enrollment.secret, clock() + STEP))
    assert pair.mfa_method == "totp"


def test_a_wrong_code_is_refused_and_the_challenge_stays_usable(
    user: Twin, other: Twin, clock: Clock
) -> None:
    secret, _ = enable_totp(user, clock)
    error = challenge_of(other)
    clock.advance(STEP)
    right = totp_code(secret, clock())
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"

    with pytest.raises(AuthError) as caught:
        other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                              code=wrong)

    assert type(caught.value) is AuthError
    assert (caught.value.status_code, caught.value.error_code) == (401, "INVALID_CREDENTIALS")
    assert str(caught.value) == "Invalid authenticator code"
    assert other.get_tokens() is None
    pair = other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                                 code=right)
    assert other.get_tokens() is not None and pair.access_token


def test_codes_outside_one_step_of_drift_are_refused(
    user: Twin, other: Twin, clock: Clock
) -> None:
    secret, _ = enable_totp(user, clock)
    error = challenge_of(other)
    clock.advance(5 * STEP)

    for at in (clock() + 2 * STEP, clock() - 2 * STEP):
        with pytest.raises(AuthError):
            other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                                  code=totp_code(secret, at))
    # a code one step early (clock skew) is accepted
    assert other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                                 code=totp_code(secret, clock() - STEP)).access_token


def test_a_challenge_works_once(user: Twin, other: Twin, clock: Clock) -> None:
    secret, _ = enable_totp(user, clock)
    error = challenge_of(other)
    clock.advance(STEP)
    other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                          code=totp_code(secret, clock()))
    clock.advance(STEP)

    with pytest.raises(AuthError) as caught:
        other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                              code=totp_code(secret, clock()))

    assert (caught.value.status_code, caught.value.error_code) == (400, "VALIDATION_ERROR")


def test_an_expired_challenge_is_refused(user: Twin, other: Twin, clock: Clock) -> None:
    secret, _ = enable_totp(user, clock)
    error = challenge_of(other)
    clock.advance(301)

    with pytest.raises(AuthError) as caught:
        other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                              code=totp_code(secret, clock()))

    assert (caught.value.status_code, caught.value.error_code) == (400, "VALIDATION_ERROR")
    assert other.get_tokens() is None


def test_a_recovery_code_signs_in_once(user: Twin, other: Twin, clock: Clock) -> None:
    _, codes = enable_totp(user, clock)
    error = challenge_of(other)

    pair = other.auth.verify_mfa(challenge_id=error.challenge_id, challenge=error.challenge,
                                 recovery_code=codes[0])

    assert pair.mfa_method == "recovery_code"
    assert pair.recovery_codes_remaining == 9
    assert other.get_tokens() is not None
    again = challenge_of(other)
    with pytest.raises(AuthError) as caught:
        other.auth.verify_mfa(challenge_id=again.challenge_id, challenge=again.challenge,
                              recovery_code=codes[0])
    assert (caught.value.status_code, caught.value.error_code) == (401, "INVALID_CREDENTIALS")
    assert other.auth.verify_mfa(challenge_id=again.challenge_id, challenge=again.challenge,
                                 recovery_code=codes[1]).recovery_codes_remaining == 8


@pytest.mark.parametrize("codes", [{}, {"code": "123456", "recovery_code": "abcd-ef01"}],
                         ids=["neither", "both"])
def test_verify_needs_exactly_one_factor(
    user: Twin, mfa_server: MockServer, codes: dict[str, str]
) -> None:
    before = len(mfa_server.requests)

    with pytest.raises(ValueError):
        user.auth.verify_mfa(challenge_id="c", challenge="x", **codes)

    assert len(mfa_server.requests) == before


# --- nothing secret in repr/str ----------------------------------------------------------------


def test_no_secret_recovery_code_uri_or_challenge_in_repr_or_str(
    user: Twin, other: Twin, clock: Clock
) -> None:
    enrollment = user.auth.enroll_totp()
    activation = user.auth.activate_totp(code=totp_code(enrollment.secret, clock()))
    error = challenge_of(other)
    secrets = [enrollment.secret, enrollment.provisioning_uri, error.challenge,
               *activation.recovery_codes]

    for shown in (repr(enrollment), str(enrollment), repr(activation), str(activation),
                  repr(error), str(error), repr(error.args)):
        for secret in secrets:
            assert secret not in shown, shown


# --- disabling, methods ----------------------------------------------------------------------


def test_disable_with_a_totp_code_then_sign_in_needs_no_second_factor(
    user: Twin, other: Twin, mfa_server: MockServer, clock: Clock
) -> None:
    secret, _ = enable_totp(user, clock)
    clock.advance(STEP)
    code = totp_code(secret, clock())

    result = user.auth.disable_totp(code=code)

    assert_json_body(last_request(mfa_server, "POST", "/api/auth/mfa/totp/disable"),
                     {"code": code})
    assert isinstance(result, MessageResponse)
    assert result.message == "TOTP MFA has been disabled"
    assert user.auth.get_session_context().mfa_enrolled is False
    pair = other.auth.sign_in_with_password(email=EMAIL, password=PASSWORD)
    assert pair.access_token and other.get_tokens() is not None


def test_disable_with_a_recovery_code(user: Twin, clock: Clock) -> None:
    _, codes = enable_totp(user, clock)

    assert user.auth.disable_totp(code=codes[3]).message == "TOTP MFA has been disabled"
    with pytest.raises(AuthError) as caught:
        user.auth.disable_totp(code=codes[4])
    assert (caught.value.status_code, caught.value.error_code) == (400, "VALIDATION_ERROR")


def test_disable_with_a_wrong_code_keeps_mfa(user: Twin, clock: Clock) -> None:
    enable_totp(user, clock)

    with pytest.raises(AuthError) as caught:
        user.auth.disable_totp(code="000000-not-a-code")

    assert (caught.value.status_code, caught.value.error_code) == (401, "INVALID_CREDENTIALS")
    assert user.auth.get_session_context().mfa_enrolled is True


@pytest.mark.parametrize("surface", SURFACES)
def test_auth_methods_need_only_the_api_key(mfa_server: MockServer, surface: str) -> None:
    with aggregate(mfa_server, surface, sign_in=False) as client:
        methods = client.auth.get_auth_methods()

    request = last_request(mfa_server, "GET", "/api/auth/methods")
    assert request.headers.get("x-api-key") == API_KEY
    assert "authorization" not in request.headers
    assert isinstance(methods, AuthMethods)
    by_name = {m.method: m for m in methods.methods}
    assert by_name["password"].enabled is True
    assert by_name["webauthn"].enabled is False
    assert by_name["wallet:ethereum"].config == {"chain_type": "ethereum"}


def test_totp_code_helper_matches_rfc_6238() -> None:
    # RFC 6238 appendix B, SHA-1 seed "12345678901234567890" (last 6 digits).
    secret = base64.b32encode(b"12345678901234567890").decode()
    assert totp_code(secret, 59) == "287082"
    assert totp_code(secret, 1111111109) == "081804"
    assert totp_code(secret, 2000000000) == "279037"
    assert totp_code(secret.lower().rstrip("="), 1234567890) == "005924"
