"""Who is calling. Unix-socket callers are trusted by file permissions and may name their tenant;
TCP callers must send `authorization: Bearer <token>`, whose SHA-256 is compared in constant time
with every configured tenant's (tokens are random secrets, so a fast hash is enough; the token
itself is never stored). On TCP the token decides the tenant."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence

from appliance.common.config import TenantConfig
from appliance.common.errors import PermissionDenied, Unauthenticated


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, tenants: Sequence[TenantConfig], default_tenant: str) -> None:
        self._hashes = [(t.name, bytes.fromhex(t.token_sha256)) for t in tenants]
        self.default_tenant = default_tenant

    def tenant_for(self, peer: str, metadata: Iterable[tuple[str, str | bytes]], asked: str) -> str:
        """The tenant of a call from `peer` (grpc's context.peer()) asking for tenant `asked` ('' = any)."""
        if peer.startswith("unix:"):
            return asked or self.default_tenant
        token = None
        for key, value in metadata:
            if key.lower() == "authorization" and isinstance(value, str):
                scheme, _, rest = value.partition(" ")
                if scheme.lower() == "bearer" and rest.strip():
                    token = rest.strip()
        if token is None:
            raise Unauthenticated("missing bearer token: TCP callers must send 'authorization: Bearer <token>'")
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for name, expected in self._hashes:  # no early exit: the time does not depend on which matched
            if hmac.compare_digest(digest, expected):
                found = name
        if found is None:
            raise Unauthenticated("invalid bearer token")
        if asked and asked != found:
            raise PermissionDenied(f"tenant: the token is for tenant '{found}', not '{asked}'")
        return found
