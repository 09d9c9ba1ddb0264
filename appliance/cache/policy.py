"""Per-request cache policy: ``auto`` (look up, store on a miss), ``read-only`` (look up, never
store) or ``skip`` (neither: the request bypasses the cache entirely)."""

from __future__ import annotations

import enum

from appliance.cache.errors import ConfigError


class Policy(enum.Enum):
    AUTO = "auto"
    READ_ONLY = "read-only"
    SKIP = "skip"

    @property
    def reads(self) -> bool:
        return self is not Policy.SKIP

    @property
    def writes(self) -> bool:
        return self is Policy.AUTO

    @classmethod
    def parse(cls, value: Policy | str) -> Policy:
        if isinstance(value, Policy):
            return value
        try:
            return cls(value.strip().lower().replace("_", "-"))
        except (ValueError, AttributeError):
            names = ", ".join(p.value for p in cls)
            raise ConfigError(f"unknown cache policy {value!r}; use one of: {names}") from None
