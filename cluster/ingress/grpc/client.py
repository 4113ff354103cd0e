"""A small typed client of the cluster's gRPC API, and its command line.

    python -m cluster.ingress.grpc.client --port 9000 "What is 2+2?"
    python -m cluster.ingress.grpc.client --port 9000 --stream "Write a haiku about tea"
    python -m cluster.ingress.grpc.client --port 9000 --route "Integrate x^2"
    python -m cluster.ingress.grpc.client --port 9000 --list
    python -m cluster.ingress.grpc.client --port 9000 --health

The API key, when the cluster has one, is read from $COE_API_KEY (never from the
command line, where other users could see it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.ingress.grpc.codegen import ensure_generated

ensure_generated()
from cluster.ingress.grpc.generated import coe_pb2, coe_pb2_grpc  # noqa: E402

Metadata = tuple[tuple[str, str], ...]


def chat_request(
    prompt: str,
    model: str = "coe",
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
) -> coe_pb2.GenerateRequest:
    """A one-turn request; unset numbers take the server's defaults."""
    messages = [coe_pb2.ChatMessage(role="user", content=prompt)]
    if system is not None:
        messages.insert(0, coe_pb2.ChatMessage(role="system", content=system))
    request = coe_pb2.GenerateRequest(model=model, messages=messages, stop=list(stop))
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    return request


class CoEClient:
    """Blocking client; every call raises `grpc.RpcError` with the server's status."""

    def __init__(
        self,
        target: str = "127.0.0.1:9000",
        api_key: str | None = None,
        application: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = coe_pb2_grpc.CoEStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s
        metadata: list[tuple[str, str]] = []
        if api_key:
            metadata.append(("authorization", f"Bearer {api_key}"))
        if application:  # needed only when Serve runs more than one application
            metadata.append(("application", application))
        self.metadata: Metadata = tuple(metadata)

    def generate(self, request: coe_pb2.GenerateRequest) -> coe_pb2.GenerateReply:
        reply, _ = self.generate_with_metadata(request)
        return reply

    def generate_with_metadata(
        self, request: coe_pb2.GenerateRequest
    ) -> tuple[coe_pb2.GenerateReply, dict[str, str]]:
        """The reply and its trailing metadata (x-coe-expert, x-coe-category, ...)."""
        reply, call = self.stub.Generate.with_call(
            request, metadata=self.metadata, timeout=self.timeout_s
        )
        trailing = {str(key): str(value) for key, value in call.trailing_metadata() or ()}
        return reply, trailing

    def stream(self, request: coe_pb2.GenerateRequest) -> Iterator[coe_pb2.GenerateStreamReply]:
        """Replies as they come: routing first, text deltas, then finish_reason and usage."""
        yield from self.stub.GenerateStream(request, metadata=self.metadata, timeout=self.timeout_s)

    def route(self, prompt: str) -> coe_pb2.RouteReply:
        request = coe_pb2.RouteRequest(prompt=prompt)
        reply: coe_pb2.RouteReply = self.stub.Route(
            request, metadata=self.metadata, timeout=self.timeout_s
        )
        return reply

    def list_experts(self) -> coe_pb2.ListExpertsReply:
        reply: coe_pb2.ListExpertsReply = self.stub.ListExperts(
            coe_pb2.ListExpertsRequest(), metadata=self.metadata, timeout=self.timeout_s
        )
        return reply

    def health(self, service: str = "") -> str:
        """The standard health check: "SERVING" when the ingress answers."""
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CoEClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _describe(routing: coe_pb2.Routing) -> str:
    fallback = ", fallback" if routing.fallback else ""
    return (
        f"[expert {routing.expert}, category {routing.category}, "
        f"confidence {routing.confidence:.2f}{fallback}]"
    )


def _run(client: CoEClient, args: argparse.Namespace) -> None:
    if args.health:
        print(client.health())
        return
    if args.list:
        reply = client.list_experts()
        print("\n".join([reply.routed_model, *reply.experts]))
        return
    if not args.prompt:
        raise SystemExit("a prompt is required (or --list / --health)")
    if args.route:
        decision = client.route(args.prompt)
        scores = ", ".join(f"{name} {score:.2f}" for name, score in sorted(decision.scores.items()))
        print(
            f"{decision.expert} (category {decision.category}, confidence "
            f"{decision.confidence:.2f}{', fallback' if decision.fallback else ''}) {scores}"
        )
        return
    request = chat_request(args.prompt, model=args.model, max_tokens=args.max_tokens)
    if args.stream:
        for part in client.stream(request):
            if part.HasField("routing"):
                print(_describe(part.routing), file=sys.stderr)
            print(part.text, end="", flush=True)
            if part.finish_reason:
                print(
                    f"\n[{part.finish_reason}, {part.usage.total_tokens} tokens]", file=sys.stderr
                )
        return
    reply = client.generate(request)
    print(_describe(reply.routing), file=sys.stderr)
    print(reply.text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.ingress.grpc.client",
        description="Talk to the CoE cluster over gRPC.",
    )
    parser.add_argument("prompt", nargs="?", help="the user message")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="the cluster's serve.grpc_port")
    parser.add_argument("--model", default="coe", help="'coe' to route, or an expert's name")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--application", default=None, help="Serve application name, if many")
    parser.add_argument("--api-key-env", default="COE_API_KEY", help="variable holding the key")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true", help="print the answer as it comes")
    mode.add_argument("--route", action="store_true", help="only show the routing decision")
    mode.add_argument("--list", action="store_true", help="list the models")
    mode.add_argument("--health", action="store_true", help="the standard health check")
    args = parser.parse_args(argv)
    target = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    api_key = os.environ.get(args.api_key_env) or None
    with CoEClient(target, api_key, args.application, args.timeout) as client:
        try:
            _run(client, args)
        except grpc.RpcError as error:
            code = error.code().name if hasattr(error, "code") else "UNKNOWN"
            details = error.details() if hasattr(error, "details") else str(error)
            print(f"error: {code}: {details}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
