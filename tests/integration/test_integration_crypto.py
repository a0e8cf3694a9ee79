"""Crypto invoices (``payments.crypto``) against the real SPAPS, sync and async."""

from __future__ import annotations

import pytest
from _realsupport import Flavor, NewUser

from spaps_client import CryptoPaymentsError

pytestmark = pytest.mark.realserver


def test_invoice_create_get_status_reconcile(flavor: Flavor, user: NewUser) -> None:
    async def flow(c: Flavor) -> None:
        spaps = c.client()
        await c.sign_in(spaps, user.email, user.password)
        crypto = spaps.payments.crypto

        invoice = await c(crypto.create_invoice(asset="USDC", network="base", amount="42.75"))
        assert invoice.invoice_id
        assert invoice.asset == "USDC"
        assert invoice.network == "base"
        assert invoice.amount == "42.75"
        assert invoice.status == "pending"

        again = await c(crypto.get_invoice(invoice.invoice_id))
        assert again.invoice_id == invoice.invoice_id
        assert again.amount == "42.75"
        assert again.status == invoice.status

        status = await c(crypto.get_invoice_status(invoice.invoice_id))
        assert status.invoice_id == invoice.invoice_id
        assert status.status == "pending"

        job = await c(crypto.reconcile())
        # SPAPS 0.6 reconciles at once ({reconciled, message}); others schedule a job.
        assert getattr(job, "reconciled", None) is True or getattr(job, "job_id", None)

        with pytest.raises(CryptoPaymentsError) as unknown:
            await c(crypto.get_invoice("00000000-0000-4000-8000-000000000000"))
        assert unknown.value.status_code == 404
        assert unknown.value.error_code == "INVOICE_NOT_FOUND"

    flavor.run(flow)
