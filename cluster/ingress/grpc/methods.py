"""The ingress's gRPC methods (service `coe.v1.CoE` and the standard health service).

Ray Serve's gRPC proxy calls the ingress method named like the RPC, with the
request message and a `grpc_context` (Serve's `RayServegRPCContext`). Each method
turns the message into the same dict body the HTTP API parses and calls the same
`CoEService` methods, so validation, limits and errors are identical; a typed
`CoEError` becomes a gRPC status here and only here.

Serve carries what a method sets on the context (code, details, trailing
metadata) back to the client together with each returned or yielded message, so:
- unary methods set the status on the context and return an empty reply;
- a failing stream ends with one reply whose `finish_reason` is "error", which
  carries the status and its trailing metadata (raising would lose the metadata);
- Serve's context has no initial metadata, so the routing decision travels in the
  reply (the first reply of a stream) and as trailing metadata.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2

from cluster.config import ROUTED_MODEL
from cluster.ingress.api_errors import CoEError, RetryLater, Unauthorized
from cluster.ingress.auth import UNAUTHORIZED_MESSAGE, ApiKeyGate
from cluster.ingress.grpc.codegen import ensure_generated
from cluster.ingress.service import ChatStream, CoEService, Completion

ensure_generated()
from cluster.ingress.grpc.generated import coe_pb2  # noqa: E402  (exists only after ensure_generated)

logger = logging.getLogger("ray.serve")

SERVICE_NAME = "coe.v1.CoE"
# Health `service` names answered SERVING: the server as a whole, and the CoE service.
HEALTHY_SERVICES = ("", SERVICE_NAME)
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
INTERNAL_DETAILS = "internal error"
# Status details travel in an HTTP/2 trailer; a message quoting a huge bad value
# (a model name, say) must not push it past the peer's header limits.
MAX_DETAILS_CHARS = 1024
Metadata = list[tuple[str, str]]


class GrpcContext(Protocol):
    """The part of Serve's `RayServegRPCContext` the methods use."""

    def invocation_metadata(self) -> Sequence[tuple[str, str]]: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None: ...


def status_code_for(error: CoEError) -> grpc.StatusCode:
    return STATUS_CODES.get(error.status_code, grpc.StatusCode.INTERNAL)


def metadata_value(value: str) -> str:
    """ASCII-only metadata values are required; anything else is percent-encoded."""
    if value.isascii() and value.isprintable():
        return value
    return urllib.parse.quote(value, safe="")


def error_metadata(error: CoEError) -> Metadata:
    if isinstance(error, RetryLater):  # overloaded (429) or router unavailable (503)
        return [("retry-after", str(error.retry_after_s))]
    return []


def set_error(context: GrpcContext, error: CoEError, metadata: Metadata | None = None) -> None:
    """Put a typed error on the context: its gRPC code, its message, its trailers."""
    details = error.message
    if len(details) > MAX_DETAILS_CHARS:
        details = details[: MAX_DETAILS_CHARS - 3] + "..."
    context.set_code(status_code_for(error))
    context.set_details(details)
    context.set_trailing_metadata([*(metadata or []), *error_metadata(error)])


def set_internal_error(context: GrpcContext, metadata: Metadata | None = None) -> None:
    """An unexpected failure: the client learns nothing of it beyond INTERNAL."""
    context.set_code(grpc.StatusCode.INTERNAL)
    context.set_details(INTERNAL_DETAILS)
    context.set_trailing_metadata(list(metadata or []))


def routing_metadata(headers: dict[str, str]) -> Metadata:
    """The HTTP API's x-coe-* headers as gRPC metadata, under the same keys."""
    return [(key, metadata_value(value)) for key, value in headers.items()]


def _message_dicts(messages: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.HasField("name"):
            item["name"] = message.name
        out.append(item)
    return out


def chat_body(request: coe_pb2.GenerateRequest, stream: bool = False) -> dict[str, Any]:
    """The JSON body POST /v1/chat/completions would get for the same request."""
    body: dict[str, Any] = {
        "model": request.model or ROUTED_MODEL,
        "messages": _message_dicts(request.messages),
    }
    for field in ("max_tokens", "temperature", "top_p", "seed", "user"):
        if request.HasField(field):
            body[field] = getattr(request, field)
    if request.stop:
        body["stop"] = list(request.stop)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def route_body(request: coe_pb2.RouteRequest) -> dict[str, Any]:
    """The JSON body POST /v1/route would get; an empty prompt counts as absent."""
    body: dict[str, Any] = {}
    if request.prompt:
        body["prompt"] = request.prompt
    if request.messages:
        body["messages"] = _message_dicts(request.messages)
    return body


def routing_reply(coe: dict[str, Any]) -> coe_pb2.Routing:
    return coe_pb2.Routing(
        requested_model=coe["requested_model"],
        routed=coe["routed"],
        expert=coe["expert"],
        category=coe["category"],
        confidence=coe["confidence"],
        fallback=coe["fallback"],
    )


def usage_reply(usage: dict[str, int]) -> coe_pb2.Usage:
    return coe_pb2.Usage(
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
    )


def generate_reply(body: dict[str, Any]) -> coe_pb2.GenerateReply:
    """A chat completion body as a `GenerateReply`."""
    choice = body["choices"][0]
    return coe_pb2.GenerateReply(
        id=body["id"],
        model=body["model"],
        text=choice["message"]["content"],
        finish_reason=choice["finish_reason"] or "",
        usage=usage_reply(body["usage"]),
        routing=routing_reply(body["coe"]),
    )


async def stream_replies(
    chunks: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[coe_pb2.GenerateStreamReply]:
    """OpenAI chunks as stream replies: routing first, text deltas, then finish + usage."""
    finish: coe_pb2.GenerateStreamReply | None = None
    first = True
    async for chunk in chunks:
        if not chunk["choices"]:  # the usage chunk follows the finish chunk
            if finish is not None:
                finish.usage.CopyFrom(usage_reply(chunk["usage"]))
            continue
        choice = chunk["choices"][0]
        reply = coe_pb2.GenerateStreamReply(
            id=chunk["id"], model=chunk["model"], text=choice["delta"].get("content", "")
        )
        if first:
            reply.routing.CopyFrom(routing_reply(chunk["coe"]))
            first = False
        if choice["finish_reason"] is not None:
            if finish is not None:
                yield finish
            reply.finish_reason = choice["finish_reason"]
            finish = reply
            continue
        yield reply
    if finish is not None:
        yield finish


def list_experts_reply(models: dict[str, Any]) -> coe_pb2.ListExpertsReply:
    ids = [entry["id"] for entry in models["data"]]
    return coe_pb2.ListExpertsReply(
        routed_model=ROUTED_MODEL, experts=sorted(i for i in ids if i != ROUTED_MODEL)
    )


class GrpcIngressMixin:
    """gRPC methods for the ingress replica; it provides `service` and `gate`.

    Method names are the RPC names (Serve routes by name), hence the capitals.
    """

    service: CoEService
    gate: ApiKeyGate

    def _grpc_admits(self, context: GrpcContext) -> bool:
        """Check the API key; on refusal the context says UNAUTHENTICATED and nothing else."""
        if self.gate.open:
            return True
        values = [value for key, value in context.invocation_metadata() if key == "authorization"]
        if len(values) == 1 and self.gate.admits(values[0]):
            return True
        set_error(context, Unauthorized(UNAUTHORIZED_MESSAGE))
        return False

    async def Generate(
        self, request: coe_pb2.GenerateRequest, grpc_context: GrpcContext
    ) -> coe_pb2.GenerateReply:
        if not self._grpc_admits(grpc_context):
            return coe_pb2.GenerateReply()
        metadata: Metadata = []
        try:
            # The same path as HTTP: its timeout, its metrics, its errors.
            answer = await self.service.respond(chat_body(request), stream=False)
            assert isinstance(answer, Completion)
            metadata = routing_metadata(answer.headers)
            body = answer.body
        except CoEError as error:
            set_error(grpc_context, error, metadata)
            return coe_pb2.GenerateReply()
        except Exception:
            logger.exception("gRPC Generate failed")
            set_internal_error(grpc_context, metadata)
            return coe_pb2.GenerateReply()
        grpc_context.set_trailing_metadata(metadata)
        return generate_reply(body)

    async def GenerateStream(
        self, request: coe_pb2.GenerateRequest, grpc_context: GrpcContext
    ) -> AsyncIterator[coe_pb2.GenerateStreamReply]:
        failed = coe_pb2.GenerateStreamReply(finish_reason="error")
        if not self._grpc_admits(grpc_context):
            yield failed
            return
        metadata: Metadata = []
        stream: ChatStream | None = None
        try:
            stream = await self.service.open_stream(chat_body(request, stream=True))
            metadata = routing_metadata(stream.headers)
            # Set before the first reply: Serve sends the context along with it.
            grpc_context.set_trailing_metadata(metadata)
            async for reply in stream_replies(stream):
                yield reply
        except CoEError as error:
            set_error(grpc_context, error, metadata)
            yield failed
        except Exception:
            logger.exception("gRPC GenerateStream failed")
            set_internal_error(grpc_context, metadata)
            yield failed
        finally:
            if stream is not None:
                await stream.aclose()  # a client that went away frees the expert

    async def Route(
        self, request: coe_pb2.RouteRequest, grpc_context: GrpcContext
    ) -> coe_pb2.RouteReply:
        if not self._grpc_admits(grpc_context):
            return coe_pb2.RouteReply()
        try:
            decision = await self.service.route(route_body(request))
        except CoEError as error:
            set_error(grpc_context, error)
            return coe_pb2.RouteReply()
        except Exception:
            logger.exception("gRPC Route failed")
            set_internal_error(grpc_context)
            return coe_pb2.RouteReply()
        return coe_pb2.RouteReply(
            expert=decision["expert"],
            category=decision["category"],
            confidence=decision["confidence"],
            fallback=decision["fallback"],
            scores=decision.get("scores") or {},
        )

    async def ListExperts(
        self, request: coe_pb2.ListExpertsRequest, grpc_context: GrpcContext
    ) -> coe_pb2.ListExpertsReply:
        if not self._grpc_admits(grpc_context):
            return coe_pb2.ListExpertsReply()
        return list_experts_reply(self.service.models())

    # grpc.health.v1.Health: open without a key, like GET /healthz.

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: GrpcContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in HEALTHY_SERVICES:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service[:100]!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def List(
        self, request: health_pb2.HealthListRequest, grpc_context: GrpcContext
    ) -> health_pb2.HealthListResponse:
        serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        return health_pb2.HealthListResponse(statuses={name: serving for name in HEALTHY_SERVICES})

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: GrpcContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Not offered: UNIMPLEMENTED tells health-checking clients to use Check."""
        grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        grpc_context.set_details("Watch is not supported; use Check")
        raise NotImplementedError("Watch is not supported; use Check")
        yield health_pb2.HealthCheckResponse()  # pragma: no cover  (makes this a generator)
