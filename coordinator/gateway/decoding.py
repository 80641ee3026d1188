"""A request that is not a valid message is answered INVALID_ARGUMENT with a sentence.

``grpc.aio`` answers a request its deserializer cannot parse with UNKNOWN and the parser's
exception; a client that sends garbage (or speaks another version of the proto) should be told
what was wrong. :class:`MessageCheck` wraps each handler's deserializer: a message that does not
parse becomes a marker, and the call (or, in a stream, the read of that message) is refused.
"""

from __future__ import annotations

import grpc

from coordinator.errors import InvalidRequest


class _Malformed:
    __slots__ = ()


_MALFORMED = _Malformed()


def _sentence(deserializer) -> str:
    message = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message.name if message is not None else "request"
    return (f"the request is not a valid {name} message: check that the client is a nomoat of the "
            f"same protocol version as the coordinator")


def _messages(requests, sentence: str):
    async def checked():
        async for message in requests:
            if message is _MALFORMED:
                raise InvalidRequest(sentence)
            yield message
    return checked()


def checked(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    if parse is None:
        return handler
    sentence = _sentence(parse)

    def decode(data: bytes):
        try:
            return parse(data)
        except Exception:  # noqa: BLE001  (any parse failure is the client's malformed message)
            return _MALFORMED

    if handler.request_streaming and handler.response_streaming:
        inner = handler.stream_stream

        async def stream_stream(requests, context):
            async for reply in inner(_messages(requests, sentence), context):
                yield reply
        return handler._replace(request_deserializer=decode, stream_stream=stream_stream)
    if handler.request_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests, context):
            return await inner_su(_messages(requests, sentence), context)
        return handler._replace(request_deserializer=decode, stream_unary=stream_unary)
    if handler.response_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request, context):
            if request is _MALFORMED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, sentence)
            async for reply in inner_us(request, context):
                yield reply
        return handler._replace(request_deserializer=decode, unary_stream=unary_stream)
    inner_uu = handler.unary_unary

    async def unary_unary(request, context):
        if request is _MALFORMED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, sentence)
        return await inner_uu(request, context)
    return handler._replace(request_deserializer=decode, unary_unary=unary_unary)


class MessageCheck(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._checked: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc.health."):
            return handler
        # Each method's handler is one object for the server's life: wrapped once, not per call.
        known = self._checked.get(id(handler))
        if known is None or known[0] is not handler:
            known = self._checked[id(handler)] = (handler, checked(handler))
        return known[1]
