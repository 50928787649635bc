"""Which tenant a read covers, and the record of every administrator's read.

A caller reads its own tenant's conversations. A caller with the `admin`
scope reads every tenant's, and each such read is recorded in the log first
(`HistoryService.record_admin_read`), so cross-tenant access is itself
auditable. Writes never cross tenants: they take `own_tenant()`.
"""

from __future__ import annotations

from turnlog.api.authentication import caller
from turnlog.auth.principal import Scope
from turnlog.history.service import HistoryService


class TenantAccess:
    """A part of `ConversationServicer`: the tenant of each read."""

    history: HistoryService

    async def read_tenant(self, method: str, target: str = "") -> str | None:
        """The caller's tenant; None (every tenant) for an administrator, whose read is recorded.

        Args:
            method: the RPC's name, recorded for an administrator.
            target: what is read ("conversations/<id>"; "" for all conversations).
        """
        principal = caller()
        if not principal.has(Scope.ADMIN):
            return principal.tenant
        await self.history.record_admin_read(
            subject=principal.subject, tenant=principal.tenant, method=method, target=target
        )
        return None


__all__ = ["TenantAccess"]
