"""Request body limits, enforced while the body streams in rather than after it is read whole.

An ASGI middleware refuses a body over its limit with 413: at once when ``Content-Length``
says so, else as soon as the bytes counted from a chunked body pass it. Multipart uploads get
``max_upload_bytes`` (plus a little for the multipart framing; the file itself is held to the
exact limit in jobs/data.py), every other body ``max_json_bytes``. The 413 carries
``Connection: close`` so the server stops reading the rest of the body instead of draining it.

What Ray Serve 2.60 does with a body before the replica sees it (read in
ray/serve/_private/proxy.py and http_util.py): the proxy does not wait for the body. It sends
the request to the replica at once and starts a task (``proxy_asgi_receive``) that calls
uvicorn's ``receive()`` in a loop and appends every message to an unbounded ``MessageQueue``;
the replica pulls the queued messages through ``receive_asgi_messages`` calls. So the replica
sees ``Content-Length`` before any body byte and can refuse at once, and when it answers the
proxy cancels the reading task. But while a request is being answered the proxy reads the
client's body as fast as the client sends it, whatever the replica has consumed: uvicorn's
flow control is defeated, and the proxy holds what the replica has not pulled yet. A body
refused here costs the proxy at most what arrives during one round trip to the replica; an
accepted upload near ``max_upload_bytes`` may sit in the proxy's memory whole if the replica
is slower than the network. Bounding that needs a limit in front of the proxy (the ingress
controller's body size limit, e.g. nginx ``client_max_body_size``), set to the same value.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from server.errors import error_body

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

MULTIPART_FRAMING_BYTES = 64 * 1024


@dataclass(frozen=True)
class BodyLimits:
    json_bytes: int
    upload_bytes: int

    def for_content_type(self, content_type: str) -> tuple[int, str]:
        """The limit for a body of this type, and the request field it is reported against."""
        if content_type.lower().startswith("multipart/form-data"):
            return self.upload_bytes + MULTIPART_FRAMING_BYTES, "file"
        return self.json_bytes, "body"


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes its limit."""


class BodyLimit:
    """ASGI middleware answering 413 to bodies over the limits ``limits()`` returns now."""

    def __init__(self, app: ASGIApp, limits: Callable[[], BodyLimits]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit, field = self.limits().for_content_type(headers.get("content-type", ""))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            message = f"{field}: the request body is {declared} bytes; the limit is {limit}"
            await refuse(send, message, field)
            return
        await LimitedRequest(self.app, limit, field).run(scope, receive, send)


class LimitedRequest:
    """One request whose body is counted as it arrives.

    Once the count passes the limit, ``receive`` raises, whatever the application then tries
    to answer is replaced by the 413, and nothing more of the body is read.
    """

    def __init__(self, app: ASGIApp, limit: int, field: str) -> None:
        self.app = app
        self.limit = limit
        self.field = field
        self.received = 0
        self.exceeded = False
        self.started = False

    async def run(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            if self.exceeded:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                if self.received > self.limit:
                    self.exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            if self.exceeded:
                if not self.started:
                    self.started = True
                    await self.refuse(send)
                return
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if not self.started:
                self.started = True
                await self.refuse(send)

    async def refuse(self, send: Send) -> None:
        message = f"{self.field}: the request body is over the limit of {self.limit} bytes"
        await refuse(send, message, self.field)


async def refuse(send: Send, message: str, field: str) -> None:
    body = json.dumps(error_body("too_large", message, field)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
