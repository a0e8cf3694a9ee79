"""The whitelist against the real SPAPS, sync and async: check needs only the API key; add,
list, update and remove (204) need an admin; a normal user's add is refused with 403."""

from __future__ import annotations

import pytest
from _realsupport import Flavor, NewUser, RawApi, unique_email

from spaps_client import WhitelistError

pytestmark = pytest.mark.realserver


async def _find(c: Flavor, whitelist: object, email: str) -> object:
    """The listed entry for ``email``, paging through the list (bounded)."""
    offset, limit = 0, 100
    for _ in range(50):
        page = await c(whitelist.list(limit=limit, offset=offset))  # type: ignore[attr-defined]
        for entry in page.entries:
            if entry.email == email:
                return entry
        offset += limit
        if not page.entries or offset >= page.total:
            break
    raise AssertionError(f"{email} is not in the whitelist listing")


def test_whitelist_admin_flow(flavor: Flavor, raw: RawApi) -> None:
    admin_email, admin_password = raw.admin_credentials()
    email = unique_email("vip")

    async def flow(c: Flavor) -> None:
        anonymous = c.client()  # check needs no sign-in
        before = await c(anonymous.whitelist.check(email=email))
        assert before.entry is None
        assert before.message

        admin = c.client()
        await c.sign_in(admin, admin_email, admin_password)
        added = await c(admin.whitelist.add(email=email, tier="premium", bypass_payment=True,
                                            metadata={"source": "integration"}))
        assert added.email == email
        assert added.tier == "premium"
        assert added.bypass_payment is True

        listed = await c(anonymous.whitelist.check(email=email))
        assert listed.entry is not None
        assert listed.entry.email == email
        assert listed.entry.tier == "premium"

        entry = await _find(c, admin.whitelist, email)
        assert entry.tier == "premium"  # type: ignore[attr-defined]

        updated = await c(admin.whitelist.update(email=email, tier="enterprise",
                                                 metadata={"source": "updated"}))
        assert updated.email == email
        assert updated.tier == "enterprise"
        assert updated.metadata == {"source": "updated"}
        assert updated.bypass_payment is True

        removed = await c(admin.whitelist.remove(email=email))  # the server answers 204
        assert isinstance(removed.message, str)

        after = await c(anonymous.whitelist.check(email=email))
        assert after.entry is None

    flavor.run(flow)


def test_whitelist_add_needs_an_admin(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        with pytest.raises(WhitelistError) as refused:
            await c(spaps.whitelist.add(email=unique_email("nope")))
        assert refused.value.status_code == 403
        assert refused.value.error_code == "FORBIDDEN"

    flavor.run(flow)
