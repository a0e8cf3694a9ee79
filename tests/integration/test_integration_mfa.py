"""TOTP multi-factor sign-in against the real SPAPS, sync and async: enrol, activate with a code
computed here (RFC 6238), sign in (``MfaRequiredError``), finish with a TOTP code and, on a
second sign-in, with a recovery code; a wrong code and a spent recovery code are refused; then
TOTP is switched off and the password alone signs in again.

SPAPS accepts the codes of the current 30 s step and of the steps either side, and refuses a
step it has already accepted: the code that activated TOTP cannot finish a sign-in within the
same step, so the sign-in uses the next step's code (``time.time() + 30``). For the same reason
TOTP is switched off with a recovery code (every step in the window may be spent by then).

The server commits a login's challenge after it has replied: a verify sent at once may get 400
"Challenge not found", so ``verify`` resends it (bounded) until the challenge is there.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
from datetime import datetime
from typing import Any, Dict, Optional

import pytest
from _realsupport import Flavor, NewUser, RawApi, wait_until

from spaps_client import AuthError, MfaRequiredError, TokenPair

pytestmark = pytest.mark.realserver


def totp_code(secret: str, at: Optional[float] = None, *, digits: int = 6,
              step: int = 30) -> str:
    """The RFC 6238 code (HMAC-SHA1, 30 s steps) of base32 ``secret`` at time ``at``."""
    key = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    counter = int((time.time() if at is None else at) // step)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10 ** digits).zfill(digits)


def test_totp_code_matches_rfc_6238_vectors() -> None:
    # RFC 6238 appendix B (SHA-1 key "12345678901234567890"), last 6 digits of the 8.
    secret = base64.b32encode(b"12345678901234567890").decode()
    assert totp_code(secret, 59, digits=8) == "94287082"
    assert totp_code(secret, 1111111109, digits=8) == "07081804"
    assert totp_code(secret, 2000000000, digits=8) == "69279037"
    assert totp_code(secret, 59) == "287082"


def wrong_code(secret: str) -> str:
    """A 6-digit code that is valid in none of the steps the server could accept now."""
    now = time.time()
    valid = {totp_code(secret, now + shift) for shift in (-60, -30, 0, 30, 60)}
    candidate = int(totp_code(secret, now))
    while str(candidate).zfill(6) in valid:
        candidate = (candidate + 1) % 1_000_000
    return str(candidate).zfill(6)


async def verify(c: Flavor, spaps: Any, **kwargs: Any) -> Any:
    """``auth.verify_mfa(**kwargs)``, sent again (bounded) while the server has not yet committed
    the challenge its login just answered with: 400 VALIDATION_ERROR "Challenge not found".
    Nothing is checked or spent then (the challenge is looked up first), so resending is safe;
    any other answer, a refused code included, is returned or raised as it is."""
    for _ in range(50):
        try:
            return await c(spaps.auth.verify_mfa(**kwargs))
        except AuthError as error:
            if not (error.status_code == 400 and error.error_code == "VALIDATION_ERROR"
                    and "challenge not found" in error.message.lower()):
                raise
        time.sleep(0.1)
    raise AssertionError("the MFA challenge never became visible to /api/auth/mfa/verify")


def session_context(raw: RawApi, access_token: str) -> Dict[str, Any]:
    return raw.data("GET", "/api/auth/session-context", token=access_token)


def wait_mfa_enrolled(raw: RawApi, access_token: str, enrolled: bool) -> None:
    # The server commits the (de)activation after it has replied.
    wait_until(lambda: session_context(raw, access_token).get("mfa_enrolled") is enrolled,
               f"mfa_enrolled to become {enrolled}")


def test_auth_methods_and_session_context(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        methods = await c(spaps.auth.get_auth_methods())  # the API key is enough
        by_name = {method.method: method for method in methods.methods}
        assert by_name["password"].enabled is True
        assert spaps.get_tokens() is None

        await c.sign_in(spaps, user.email, user.password)
        context = await c(spaps.auth.get_session_context())
        assert context.user.id == user.id
        assert context.user.email == user.email
        assert context.mfa_enrolled is False
        assert context.entitlements_count == len(context.entitlements)

    flavor.run(flow)


def test_totp_sign_in_end_to_end(flavor: Flavor, user: NewUser, raw: RawApi,
                                 assert_no_secrets: Any) -> None:
    async def flow(c: Flavor) -> None:
        owner = c.client()
        await c.sign_in(owner, user.email, user.password)

        # -- enrol and activate -----------------------------------------------------------
        enrollment = await c(owner.auth.enroll_totp())
        secret = enrollment.secret
        assert len(base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))) >= 10
        assert enrollment.provisioning_uri.startswith("otpauth://totp/")
        assert f"secret={secret}" in enrollment.provisioning_uri
        assert enrollment.account_name == user.email
        assert enrollment.issuer
        assert secret not in repr(enrollment)
        # Enrolling alone switches nothing on.
        assert session_context(raw, user.access_token).get("mfa_enrolled") is False

        activated_at = time.time()
        activation = await c(owner.auth.activate_totp(code=totp_code(secret, activated_at)))
        codes = activation.recovery_codes
        assert len(codes) >= 2 and len(set(codes)) == len(codes)
        assert isinstance(activation.activated_at, datetime)
        assert not any(code in repr(activation) for code in codes)
        wait_mfa_enrolled(raw, user.access_token, True)
        assert (await c(owner.auth.get_session_context())).mfa_enrolled is True

        # -- the password alone no longer signs in ----------------------------------------
        spaps = c.client()
        with pytest.raises(MfaRequiredError) as needed:
            await c(spaps.auth.sign_in_with_password(email=user.email, password=user.password))
        challenge = needed.value
        assert isinstance(challenge, AuthError)
        assert challenge.error_code == "MFA_REQUIRED"
        assert challenge.challenge_id and challenge.challenge
        assert "totp" in challenge.methods
        assert challenge.expires_at and datetime.fromisoformat(challenge.expires_at)
        assert_no_secrets(challenge, challenge.challenge)
        assert spaps.get_tokens() is None

        # -- a wrong code is refused, and the challenge stays usable ------------------------
        with pytest.raises(AuthError) as refused:
            await verify(c, spaps, challenge_id=challenge.challenge_id,
                         challenge=challenge.challenge, code=wrong_code(secret))
        assert not isinstance(refused.value, MfaRequiredError)
        assert refused.value.status_code == 401
        assert refused.value.error_code == "INVALID_CREDENTIALS"
        assert spaps.get_tokens() is None

        with pytest.raises(ValueError):
            await c(spaps.auth.verify_mfa(challenge_id=challenge.challenge_id,
                                          challenge=challenge.challenge))

        # -- the next step's code finishes the sign-in and stores the tokens ----------------
        pair = await verify(c, spaps, challenge_id=challenge.challenge_id,
                            challenge=challenge.challenge,
                            code=totp_code(secret, activated_at + 30))
        assert isinstance(pair, TokenPair)
        assert pair.mfa_method == "totp"
        assert pair.user is not None and pair.user.user_id == user.id
        assert pair.access_token and pair.refresh_token and pair.expires_in > 0
        stored = spaps.get_tokens()
        assert stored is not None
        assert stored.access_token == pair.access_token
        assert stored.refresh_token == pair.refresh_token
        raw.wait_session_visible(pair.access_token)
        assert (await c(spaps.auth.get_current_user())).id == user.id

        # -- a second sign-in, finished with a recovery code (it works once) ----------------
        again = c.client()
        with pytest.raises(MfaRequiredError) as second:
            await c(again.auth.sign_in_with_password(email=user.email, password=user.password))
        recovered = await verify(c, again, challenge_id=second.value.challenge_id,
                                 challenge=second.value.challenge, recovery_code=codes[0])
        assert recovered.mfa_method == "recovery_code"
        assert recovered.recovery_codes_remaining == len(codes) - 1
        assert again.get_tokens() is not None
        assert again.get_tokens().access_token == recovered.access_token
        raw.wait_session_visible(recovered.access_token)

        third = c.client()
        with pytest.raises(MfaRequiredError) as spent:
            await c(third.auth.sign_in_with_password(email=user.email, password=user.password))
        with pytest.raises(AuthError) as reused:
            await verify(c, third, challenge_id=spent.value.challenge_id,
                         challenge=spent.value.challenge, recovery_code=codes[0])
        assert reused.value.status_code == 401
        assert reused.value.error_code == "INVALID_CREDENTIALS"
        assert third.get_tokens() is None

        # -- switch TOTP off: the password alone signs in again ------------------------------
        done = await c(again.auth.disable_totp(code=codes[1]))
        assert done.message
        wait_mfa_enrolled(raw, user.access_token, False)
        plain = c.client()
        pair = await c(plain.auth.sign_in_with_password(email=user.email,
                                                        password=user.password))
        assert pair.access_token and pair.mfa_method is None
        assert plain.get_tokens() is not None

    flavor.run(flow)


def test_disable_totp_with_a_wrong_code_keeps_it_on(flavor: Flavor, user: NewUser,
                                                    raw: RawApi) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        secret = (await c(spaps.auth.enroll_totp())).secret
        await c(spaps.auth.activate_totp(code=totp_code(secret)))
        wait_mfa_enrolled(raw, user.access_token, True)

        with pytest.raises(AuthError) as refused:
            await c(spaps.auth.disable_totp(code=wrong_code(secret)))
        assert refused.value.status_code == 401
        assert refused.value.error_code == "INVALID_CREDENTIALS"
        assert session_context(raw, user.access_token).get("mfa_enrolled") is True

    flavor.run(flow)
