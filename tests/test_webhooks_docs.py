"""docs/webhooks.md's receiver example, run exactly as written against real POSTs from the
sender: it accepts them, and refuses a tampered body, a wrong secret and a stale ``t``."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from smartrelay.reactor import IRelayReactor
from smartrelay.storage.interfaces import IDatabaseEngine
from smartrelay.storage.store import Store
from smartrelay.webhooks.signing import signature_header, signature_hex
from tests.conftest import real_reactor
from tests.support.webhook_receiver import SECRET, Receiver, wait_for
from tests.test_webhooks import add_events, all_ids, hook, started

DOC = Path(__file__).parent.parent / "docs" / "webhooks.md"


def example_code() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### Receiver example") :]
    match = re.search(r"```python\n(.*?)```\n", section, re.DOTALL)
    assert match is not None, "no python block under 'Receiver example'"
    return match[1]


@pytest.fixture
def doc_verify() -> Callable[..., bool]:
    namespace: dict[str, Any] = {}
    code = example_code()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    exec(compile(code, str(DOC), "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


def test_the_example_refuses_what_it_must(doc_verify: Callable[..., bool]) -> None:
    body = b'[{"id":1}]'
    now = time.time()
    header = signature_header(SECRET, body, now)
    assert doc_verify(header, body, SECRET)
    assert not doc_verify(header, body + b" ", SECRET)
    assert not doc_verify(header, body, "other secret")
    assert not doc_verify(signature_header(SECRET, body, now - 400), body, SECRET)
    assert not doc_verify(signature_header(SECRET, body, now + 400), body, SECRET)
    t = int(now)
    rotation = f"t={t},v1={signature_hex('old', body, t)},v1={signature_hex(SECRET, body, t)}"
    assert doc_verify(rotation, body, SECRET) and doc_verify(rotation, body, "old")
    good = signature_hex(SECRET, body, t)
    for bad in ("", "garbage", f"t={t}", f"t=x,v1={good}", f"t={t},t={t},v1={good}",
                f"t={t},v1=\u00e9"):  # fmt: skip
        assert not doc_verify(bad, body, SECRET), bad


@pytest_twisted.async_yield_fixture
async def doc_receiver(doc_verify: Callable[..., bool]) -> AsyncIterator[Receiver]:
    r = Receiver(real_reactor(), verify=lambda h, b, s, now: doc_verify(h, b, s))
    r.start()
    yield r
    await r.stop()


@pytest_twisted.ensureDeferred
async def test_the_example_accepts_the_senders_posts(
    engine: IDatabaseEngine, doc_receiver: Receiver
) -> None:
    reactor: IRelayReactor = real_reactor()
    store = Store(engine, reactor)
    service = await started(reactor, store, [hook(doc_receiver.url, batch_size=4)])
    try:
        await add_events(store, 9)
        expected = (await all_ids(store))[-9:]
        await wait_for(reactor, lambda: len(doc_receiver.acknowledged()) == 9, "the events")
    finally:
        await service.stopService()
    assert doc_receiver.acknowledged() == expected
    assert len(doc_receiver.posts) >= 3 and all(p.signed for p in doc_receiver.posts)
