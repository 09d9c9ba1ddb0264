"""Cache configuration and the calibrated similarity thresholds shipped with the package."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources

import msgspec

from appliance.cache.decision import Decision
from appliance.cache.errors import ConfigError
from appliance.cache.index import HnswParams

CALIBRATION_FILE = "thresholds.json"


@dataclass(frozen=True)
class CacheConfig:
    """``threshold`` None means the calibrated value shipped for the embedder (see :func:`shipped_threshold`)."""

    threshold: float | None = None
    guards: bool = True
    # with no threshold given: decide hits with the embedder's own calibrated decision when it carries
    # one (a tuned embedder, `appliance cache tune`); False: its cosine threshold alone
    decide: bool = True
    ttl_s: float | None = 7 * 86400.0
    max_entries: int = 1_000_000
    max_bytes: int = 2 << 30
    max_query_chars: int = 8192
    candidates: int = 8
    hnsw: HnswParams = field(default_factory=HnswParams)
    persist_min_entries: int = 512
    save_interval_s: float = 30.0
    max_loaded_partitions: int = 256

    def __post_init__(self) -> None:
        if self.threshold is not None and not (0.0 < self.threshold <= 1.0):
            raise ConfigError(f"cache threshold must be in (0, 1], got {self.threshold}")
        if self.ttl_s is not None and not (self.ttl_s > 0 and math.isfinite(self.ttl_s)):
            raise ConfigError(f"cache ttl_s must be a positive number of seconds or None, got {self.ttl_s}")
        for name in ("max_entries", "max_bytes", "max_query_chars", "candidates", "max_loaded_partitions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache {name} must be at least 1, got {getattr(self, name)}")


class Calibration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One embedder's calibrated threshold and how it was obtained (see data/thresholds.json)."""

    threshold: float
    guards: bool
    method: str
    data: str
    split: str
    seed: int
    calibration: dict[str, float]
    holdout: dict[str, float]


class TunedCalibration(msgspec.Struct, frozen=True):
    """What a tuned embedder carries in its GGUF metadata: its cosine threshold and its decision,
    both fitted on questions the tuning never saw (see :mod:`appliance.cache.tune`)."""

    threshold: float
    decision: Decision | None = None
    target: float = 0.97


def tuned_calibration(text: str | None, where: str) -> TunedCalibration | None:
    """Parse an embedder's calibration metadata (None: it has none)."""
    if text is None:
        return None
    try:
        return msgspec.json.decode(text, type=TunedCalibration)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise ConfigError(f"the calibration stored in {where} is invalid: {e}") from None


def embedder_calibration(embedder: object) -> TunedCalibration | None:
    """The calibration a (tuned) embedder carries in its GGUF, if any."""
    from appliance.cache.embedder import MemoEmbedder

    inner = embedder.inner if isinstance(embedder, MemoEmbedder) else embedder
    return tuned_calibration(getattr(inner, "calibration", None), f"embedding model {getattr(inner, 'version', '?')}")


def shipped_calibrations() -> dict[str, Calibration]:
    raw = resources.files("appliance.cache").joinpath("data", CALIBRATION_FILE).read_bytes()
    try:
        return msgspec.json.decode(raw, type=dict[str, Calibration])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ConfigError(f"shipped cache calibration data/{CALIBRATION_FILE} is invalid: {e}") from None


def shipped_threshold(embedder_version: str) -> float:
    cal = shipped_calibrations().get(embedder_version)
    if cal is None:
        known = ", ".join(shipped_calibrations()) or "none"
        raise ConfigError(
            f"no calibrated cache threshold ships for embedder {embedder_version!r} (calibrated: {known}); "
            "calibrate it (`appliance cache calibrate --embedding-model FILE --csv DATA`) and set the threshold: "
            "[cache] threshold in the service's config, CacheConfig(threshold=...) in Python"
        )
    return cal.threshold
