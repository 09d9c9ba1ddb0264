"""Normalize stage: a face's `GenerateInput` (from a protobuf GenerateRequest, an OpenAI or Ollama body)
becomes a validated `Request`; an error names the field. The one validation path of every face."""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from typing import Any, get_args

import msgspec

from appliance.common.errors import InvalidArgument
from appliance.common.types import (
    ROLES,
    CachePolicy,
    ChatMessage,
    GenerateInput,
    Passage,
    Request,
    RoutePolicy,
    SamplingInput,
)
from appliance.engine.core import to_utf8
from appliance.engine.sampling import ExitMode, SamplingOptions

_CACHE: tuple[CachePolicy, ...] = get_args(CachePolicy)
_ROUTE: tuple[RoutePolicy, ...] = get_args(RoutePolicy)
_EXIT: tuple[ExitMode, ...] = get_args(ExitMode)
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_STOP = 16
MAX_USER = 256
# integer ranges of the gRPC API's fields (uint32, uint64), for faces whose numbers are unbounded (JSON)
_INT_RANGE = {"max_tokens": 2**32, "top_k": 2**32, "seed": 2**64}


def _text(value: str, field: str) -> str:
    try:
        return to_utf8(value, field)
    except ValueError as e:
        raise InvalidArgument(field, str(e)) from None


def _early_exit(msg: SamplingInput, default_exit: ExitMode | None) -> dict[str, Any]:
    """default_exit: the server's mode, or None when the model has no early-exit calibration."""
    if msg.early_exit and msg.early_exit not in _EXIT:
        raise InvalidArgument("sampling.early_exit", f"unknown value {msg.early_exit}")
    mode: ExitMode = next((m for m in _EXIT if m == msg.early_exit), default_exit or "off")
    if mode != "off" and default_exit is None:
        raise InvalidArgument(
            "sampling.early_exit", "the local model has no early-exit calibration (appliance models calibrate-exit)"
        )
    values: dict[str, Any] = {"early_exit": mode}
    if msg.exit_threshold is not None:
        if not (math.isfinite(msg.exit_threshold) and 0.0 <= msg.exit_threshold <= 1.0):
            raise InvalidArgument("sampling.exit_threshold", "must be in [0, 1]")
        values["exit_threshold"] = msg.exit_threshold
    return values


def _sampling(msg: SamplingInput, default_max_tokens: int, default_exit: ExitMode | None) -> SamplingOptions:
    base = SamplingOptions(max_tokens=default_max_tokens)
    values: dict[str, Any] = _early_exit(msg, default_exit)
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"):
        value = getattr(msg, name)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"sampling.{name}", "must be a finite number")
        if isinstance(value, int) and name in _INT_RANGE and not 0 <= value < _INT_RANGE[name]:
            raise InvalidArgument(f"sampling.{name}", f"must be in [0, {_INT_RANGE[name]})")
        values[name] = value
    values["logprobs"] = msg.logprobs
    if len(msg.stop) > MAX_STOP:
        raise InvalidArgument("sampling.stop", f"at most {MAX_STOP} stop strings")
    values["stop"] = tuple(_text(s, f"sampling.stop[{i}]") for i, s in enumerate(msg.stop))
    values["grammar"] = _text(msg.grammar, "sampling.grammar")
    opts = SamplingOptions(**{**{f: getattr(base, f) for f in base.__struct_fields__}, **values})
    try:
        opts.validate()
    except ValueError as e:
        name = str(e).split()[2].split("=")[0]  # "sampling option NAME=VALUE why"
        raise InvalidArgument(f"sampling.{name}", str(e)) from None
    return opts


def normalize(
    msg: GenerateInput, tenant: str, *, chat: bool, default_max_tokens: int, default_exit: ExitMode | None = None
) -> Request:
    request_id = msg.request_id or uuid.uuid4().hex
    if not _ID.fullmatch(request_id):
        raise InvalidArgument("request_id", "must be 1-128 characters of [A-Za-z0-9_.:-]")
    prompt = _text(msg.prompt, "prompt")
    messages = []
    for i, m in enumerate(msg.messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {m.role!r}")
        messages.append(ChatMessage(m.role, _text(m.content, f"messages[{i}].content")))
    if chat:
        if not msg.session_id:
            raise InvalidArgument("session_id", "Chat needs a session_id")
        if not _ID.fullmatch(msg.session_id):
            raise InvalidArgument("session_id", "must be 1-128 characters of [A-Za-z0-9_.:-]")
        if prompt:
            raise InvalidArgument("prompt", "Chat takes messages, not a prompt")
        if not any(m.role == "user" for m in messages):
            raise InvalidArgument("messages", "Chat needs at least one user message")
    elif bool(prompt) == bool(messages):
        raise InvalidArgument("prompt", "give either a prompt or messages (exactly one)")
    passages = []
    for i, c in enumerate(msg.context):
        if not math.isfinite(c.score):
            raise InvalidArgument(f"context[{i}].score", "must be a finite number")
        passages.append(Passage(_text(c.text, f"context[{i}].text"), c.score))
    cache_policy = next((p for p in _CACHE if p == msg.cache_policy), None)
    if cache_policy is None:
        raise InvalidArgument("cache_policy", f"unknown value {msg.cache_policy}")
    route_policy = next((p for p in _ROUTE if p == msg.route_policy), None)
    if route_policy is None:
        raise InvalidArgument("route_policy", f"unknown value {msg.route_policy}")
    sampling = _sampling(msg.sampling, default_max_tokens, default_exit)
    if sampling.grammar:
        # grammar-constrained output is decoded by the local model; a cloud (or the cascade's
        # escalation to one) could not keep to the grammar
        if route_policy == "cloud_only":
            raise InvalidArgument(
                "sampling.grammar", "grammar-constrained output is made by the local model; route_policy is cloud_only"
            )
        route_policy = "local_only"
    if msg.tools:  # tool calling is the cloud's: the request passes through to it, never cached
        if route_policy == "local_only":
            raise InvalidArgument("tools", "tool calling is answered by the cloud; this request must stay local")
        route_policy, cache_policy = "cloud_only", "skip"
    max_cost = msg.max_cost
    if max_cost is not None and not (math.isfinite(max_cost) and max_cost >= 0):
        raise InvalidArgument("max_cost", "must be a finite number >= 0")
    user = _text(msg.user, "user")
    if len(user) > MAX_USER:
        raise InvalidArgument("user", f"at most {MAX_USER} characters")
    return Request(
        request_id=request_id,
        tenant=tenant,
        prompt=prompt,
        messages=tuple(messages),
        session_id=msg.session_id,
        chat=chat,
        sampling=sampling,
        cache_policy=cache_policy,
        route_policy=route_policy,
        max_cost=max_cost,
        context=tuple(passages),
        user=user,
        tools=msg.tools,
    )


def request_hash(req: Request) -> str:
    """The normalized request without its ids: a retry under the same request_id must have the same."""
    blob = msgspec.json.encode(msgspec.structs.replace(req, request_id="", tenant=""), order="sorted")
    return hashlib.sha256(blob).hexdigest()[:32]
