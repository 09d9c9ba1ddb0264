"""The service's one TOML config, validated with msgspec. Errors name the field path ($.server.tcp_port).

Every field has a default that serves out of the box on the embedded parts, with no cloud (air-gapped):

    [server]
    unix_socket = "/run/appliance/appliance.sock"   # default: $APPLIANCE_HOME/appliance.sock
    tcp = "127.0.0.1:50051"                          # default: no TCP listener

    [http]
    listen = "127.0.0.1:8080"   # the OpenAI/Ollama HTTP edge; default: off (`make serve` turns it on here)

    [[tenants]]
    name = "acme"
    token_sha256 = "..."        # `appliance serve --hash-token` prints it; the token itself is never stored

    [pricing]                   # the cloud model a request is priced against (counterfactual cost)
    cloud_model = "reference-cloud"
    input_per_mtok = 0.50

    [cloud]                     # no base_url: no cloud; [[tenants]] may carry their own [tenants.cloud]
    provider = "anthropic"      # or "openai" (any Chat Completions endpoint)
    base_url = "https://HOST/v1"
    model = "..."
    api_key_env = "CLOUD_API_KEY"

    [route]                     # router threshold, cascade thresholds; [budget] monthly / per_request

    [distill]                   # teacher capture and task names; [[tenants]] may set capture, tasks, model
    capture = true
    tasks = ["ticket-triage"]
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import msgspec

from appliance.engine.sampling import ExitMode
from appliance.models.provision import data_home

log = logging.getLogger("appliance.config")


class ConfigError(ValueError):
    """The config file is missing, not TOML, or a field is invalid; the message names the field path."""


def _check(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {why}")  # msgspec appends " - at `$.section`"


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    unix_socket: str = ""  # empty: $APPLIANCE_HOME/appliance.sock
    socket_mode: int = 0o660  # access to the Unix socket is by file permissions
    tcp: str = ""  # "host:port" to listen on TCP as well (bearer tokens required); empty: none
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent: int = 8  # requests generating at once (batched together by the local engine)
    max_queue: int = 16  # requests waiting for a slot; more get RESOURCE_EXHAUSTED
    max_cloud_concurrent: int = 32  # requests waiting on a cloud answer at once (they hold no local slot)
    retry_after_ms: int = 1000  # the retry hint sent with RESOURCE_EXHAUSTED
    drain_timeout_s: float = 10.0  # graceful shutdown: in-flight requests get this long to finish
    metrics: str = ""  # "127.0.0.1:9464" serves Prometheus metrics over HTTP; empty: off
    http: str = ""  # deprecated: the old name of [http] listen (read as it, with a warning)

    def __post_init__(self) -> None:
        _check(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        _check(self.max_concurrent >= 1, "max_concurrent", "must be >= 1")
        _check(self.max_queue >= 0, "max_queue", "must be >= 0")
        _check(self.max_cloud_concurrent >= 1, "max_cloud_concurrent", "must be >= 1")
        _check(self.retry_after_ms >= 0, "retry_after_ms", "must be >= 0")
        _check(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")
        _check(0 <= self.socket_mode <= 0o777, "socket_mode", "must be a permission mode such as 0o660")
        for name in ("tcp", "metrics", "http"):
            value = getattr(self, name)
            _check(not value or _split_hostport(value) is not None, name, f"{value!r} is not host:port")

    def socket_path(self) -> Path:
        return Path(self.unix_socket).expanduser() if self.unix_socket else data_home() / "appliance.sock"


class HttpConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # "host:port" of the HTTP edge (OpenAI-compatible /v1/..., Ollama's /api/..., /health, /metrics);
    # empty: off. On loopback it serves without tokens while no [[tenants]] exist; any other address
    # needs [[tenants]] with tokens (as TCP does), and once tenants exist every HTTP call needs one.
    listen: str = ""

    def __post_init__(self) -> None:
        ok = not self.listen or _split_hostport(self.listen) is not None
        _check(ok, "listen", f"{self.listen!r} is not host:port")


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str = ""  # manifest name or .gguf path; empty: the provisioned default model
    n_ctx: int = 4096
    threads: int = 0  # 0: every CPU this process may use
    # paged KV cache shared by all running requests (and the prefix cache); for a model with
    # sliding-window layers (Gemma 3) those get only what the running windows need
    kv_cache_mb: int = 256
    max_batched_tokens: int = 512  # tokens per forward pass: decodes first, prompts chunked into the rest
    context_budget: int = 2048  # most prompt tokens a Chat turn sends; older turns are summarized
    keep_turns: int = 4  # the last N messages stay verbatim
    summary_max_tokens: int = 128
    default_max_tokens: int = 256
    # early exit for requests that do not choose: "lossless" (same output, drafts only while it
    # measures faster), "adaptive" (confident tokens leave early) or "off". Needs the model's
    # calibration (`appliance models calibrate-exit`); without one every request runs at full depth.
    early_exit: ExitMode = "lossless"
    # prompt prefixes shared by several requests (system prompts) whose K/V is saved at shutdown and
    # loaded at start, per tenant; 0: none
    hot_prefixes: int = 8
    # with a GPU build (`make serve GPU=cuda`) and a GPU: how many of the last layers (weights and K/V)
    # go on the GPU, as llama.cpp's -ngl; more than the model's layers also moves the embeddings and
    # head; -1: everything; 0: the CPU only. Without a GPU everything runs on the CPU.
    gpu_layers: int = -1
    # stop a local answer once it repeats itself (the same block of tokens three times, 32 tokens or
    # more: service/loops.py), finish reason "loop"; false runs it to max_tokens as llama.cpp would
    cut_loops: bool = True

    def __post_init__(self) -> None:
        _check(self.n_ctx >= 64, "n_ctx", "must be >= 64")
        _check(0 <= self.hot_prefixes <= 64, "hot_prefixes", "must be in [0, 64]")
        _check(self.threads >= 0, "threads", "must be >= 0")
        _check(self.gpu_layers >= -1, "gpu_layers", "must be >= -1 (-1: every layer on the GPU)")
        _check(self.kv_cache_mb >= 1, "kv_cache_mb", "must be >= 1")
        _check(16 <= self.max_batched_tokens <= 8192, "max_batched_tokens", "must be in [16, 8192]")
        _check(64 <= self.context_budget <= self.n_ctx, "context_budget", "must be in [64, n_ctx]")
        _check(self.keep_turns >= 0, "keep_turns", "must be >= 0")
        _check(self.summary_max_tokens >= 8, "summary_max_tokens", "must be >= 8")
        _check(self.default_max_tokens >= 1, "default_max_tokens", "must be >= 1")


class CloudConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A cloud model. No base_url: no cloud (air-gapped); hard requests are then served locally, flagged
    `degraded`. The key comes from an environment variable or a file and is never logged."""

    provider: Literal["openai", "anthropic"] = "openai"  # Chat Completions or Anthropic Messages
    base_url: str = ""  # e.g. "https://HOST/v1" (the API's version prefix included)
    model: str = ""
    api_key_env: str = ""  # name of the environment variable holding the key
    api_key_file: str = ""  # or a file holding it (first line)
    timeout_s: float = 60.0  # per read: a stalled stream fails after this long
    connect_timeout_s: float = 5.0
    max_retries: int = 2  # on 429/5xx/network errors before the first byte
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    breaker_failures: int = 5  # consecutive failures that open the circuit
    breaker_cooldown_s: float = 30.0
    prompt_cache_min_chars: int = 4096  # Anthropic cache_control breakpoints on prefixes this long

    def __post_init__(self) -> None:
        _check(
            not self.base_url or bool(re.match(r"https?://[^/]+", self.base_url)),
            "base_url",
            "must be http(s)://host[:port][/path]",
        )
        _check(not self.base_url or bool(self.model), "model", "must be set when base_url is")
        _check(
            not (self.api_key_env and self.api_key_file), "api_key_env", "give api_key_env or api_key_file, not both"
        )
        for name in ("timeout_s", "connect_timeout_s"):
            _check(getattr(self, name) > 0, name, "must be > 0")
        for name in ("backoff_s", "backoff_max_s", "breaker_cooldown_s"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0 <= self.max_retries <= 10, "max_retries", "must be in [0, 10]")
        _check(self.breaker_failures >= 1, "breaker_failures", "must be >= 1")
        _check(self.prompt_cache_min_chars >= 0, "prompt_cache_min_chars", "must be >= 0")

    @property
    def configured(self) -> bool:
        return bool(self.base_url)

    def api_key(self, where: str = "$.cloud") -> str:
        """The key ("" when none is configured: a keyless endpoint). ConfigError names the field, never the key."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "").strip()
            if not key:
                raise ConfigError(f"{where}.api_key_env: environment variable {self.api_key_env} is unset or empty")
            return key
        if self.api_key_file:
            try:
                lines = Path(self.api_key_file).expanduser().read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"{where}.api_key_file: cannot read {self.api_key_file}: {e.strerror}") from None
            if not lines or not lines[0].strip():
                raise ConfigError(f"{where}.api_key_file: {self.api_key_file} is empty")
            return lines[0].strip()
        return ""


RoutePolicyName = Literal["auto", "local_only", "cloud_only"]


class RouteConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The difficulty router (before generation) and the cascade (after a local answer)."""

    policy: RoutePolicyName = "auto"  # a request's own policy wins unless it is "auto"
    classifier: str = ""  # .npz from `appliance router train`; empty: the trained default, else the shipped data
    threshold: float = 0.5  # cloud when the classifier's P(cloud) is at least this
    cascade: bool = True  # check local answers and escalate low-confidence ones to the cloud
    min_confidence: float = 0.5  # escalate below this confidence
    max_repetition: float = 0.35  # share of repeated word 3-grams that counts as a looping answer
    escalate_truncated: bool = True  # an answer cut by max_tokens counts as low confidence
    min_mean_logprob: float = -2.0  # escalate when the answer's tokens average a lower log-probability
    max_mean_entropy: float = 4.0  # ... or a higher entropy (nats) of the distributions they came from
    cascade_window: int = 0  # > 0: a local answer still confident after this many tokens streams on; 0: held whole

    def __post_init__(self) -> None:
        for name in ("threshold", "min_confidence", "max_repetition"):
            _check(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")
        _check(self.min_mean_logprob <= 0, "min_mean_logprob", "must be <= 0")
        _check(self.max_mean_entropy >= 0, "max_mean_entropy", "must be >= 0")
        _check(self.cascade_window >= 0, "cascade_window", "must be >= 0")


class BudgetConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Cloud spend ceilings in the price table's currency (0: none). When reached: local only."""

    monthly: float = 0.0  # per tenant, calendar month (UTC), from the ledger
    per_request: float = 0.0  # the most one request may spend in the cloud (worst case: max_tokens)

    def __post_init__(self) -> None:
        _check(self.monthly >= 0, "monthly", "must be >= 0")
        _check(self.per_request >= 0, "per_request", "must be >= 0")


class TenantConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    token_sha256: str  # hex SHA-256 of the bearer token (tokens are random, >= 128 bits)
    route_policy: RoutePolicyName | None = None  # default: [route].policy
    cloud: CloudConfig | None = None  # this tenant's own cloud endpoint, key and model; default: [cloud]
    budget: BudgetConfig | None = None  # default: [budget]
    capture: bool | None = None  # store this tenant's cloud answers as teacher examples; default: [distill].capture
    tasks: list[str] = msgspec.field(default_factory=list)  # task names this tenant may send, besides [distill].tasks
    model: str = ""  # what a request that names no model gets: a task, a task model, the local or cloud model

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name)), "name", "must be 1-64 of [A-Za-z0-9_.-]")
        _check_tasks(self.tasks)
        _check(bool(re.fullmatch(r"[0-9a-f]{64}", self.token_sha256)), "token_sha256", "must be 64 lowercase hex")


class PricingConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Prices per million tokens. The defaults are placeholders for a mid-size cloud model: set yours."""

    currency: str = "USD"
    cloud_model: str = "reference-cloud"
    input_per_mtok: float = 0.50
    cached_input_per_mtok: float = 0.05  # provider prompt-cache reads (about 10% of input)
    cache_write_per_mtok: float = 0.625  # provider prompt-cache writes (about 125% of input)
    output_per_mtok: float = 1.50
    local_per_mtok: float = 0.0  # what a local token costs (power, hardware); 0 by default

    def __post_init__(self) -> None:
        names = ("input_per_mtok", "cached_input_per_mtok", "cache_write_per_mtok", "output_per_mtok", "local_per_mtok")
        for name in names:
            _check(getattr(self, name) >= 0, name, "must be >= 0")

    def cloud_cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        fresh = max(0, prompt_tokens - cached_tokens)
        return (
            fresh * self.input_per_mtok
            + cached_tokens * self.cached_input_per_mtok
            + completion_tokens * self.output_per_mtok
        ) / 1e6

    def billed_cost(self, fresh: int, cache_read: int, cache_write: int, completion_tokens: int) -> float:
        """What the cloud charged, with prompt-cache reads and writes at their own prices."""
        return (
            fresh * self.input_per_mtok
            + cache_read * self.cached_input_per_mtok
            + cache_write * self.cache_write_per_mtok
            + completion_tokens * self.output_per_mtok
        ) / 1e6

    def local_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens + completion_tokens) * self.local_per_mtok / 1e6


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dir: str = ""  # ledger.sqlite and history.sqlite; empty: $APPLIANCE_HOME/state

    def path(self) -> Path:
        return Path(self.dir).expanduser() if self.dir else data_home() / "state"


class LedgerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # how long a response's text is kept in its ledger row so that a retry with the same request_id
    # gets it back; older texts are purged (the accounting rows stay). 0: retries are refused
    replay_window_s: float = 86400.0

    def __post_init__(self) -> None:
        _check(self.replay_window_s >= 0, "replay_window_s", "must be >= 0")


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True  # needs the embedding model (`appliance models pull all-minilm-l6-v2`)
    dir: str = ""  # empty: $APPLIANCE_HOME/semantic-cache
    ttl_s: float = 0.0  # 0: entries do not expire
    # threads per query embedding; 0: one while the engine generates (two would spin-wait against it),
    # up to 4 of the CPUs the service may use while it is idle
    embed_threads: int = 0
    # the embedding model: a tuned embedder's name (`appliance cache tune --out NAME`), a manifest name
    # or a .gguf path (any GGUF embedding model llama.cpp runs); empty: the provisioned all-MiniLM-L6-v2
    embedding_model: str = ""
    # cosine similarity a hit needs; 0: the embedding model's own calibration (a tuned embedder carries
    # a calibrated decision over the nearest entries) or the threshold shipped with the package (only
    # all-MiniLM-L6-v2 has one: calibrate another with `appliance cache calibrate`)
    threshold: float = 0.0

    def __post_init__(self) -> None:
        _check(self.ttl_s >= 0, "ttl_s", "must be >= 0")
        _check(self.embed_threads >= 0, "embed_threads", "must be >= 0")
        _check(0.0 <= self.threshold <= 1.0, "threshold", "must be in [0, 1] (0: the calibrated one)")

    def path(self) -> Path:
        return Path(self.dir).expanduser() if self.dir else data_home() / "semantic-cache"


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _check_tasks(tasks: list[str]) -> None:
    for t in tasks:
        why = f"{t!r}: a task name is 1-64 of [A-Za-z0-9_.-], starting with a letter or digit"
        _check(bool(TASK_NAME.fullmatch(t)), "tasks", why)
    _check(len(set(tasks)) == len(tasks), "tasks", "duplicate task names")


class DistillConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Teacher capture (every cloud answer kept, per tenant, to train a task model on) and task models.

    A request names a task in its `model` field; until a task model is promoted for it, a task goes
    to the cloud and its answers are captured under its name."""

    capture: bool = False  # store cloud answers as teacher examples (a tenant's `capture` overrides it)
    tasks: list[str] = msgspec.field(default_factory=list)  # task names every tenant may send
    dir: str = ""  # teacher.sqlite and tasks.sqlite; empty: the [storage] dir
    retention_days: float = 90.0  # examples older than this are deleted; 0: kept until the size budget
    max_examples: int = 100_000  # per tenant; past it the oldest go first
    max_mb: float = 256.0  # per tenant, prompt and answer text; past it the oldest go first
    reload_s: float = 2.0  # how often the service looks for newly promoted task models (0: only at start)

    def __post_init__(self) -> None:
        _check_tasks(self.tasks)
        _check(self.retention_days >= 0, "retention_days", "must be >= 0")
        _check(self.max_examples >= 1, "max_examples", "must be >= 1")
        _check(self.max_mb > 0, "max_mb", "must be > 0")
        _check(self.reload_s >= 0, "reload_s", "must be >= 0")

    def path(self, storage: StorageConfig) -> Path:
        return Path(self.dir).expanduser() if self.dir else storage.path()


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    tenants: list[TenantConfig] = msgspec.field(default_factory=list)
    pricing: PricingConfig = msgspec.field(default_factory=PricingConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    ledger: LedgerConfig = msgspec.field(default_factory=LedgerConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    cloud: CloudConfig = msgspec.field(default_factory=CloudConfig)
    route: RouteConfig = msgspec.field(default_factory=RouteConfig)
    budget: BudgetConfig = msgspec.field(default_factory=BudgetConfig)
    distill: DistillConfig = msgspec.field(default_factory=DistillConfig)
    default_tenant: str = "local"  # the tenant of Unix-socket requests that name none

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, "tenants", f"duplicate tenant name(s) {dup}")
        if self.server.http:  # the deprecated spelling: moved to [http] listen, once
            _check(
                self.http.listen in ("", self.server.http),
                "http",
                f"[server] http ({self.server.http!r}) is the old name of [http] listen ({self.http.listen!r})",
            )
            log.warning("config: [server] http is deprecated; write [http] listen = %r instead", self.server.http)
            self.http.listen, self.server.http = self.server.http, ""

    def tenant(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)

    def cloud_for(self, tenant: str) -> CloudConfig:
        t = self.tenant(tenant)
        return t.cloud if t is not None and t.cloud is not None else self.cloud

    def cloud_sections(self) -> list[tuple[str, CloudConfig]]:
        """(field path, section) of every configured cloud: [cloud] and each tenant's own."""
        sections = [("$.cloud", self.cloud)]
        sections += [(f"$.tenants[{i}].cloud", t.cloud) for i, t in enumerate(self.tenants) if t.cloud is not None]
        return [(where, c) for where, c in sections if c.configured]

    def budget_for(self, tenant: str) -> BudgetConfig:
        t = self.tenant(tenant)
        return t.budget if t is not None and t.budget is not None else self.budget

    def captures(self, tenant: str) -> bool:
        """Are `tenant`'s cloud answers stored as teacher examples?"""
        t = self.tenant(tenant)
        return t.capture if t is not None and t.capture is not None else self.distill.capture

    def tasks_for(self, tenant: str) -> list[str]:
        """The task names configured for `tenant` ([distill].tasks and its own)."""
        t = self.tenant(tenant)
        own = t.tasks if t is not None else []
        return list(dict.fromkeys([*self.distill.tasks, *own]))

    def model_for(self, tenant: str) -> str:
        """The model a request of `tenant` that names none asks for ("" for the usual routing)."""
        t = self.tenant(tenant)
        return t.model if t is not None else ""

    def policy_for(self, tenant: str) -> RoutePolicyName:
        t = self.tenant(tenant)
        return t.route_policy if t is not None and t.route_policy is not None else self.route.policy


def _split_hostport(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hostport(value: str) -> tuple[str, int]:
    parsed = _split_hostport(value)
    if parsed is None:
        raise ConfigError(f"{value!r} is not host:port")
    return parsed


_AT = re.compile(r"^(?P<field>[A-Za-z_]+): (?P<why>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


def _field_path(err: msgspec.ValidationError) -> str:
    """Rewrite "port: must be ... - at `$.server`" as "$.server.port: must be ..."."""
    msg = str(err)
    m = _AT.match(msg)
    if m:
        return f"{m['path'] or '$'}.{m['field']}: {m['why']}"
    why, sep, path = msg.rpartition(" - at ")
    return f"{path.strip('`')}: {why}" if sep else msg


def parse_config(text: str | bytes, source: str = "<config>") -> Config:
    try:
        return msgspec.toml.decode(text, type=Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{source}: {_field_path(e)}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8 text (msgspec decodes bytes before parsing)
        raise ConfigError(f"{source}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def load_config(path: str | Path | None) -> Config:
    """The config at `path`; None gives the defaults."""
    if path is None:
        return Config()
    p = Path(path).expanduser()
    try:
        text = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    return parse_config(text, str(p))


def to_dict(cfg: Config) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(cfg)
    return result
