"""The routing decision before generation: the request's (or tenant's) policy, else the difficulty
classifier's P(cloud) against the threshold. Where the cloud cannot take it (none configured, circuit
open, budget) the pipeline turns a "cloud" decision into a local one and says why."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Literal

import msgspec

from appliance.cache.embedder import Embedder
from appliance.common.types import Request, RoutePolicy
from appliance.models.provision import data_home
from appliance.route.classifier import RouterModel, file_source, read_labelled, shipped_csv, train
from appliance.route.features import extract

log = logging.getLogger("appliance.route")


class Decision(msgspec.Struct, kw_only=True):
    route: Literal["local", "cloud"]
    reason: str  # "policy", "router"; later "no_cloud", "circuit_open", "budget_monthly", ...
    p_cloud: float = 0.0
    kind: str = ""


def trained_path() -> Path:
    """Where `appliance router train` puts the model the service uses by default."""
    return data_home() / "router" / "classifier.npz"


def load_model(configured: str, embedder: Embedder | None) -> RouterModel:
    """The configured model; else the one `appliance router train` wrote; else one trained (and kept)
    from the shipped examples for this embedder."""
    if configured:
        return RouterModel.load(Path(configured).expanduser())
    if trained_path().is_file():
        return RouterModel.load(trained_path())
    csv_path = shipped_csv()
    source = file_source(csv_path)
    version = embedder.version if embedder is not None else "features-only"
    tag = hashlib.sha256(f"{source}|{version}".encode()).hexdigest()[:16]
    cached = data_home() / "router" / f"default-{tag}.npz"
    if cached.is_file():
        model = RouterModel.load(cached)
        if model.embedder_version == (embedder.version if embedder is not None else ""):
            return model
    texts, labels = read_labelled(csv_path)
    model = train(texts, labels, embedder, source)
    model.save(cached)
    log.info("trained the default router on %d shipped examples (%s)", len(texts), source)
    return model


def routed_text(req: Request) -> str:
    """What the router reads: the prompt, or the last user message (the turn being answered)."""
    if req.prompt:
        return req.prompt
    users = [m.content for m in req.messages if m.role == "user"]
    return users[-1] if users else ""


class Router:
    def __init__(self, model: RouterModel, embedder: Embedder | None, threshold: float) -> None:
        self.model = model
        self.embedder = embedder
        self.threshold = threshold

    def score(self, text: str) -> tuple[float, str]:
        """(P(cloud), dominant task kind) of a text."""
        return self.model.p_cloud(text, self.embedder), extract(text).kind

    def decide(self, text: str, policy: RoutePolicy) -> Decision:
        if policy == "local_only":
            return Decision(route="local", reason="policy")
        if policy == "cloud_only":
            return Decision(route="cloud", reason="policy")
        p, kind = self.score(text)
        return Decision(route="cloud" if p >= self.threshold else "local", reason="router", p_cloud=p, kind=kind)
