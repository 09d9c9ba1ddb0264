"""Routing stage: local model or cloud. Until routing lands: local, unless the request insists on the
cloud, which is refused when none is configured (the default: air-gapped)."""

from __future__ import annotations

from typing import Literal

from appliance.service.errors import FailedPrecondition
from appliance.service.types import Request


class LocalRouter:
    def __init__(self, cloud_configured: bool = False) -> None:
        self.cloud_configured = cloud_configured

    def choose(self, req: Request) -> Literal["local", "cloud"]:
        if req.route_policy == "cloud_only":
            raise FailedPrecondition("route_policy: cloud_only, but no cloud backend is configured")
        return "local"
