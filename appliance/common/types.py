"""The pipeline's own request and result types. A face turns its protocol's message (a protobuf
GenerateRequest, an OpenAI or Ollama JSON body) into a `GenerateInput`; the normalize stage validates
that into a `Request`, so every face shares one validation path and one set of field names."""

from __future__ import annotations

from typing import Literal

import msgspec

from appliance.engine.sampling import SamplingOptions

CachePolicy = Literal["auto", "skip", "read_only"]
RoutePolicy = Literal["auto", "local_only", "cloud_only"]
RouteTaken = Literal["cache", "local", "cloud"]
ROLES = ("system", "user", "assistant")


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class Passage(msgspec.Struct, frozen=True):
    """A context item given with a request; kept by score within the budget."""

    text: str
    score: float


class SamplingInput(msgspec.Struct, frozen=True, kw_only=True):
    """Sampling as a face received it, not yet validated; None: the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    early_exit: str = ""  # "", "off", "lossless", "adaptive" ("": the server's default)
    exit_threshold: float | None = None
    logprobs: bool = False  # the caller wants each token's log-probability (local answers)
    # GBNF every generated token must follow (a face's JSON mode: engine.grammar.json_grammar); "": none.
    # Answered by the local model only (normalize makes the route local_only, refuses cloud_only)
    grammar: str = ""


class GenerateInput(msgspec.Struct, frozen=True, kw_only=True):
    """One request as a face received it (field names are normalize's: errors name them), not yet
    validated. Policies are names ("auto", "skip", ...); an unknown one is refused by normalize."""

    request_id: str = ""
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    session_id: str = ""
    context: tuple[Passage, ...] = ()
    sampling: SamplingInput = SamplingInput()
    cache_policy: str = "auto"
    route_policy: str = "auto"
    max_cost: float | None = None
    user: str = ""  # the end user the calling app names (OpenAI's `user`): written to the ledger
    # the model the request names: "" (the service routes), a task name (distillation), the local
    # model's or the tenant's cloud model's name; the pipeline resolves it (unknown: NOT_FOUND)
    model: str = ""
    # an OpenAI tool request (JSON: tools, tool_choice, the caller's messages verbatim), passed through
    # to the cloud as it is: such a request is answered by the cloud only
    tools: str = ""


class Request(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    tenant: str
    prompt: str = ""  # a raw completion prompt, or
    messages: tuple[ChatMessage, ...] = ()  # chat messages (for Chat: this turn's new messages)
    session_id: str = ""  # Chat: the conversation to continue
    chat: bool = False  # a session-aware Chat request
    sampling: SamplingOptions = SamplingOptions()
    cache_policy: CachePolicy = "auto"
    route_policy: RoutePolicy = "auto"
    max_cost: float | None = None
    context: tuple[Passage, ...] = ()
    user: str = ""  # the calling app's end user, for the ledger
    task: str = ""  # the task the request names (its answers are captured and served under it)
    task_model: str = ""  # a task model the request names itself: served under its adapter, as asked
    tools: str = ""  # an OpenAI tool request passed through to the cloud (GenerateInput.tools)


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a cache (local prefix cache or provider cache reads)
    cache_write_tokens: int = 0  # prompt tokens the cloud provider wrote to its prompt cache
    completion_tokens: int = 0
    cost: float = 0.0
    counterfactual_cost: float = 0.0
    summary_saved_tokens: int = 0
    early_exit_tokens: int = 0
    layers_per_token: float = 0.0
    draft_acceptance: float = 0.0
    latency_ms: float = 0.0
    first_token_ms: float = 0.0


class Result(msgspec.Struct, kw_only=True):
    request_id: str
    text: str
    route: RouteTaken
    model: str
    finish_reason: str
    usage: Usage
    session_id: str = ""
    degraded: bool = False  # the router wanted the cloud but could not have it: answered locally
    replayed: bool = False  # the stored answer of an earlier request with this request_id (a retry)
    route_reason: str = ""  # policy, router, cascade, context_overflow, no_cloud, circuit_open, cloud_error, budget_*
    task: str = ""  # the task the request named
    # a task model's local answer: did it pass the confidence rule (None: no rule was applied)
    confident: bool | None = None
    tool_calls: str = ""  # the cloud's calls of the request's tools, as OpenAI's JSON list


class TokenLogprob(msgspec.Struct, frozen=True):
    """A generated token's text (bytes: UTF-8 pieces may split a character) and log-probability."""

    piece: bytes
    logprob: float


class Delta(msgspec.Struct, frozen=True):
    """A piece of streamed text; `logprobs`: its tokens', when the request asked (local answers)."""

    request_id: str
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
