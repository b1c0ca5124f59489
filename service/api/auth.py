"""Authentication: which tenant a request acts for, and who may touch the engine routes.

Keys are read from ``Authorization: Bearer <key>`` or ``x-api-key: <key>``.

- Tenant routes (native, OpenAI): with tenant keys configured, a missing or unknown key
  is a 401; otherwise the request acts for its key's tenant (``request.state.tenant``).
  With none configured, every request is tenant ``default`` (open, as before).
- Engine routes (register, heartbeat, remove, list) need an operator credential:
  ``--admin-key`` or ``--cluster-secret``. Without one a request is a 401, with a tenant
  key a 403. With tenant keys but no operator credential configured, nobody may use them
  (403 for tenant keys: engines can then only be given at start-up). With no keys at
  all, they stay open.
"""

from __future__ import annotations

from fastapi import Request

from parrot.service.errors import AuthenticationError, PermissionDeniedError
from parrot.service.observe import ids
from parrot.service.tenancy import Tenant, Tenants


def presented_key(request: Request) -> str | None:
    """The key in ``Authorization: Bearer`` or, failing that, ``x-api-key``."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key") or None


def _tenants(request: Request) -> Tenants:
    return request.app.state.tenants


async def require_tenant(request: Request) -> Tenant:
    """FastAPI dependency of the tenant routes: sets and returns ``request.state.tenant``."""
    tenants = _tenants(request)
    if not tenants.keys_required:
        tenant = tenants.default
    else:
        key = presented_key(request)
        found = tenants.authenticate(key)
        if found is None:
            raise AuthenticationError("a valid API key is required (Authorization: Bearer <key> "
                                      "or x-api-key)" if key is None else "invalid API key")
        tenant = found
    request.state.tenant = tenant
    ids.tenant_id.set(tenant.name)  # on every log line and metric of this request
    return tenant


async def require_operator(request: Request) -> None:
    """FastAPI dependency of the engine routes: the admin key or the cluster secret."""
    tenants = _tenants(request)
    if not tenants.operator_required:
        return
    key = presented_key(request)
    if tenants.is_operator(key):
        return
    if key is not None and tenants.authenticate(key) is not None:
        raise PermissionDeniedError("the engine routes need the operator credential (the admin key "
                                    "or the cluster secret); a tenant key may not use them")
    raise AuthenticationError("the engine routes need the operator credential (the admin key or "
                              "the cluster secret)")


def request_tenant(request: Request) -> Tenant:
    """The tenant ``require_tenant`` set for this request."""
    return request.state.tenant
