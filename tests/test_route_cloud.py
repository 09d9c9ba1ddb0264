"""Cloud backends against a real HTTP server on loopback (tests/fake_cloud.py): retries, Retry-After,
circuit breaker, stalls, malformed answers, and the OpenAI and Anthropic shapes, whole and streamed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fake_cloud import Answer, FakeCloud, anthropic_stream, json_answer, openai_stream, sse

from appliance.cloud.anthropic import AnthropicProvider
from appliance.cloud.breaker import CircuitBreaker
from appliance.cloud.client import CloudBackend, RetryPolicy, retry_after_s
from appliance.cloud.openai import OpenAIProvider
from appliance.cloud.provider import Provider
from appliance.cloud.types import CloudError, Reply
from appliance.common.config import CloudConfig, ConfigError, PricingConfig, parse_config
from appliance.engine.sampling import SamplingOptions

OPTS = SamplingOptions(max_tokens=32, temperature=0)
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def cloud() -> Iterator[FakeCloud]:
    c = FakeCloud()
    yield c
    c.close()


def _run(
    provider: Provider,
    *,
    retries: int = 2,
    breaker: CircuitBreaker | None = None,
    timeout: float = 5.0,
    slept: list[float] | None = None,
) -> tuple[list[str | Reply], list[float]]:
    """Stream one request; returns the items and the delays the backend slept between attempts."""
    slept = [] if slept is None else slept

    async def sleep(s: float) -> None:
        slept.append(s)

    async def go() -> list[str | Reply]:
        async with httpx.AsyncClient() as http:
            backend = CloudBackend(
                provider,
                http,
                timeout=httpx.Timeout(timeout, connect=2.0),
                retry=RetryPolicy(max_retries=retries, backoff_s=0.05, backoff_max_s=5.0),
                breaker=breaker or CircuitBreaker(10, 60.0),
                sleep=sleep,
            )
            return [item async for item in backend.stream(MESSAGES, OPTS)]

    return asyncio.run(go()), slept


def _openai(cloud: FakeCloud) -> OpenAIProvider:
    return OpenAIProvider(cloud.url, "gpt-test", "sk-secret-test-key")


def _reply(items: list[str | Reply]) -> Reply:
    assert isinstance(items[-1], Reply)
    return items[-1]


def test_openai_stream_text_usage_and_key_header(cloud: FakeCloud) -> None:
    usage = {"prompt_tokens": 1200, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1024}}
    cloud.script = [Answer(events=openai_stream(["Hel", "lo", "!"], usage))]
    items, slept = _run(_openai(cloud))
    assert items[:3] == ["Hel", "lo", "!"] and slept == []
    reply = _reply(items)
    assert reply.text == "Hello!" and reply.finish_reason == "stop" and reply.model == "gpt-test"
    assert (reply.usage.input_tokens, reply.usage.cache_read_tokens, reply.usage.output_tokens) == (176, 1024, 7)
    path, headers, body = cloud.requests[0]
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer sk-secret-test-key"
    assert body["stream"] is True and body["messages"] == MESSAGES and body["max_tokens"] == 32


def test_429_retry_after_is_honoured_then_success(cloud: FakeCloud) -> None:
    cloud.script = [
        Answer(status=429, body=b"slow down", headers={"retry-after": "2"}),
        Answer(events=openai_stream(["ok"])),
    ]
    items, slept = _run(_openai(cloud))
    assert _reply(items).text == "ok"
    assert slept == [2.0] and len(cloud.requests) == 2


def test_retry_after_longer_than_the_cap_is_not_waited_for(cloud: FakeCloud) -> None:
    cloud.script = [Answer(status=429, body=b"later", headers={"retry-after": "120"})]
    with pytest.raises(CloudError, match="asked to retry after 120 s"):
        _run(_openai(cloud))
    assert len(cloud.requests) == 1


def test_500s_retry_with_jittered_backoff_then_fail_naming_the_status(cloud: FakeCloud) -> None:
    cloud.script = [Answer(status=500, body=b"boom")] * 3
    slept: list[float] = []
    with pytest.raises(CloudError) as e:
        _run(_openai(cloud), retries=2, slept=slept)
    assert e.value.kind == "http" and "HTTP 500" in str(e.value)
    assert len(cloud.requests) == 3
    assert len(slept) == 2 and 0 <= slept[0] <= 0.05 and 0 <= slept[1] <= 0.1  # full jitter under 0.05 * 2^n


def test_400_is_not_retried(cloud: FakeCloud) -> None:
    cloud.script = [json_answer({"error": {"message": "bad model"}}, status=400)]
    with pytest.raises(CloudError, match="HTTP 400"):
        _run(_openai(cloud))
    assert len(cloud.requests) == 1


def test_circuit_opens_after_repeated_failures_and_stops_calling(cloud: FakeCloud) -> None:
    breaker = CircuitBreaker(2, 60.0)
    cloud.script = [Answer(status=503, body=b"down")] * 2
    with pytest.raises(CloudError):
        _run(_openai(cloud), retries=1, breaker=breaker)
    assert breaker.state == "open" and len(cloud.requests) == 2
    with pytest.raises(CloudError) as e:
        _run(_openai(cloud), breaker=breaker)
    assert e.value.kind == "circuit_open" and len(cloud.requests) == 2  # nothing sent


def test_breaker_half_open_trial_closes_on_success() -> None:
    now = [0.0]
    b = CircuitBreaker(1, 10.0, clock=lambda: now[0])
    b.failure()
    assert b.state == "open" and not b.allow()
    now[0] = 11.0
    assert b.allow() and not b.allow()  # one trial at a time
    b.success()
    assert b.state == "closed" and b.allow()


def test_stall_times_out_with_a_clear_error(cloud: FakeCloud) -> None:
    cloud.script = [Answer(events=openai_stream(["late"]), stall_s=1.5)]
    with pytest.raises(CloudError) as e:
        _run(_openai(cloud), retries=0, timeout=0.3)
    assert e.value.kind == "timeout" and "timed out" in str(e.value)


def test_malformed_json_in_stream_and_body(cloud: FakeCloud) -> None:
    cloud.script = [Answer(events=sse((None, "{not json")))]
    with pytest.raises(CloudError) as e:
        _run(_openai(cloud), retries=0)
    assert e.value.kind == "malformed" and "not JSON" in str(e.value)
    cloud.script = [json_answer({"choices": []})]
    with pytest.raises(CloudError, match=r"no choices\.0"):
        _run(_openai(cloud), retries=0)


def test_stream_cut_before_its_end_event_is_an_error(cloud: FakeCloud) -> None:
    cloud.script = [Answer(events=openai_stream(["partial"])[:1])]
    with pytest.raises(CloudError, match="ended before its end event"):
        _run(_openai(cloud), retries=0)


def test_connection_refused_is_a_connect_error() -> None:
    provider = OpenAIProvider("http://127.0.0.1:9/v1", "m", "")
    with pytest.raises(CloudError) as e:
        _run(provider, retries=1)
    assert e.value.kind == "connect" and "cannot reach" in str(e.value)


def test_anthropic_stream_with_cache_usage(cloud: FakeCloud) -> None:
    usage = {"input_tokens": 20, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 0, "output_tokens": 1}
    cloud.script = [Answer(events=anthropic_stream(["Bon", "jour"], usage, output_tokens=9, stop="max_tokens"))]
    items, _ = _run(AnthropicProvider(cloud.url, "claude-test", "ant-key"))
    reply = _reply(items)
    assert items[:2] == ["Bon", "jour"] and reply.text == "Bonjour" and reply.finish_reason == "length"
    u = reply.usage
    assert (u.input_tokens, u.cache_read_tokens, u.cache_write_tokens, u.output_tokens) == (20, 3000, 0, 9)
    path, headers, _ = cloud.requests[0]
    assert path == "/v1/messages" and headers["x-api-key"] == "ant-key" and headers["anthropic-version"]


def test_anthropic_whole_json_answer_and_error_event(cloud: FakeCloud) -> None:
    body = {
        "type": "message",
        "model": "claude-test",
        "content": [
            {"type": "text", "text": "Hi "},
            {"type": "tool_use", "id": "x"},
            {"type": "text", "text": "there"},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 5, "cache_creation_input_tokens": 2048, "output_tokens": 2},
    }
    cloud.script = [json_answer(body)]
    reply = _reply(_run(AnthropicProvider(cloud.url, "claude-test", ""))[0])
    assert reply.text == "Hi there" and reply.usage.cache_write_tokens == 2048
    cloud.script = [
        Answer(events=sse(("error", {"type": "error", "error": {"type": "invalid_request_error", "message": "nope"}})))
    ]
    with pytest.raises(CloudError, match="invalid_request_error: nope"):
        _run(AnthropicProvider(cloud.url, "claude-test", ""), retries=0)


def test_anthropic_cache_breakpoints_on_stable_prefix() -> None:
    p = AnthropicProvider("http://x/v1", "m", "", cache_min_chars=100)
    long_system = "You are a support agent. " * 10
    messages = [
        {"role": "system", "content": long_system},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
    ]
    body: dict[str, Any] = p.body(messages, OPTS)
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    turns = body["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"][-1]["cache_control"] == {"type": "ephemeral"}  # end of the stable prefix
    assert "cache_control" not in turns[2]["content"][-1]  # the new turn is not cached
    short = p.body([{"role": "system", "content": "short"}, {"role": "user", "content": "q"}], OPTS)
    assert "cache_control" not in short["system"][0]


def test_retry_after_http_date() -> None:
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s("garbage") is None and retry_after_s("3.5") == 3.5


def test_cache_prices_in_billed_cost() -> None:
    p = PricingConfig(input_per_mtok=3.0, cached_input_per_mtok=0.3, cache_write_per_mtok=3.75, output_per_mtok=15.0)
    assert p.billed_cost(1_000_000, 0, 0, 0) == pytest.approx(3.0)
    assert p.billed_cost(0, 1_000_000, 0, 0) == pytest.approx(0.3)  # reads: a tenth
    assert p.billed_cost(0, 0, 1_000_000, 0) == pytest.approx(3.75)  # writes: above input


def test_cloud_config_errors_name_the_field_and_never_the_key(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"\$\.cloud\.model: must be set"):
        parse_config('[cloud]\nbase_url = "http://h/v1"\n')
    with pytest.raises(ConfigError, match=r"\$\.cloud\.base_url"):
        parse_config('[cloud]\nbase_url = "ftp://h"\nmodel = "m"\n')
    monkeypatch.delenv("ROUTE_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="ROUTE_TEST_KEY is unset"):
        CloudConfig(base_url="http://h/v1", model="m", api_key_env="ROUTE_TEST_KEY").api_key()
    key = tmp_path / "key"
    key.write_text("sk-very-secret\n")
    assert CloudConfig(base_url="http://h/v1", model="m", api_key_file=str(key)).api_key() == "sk-very-secret"


def test_serve_refuses_to_start_without_the_cloud_key(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    monkeypatch.delenv("ROUTE_MISSING_KEY", raising=False)
    cfg = tmp_path / "a.toml"
    cfg.write_text('[cloud]\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "m"\napi_key_env = "ROUTE_MISSING_KEY"\n')
    out = subprocess.run([sys.executable, "-m", "appliance", "serve", "-c", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "$.cloud.api_key_env: environment variable ROUTE_MISSING_KEY is unset" in out.stderr
