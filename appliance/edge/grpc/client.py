"""A small synchronous client for the Appliance service (used by `appliance chat`, the bench and tests).

with Client.connect("unix:/path/appliance.sock") as c:
    print(c.generate(prompt="Hello", max_tokens=16).text)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from appliance.edge.grpc.proto import SERVICE, pb2


def target_for_socket(path: str) -> str:
    return f"unix:{path}"


class Client:
    def __init__(self, channel: grpc.Channel, token: str | None = None) -> None:
        self.channel = channel
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        pb = pb2()
        req = pb.GenerateRequest.SerializeToString
        self._generate = channel.unary_unary(
            f"/{SERVICE}/Generate", request_serializer=req, response_deserializer=pb.GenerateResponse.FromString
        )
        self._stream = channel.unary_stream(
            f"/{SERVICE}/GenerateStream", request_serializer=req, response_deserializer=pb.GenerateChunk.FromString
        )
        self._chat = channel.unary_stream(
            f"/{SERVICE}/Chat", request_serializer=req, response_deserializer=pb.GenerateChunk.FromString
        )
        self._embed = channel.unary_unary(
            f"/{SERVICE}/Embed",
            request_serializer=pb.EmbedRequest.SerializeToString,
            response_deserializer=pb.EmbedResponse.FromString,
        )
        self._usage = channel.unary_unary(
            f"/{SERVICE}/GetUsage",
            request_serializer=pb.UsageRequest.SerializeToString,
            response_deserializer=pb.UsageResponse.FromString,
        )
        self._health_check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    @classmethod
    def connect(cls, target: str, token: str | None = None, max_message_bytes: int = 4 * 1024 * 1024) -> Client:
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        return cls(grpc.insecure_channel(target, options=opts), token)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @staticmethod
    def request(
        *,
        prompt: str = "",
        messages: Sequence[tuple[str, str]] = (),
        tenant: str = "",
        session_id: str = "",
        request_id: str = "",
        context: Sequence[tuple[str, float]] = (),
        route_policy: int = 0,
        cache_policy: int = 0,
        max_cost: float | None = None,
        model: str = "",
        **sampling: Any,
    ) -> Any:
        pb = pb2()
        msg = pb.GenerateRequest(
            prompt=prompt,
            messages=[pb.Message(role=r, content=c) for r, c in messages],
            tenant=tenant,
            session_id=session_id,
            request_id=request_id,
            context=[pb.ContextItem(text=t, score=s) for t, s in context],
            route_policy=route_policy,
            cache_policy=cache_policy,
            sampling=pb.Sampling(**sampling),
            model=model,
        )
        if max_cost is not None:
            msg.max_cost = max_cost
        return msg

    def generate(self, timeout: float | None = 60.0, **kw: Any) -> Any:
        return self._generate(self.request(**kw), timeout=timeout, metadata=self._metadata)

    def stream(self, timeout: float | None = 60.0, **kw: Any) -> Iterator[Any]:
        call: Iterator[Any] = self._stream(self.request(**kw), timeout=timeout, metadata=self._metadata)
        return call

    def chat(self, timeout: float | None = 120.0, **kw: Any) -> Iterator[Any]:
        call: Iterator[Any] = self._chat(self.request(**kw), timeout=timeout, metadata=self._metadata)
        return call

    def embed(self, texts: Sequence[str], tenant: str = "", timeout: float | None = 30.0) -> Any:
        return self._embed(
            pb2().EmbedRequest(texts=list(texts), tenant=tenant), timeout=timeout, metadata=self._metadata
        )

    def usage(self, tenant: str = "", since: int = 0, until: int = 0, timeout: float | None = 30.0) -> Any:
        req = pb2().UsageRequest(tenant=tenant, since_unix=since, until_unix=until)
        return self._usage(req, timeout=timeout, metadata=self._metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... of `service` ('' = the whole server)."""
        resp = self._health_check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
