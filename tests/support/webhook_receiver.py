"""Webhook receivers for the tests: real HTTP servers on 127.0.0.1 that check every POST's
signature (smartrelay.webhooks.signing) and answer as the test scripts them.

:class:`Receiver` is a twisted.web site on the test reactor (for in-process senders);
:class:`ThreadedReceiver` is the standard library's HTTP server in a thread (for a relay run by
``twistd`` while the test waits synchronously).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from smartrelay.reactor import IRelayReactor
from smartrelay.webhooks.signing import verify_signature

SECRET = "test-webhook-secret"


@frozen
class Post:
    """One POST as received: its headers (lower-case names), its events, and the answer."""

    headers: dict[str, str]
    body: bytes
    events: list[dict[str, Any]]
    signed: bool
    status: int

    @property
    def ids(self) -> list[int]:
        return [int(e["id"]) for e in self.events]


def first_arrivals(posts: list[Post], statuses: tuple[int, ...] = (200,)) -> list[int]:
    """Event ids in the order they were first acknowledged (answered with ``statuses``)."""
    seen: dict[int, None] = {}
    for post in posts:
        if post.status in statuses:
            for i in post.ids:
                seen.setdefault(i, None)
    return list(seen)


class _Hook(Resource):
    isLeaf = True

    def __init__(self, owner: Receiver) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._owner = owner

    def render_POST(self, request: Request) -> bytes | int:
        return self._owner.handle(request)


class Receiver:
    """A twisted.web receiver at ``url``. ``answers``: statuses for the next POSTs, in order,
    then ``status`` (``None``: never answer, keeping the connection open)."""

    def __init__(
        self,
        reactor: IRelayReactor,
        secret: str = SECRET,
        verify: Callable[[str, bytes, str, float], bool] = verify_signature,
    ) -> None:
        """``verify(header, body, secret, now)`` decides each POST's ``signed``."""
        self.reactor = reactor
        self.secret = secret
        self.verify = verify
        self.posts: list[Post] = []
        self.answers: list[int] = []
        self.status: int | None = 200
        self.hanging: list[Request] = []
        self._port: IListeningPort | None = None

    def start(self) -> str:
        site = Site(_Hook(self))  # type: ignore[no-untyped-call]
        self._port = self.reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
        return self.url

    @property
    def url(self) -> str:
        assert self._port is not None
        port = self._port.getHost().port  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        for request in self.hanging:
            if request.channel is not None:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
        if self._port is not None:
            stopped = self._port.stopListening()
            if stopped is not None:
                await stopped

    def handle(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        headers = {
            k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        headers[":path"] = request.path.decode()
        signed = self.verify(
            headers.get("x-smartrelay-signature", ""), body, self.secret, self.reactor.seconds()
        )
        status = self.answers.pop(0) if self.answers else self.status
        events = json.loads(body) if body else []
        self.posts.append(Post(headers, body, events, signed, status or 0))
        if status is None:
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setResponseCode(status)
        if 300 <= status < 400:
            request.setHeader("Location", self.url + "/elsewhere")  # type: ignore[no-untyped-call]
        return b"ok" if status < 300 else b"receiver says no\n" + b"x" * 10_000

    def acknowledged(self) -> list[int]:
        return first_arrivals(self.posts)


async def wait_for(
    reactor: IRelayReactor, condition: Callable[[], Any], what: str, within: float = 20.0
) -> Any:
    """Poll ``condition`` (sync) every 50 ms until it returns something true."""
    deadline = reactor.seconds() + within
    while True:
        result = condition()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await deferLater(reactor, 0.05)


async def wait_for_async(
    reactor: IRelayReactor,
    condition: Callable[[], Deferred[Any] | Any],
    what: str,
    within: float = 20.0,
) -> Any:
    """:func:`wait_for` with a condition that is a coroutine function."""
    deadline = reactor.seconds() + within
    while True:
        result = await condition()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await deferLater(reactor, 0.05)


class ThreadedReceiver:
    """The same checks, on ``http.server`` in a thread; ``failing`` makes it answer 500."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.posts: list[Post] = []
        self.failing = False
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                signed = verify_signature(
                    headers.get("x-smartrelay-signature", ""), body, owner.secret, time.time()
                )
                with owner.lock:
                    status = 500 if owner.failing else 200
                    owner.posts.append(Post(headers, body, json.loads(body), signed, status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> ThreadedReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def snapshot(self) -> list[Post]:
        with self.lock:
            return list(self.posts)
