"""`tools` / `tool_choice` on /v1/chat/completions pass through to the cloud (a real loopback HTTP
cloud, tests/fake_cloud.py) and its tool calls come back in OpenAI's shape, whole and streamed, through
the official `openai` client; the caller's tool results go to the cloud verbatim on the next turn.
Without a cloud the request is a 400 naming `tools` (tests/test_http_edge.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fake_cloud import Answer, FakeCloud, fake_cloud, json_answer, sse
from test_http_edge import with_http
from test_service_support import TOKENS, ServerProcess, write_config

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
USAGE = {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}


cloud = pytest.fixture(scope="module")(fake_cloud)


@pytest.fixture(scope="module")
def client(tiny_model: Any, cloud: FakeCloud, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    d = tmp_path_factory.mktemp("tools")
    cfg = with_http(write_config(d / "appliance.toml", tiny_model("gemma3", n_ctx_train=8192)))
    with cfg.open("a") as f:
        f.write(f'[cloud]\nprovider = "openai"\nbase_url = "{cloud.url}"\nmodel = "gpt-test"\nmax_retries = 0\n')
    srv = ServerProcess(cfg)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key=TOKENS["acme"], max_retries=0)
    assert srv.stop() == 0


def _streamed_call() -> list[str]:
    """The call as OpenAI streams it: id and name first, the arguments in pieces."""
    pieces = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
    ]
    events: list[tuple[str | None, Any]] = [
        (None, {"model": "gpt-test", "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]})
    ]
    events += [(None, {"model": "gpt-test", "choices": [{"index": 0, "delta": {"tool_calls": [p]}}]}) for p in pieces]
    events.append((None, {"model": "gpt-test", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    events += [(None, {"model": "gpt-test", "choices": [], "usage": USAGE}), (None, "[DONE]")]
    return sse(*events)


def test_tool_calls_come_back_whole(client: openai.OpenAI, cloud: FakeCloud) -> None:
    """A cloud that answers in one JSON body (no stream): the call, finish_reason tool_calls."""
    message = {"role": "assistant", "content": None, "tool_calls": [CALL]}
    choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
    cloud.script.append(json_answer({"model": "gpt-test", "choices": [choice], "usage": USAGE}))
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="appliance", messages=messages, tools=[WEATHER], tool_choice="auto")
    assert r.choices[0].finish_reason == "tool_calls"
    calls = r.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].id == "call_1" and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    assert r.model_extra is not None and r.model_extra["appliance"]["route"] == "cloud"
    _, _, sent = cloud.requests[-1]
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto" and sent["messages"] == messages


def test_tool_calls_stream_and_results_go_back(client: openai.OpenAI, cloud: FakeCloud) -> None:
    """Streamed: the pieces of the call come back as one OpenAI tool_calls delta; then the caller's tool
    result and the assistant's call go to the cloud verbatim, and its text answer streams back."""
    cloud.script.append(Answer(events=_streamed_call()))
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    stream = client.chat.completions.create(model="appliance", messages=messages, tools=[WEATHER], stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0].tool_calls is not None
    call = deltas[0].tool_calls[0]
    assert call.index == 0 and call.id == "call_1" and call.function is not None
    assert call.function.name == "get_weather" and json.loads(call.function.arguments or "") == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    cloud.script.append(
        Answer(
            events=sse(
                (
                    None,
                    {
                        "model": "gpt-test",
                        "choices": [{"index": 0, "delta": {"content": "Sunny, 21 C."}, "finish_reason": "stop"}],
                    },
                ),
                (None, "[DONE]"),
            )
        )
    )
    turn: list[Any] = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "c": 21}'},
    ]
    r = client.chat.completions.create(model="appliance", messages=turn, tools=[WEATHER])
    assert r.choices[0].message.content == "Sunny, 21 C." and r.choices[0].finish_reason == "stop"
    _, _, sent = cloud.requests[-1]
    assert sent["messages"] == [{k: v for k, v in m.items() if v is not None} for m in turn]  # null: left out
    assert sent["tools"] == [WEATHER]


def test_tools_with_the_local_model_named_are_refused(client: openai.OpenAI) -> None:
    local = next(m.id for m in client.models.list().data if m.id not in ("appliance", "gpt-test"))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=local, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER])
    assert e.value.body["param"] == "tools"  # type: ignore[index]
