"""API tokens (storage/api_tokens.py) on both engines: only a hash is kept, a token finds its
name, a removed or altered token finds nothing."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.storage.api_tokens import generate_api_token, token_hash
from smartrelay.storage.logins import DuplicateName
from smartrelay.storage.store import Store


@pytest_twisted.ensureDeferred
async def test_tokens(store: Store, clock: Clock) -> None:
    token = generate_api_token()
    assert token.startswith("srt_") and len(token) == 47
    await store.add_api_token("crm", token)
    with pytest.raises(DuplicateName):
        await store.add_api_token("crm", generate_api_token())

    async def stored() -> list[tuple[object, ...]]:
        async def txn(cursor: object) -> list[tuple[object, ...]]:
            await cursor.execute("SELECT name, token_hash FROM api_tokens")  # type: ignore[attr-defined]
            return list(cursor.fetchall())  # type: ignore[attr-defined]

        return await store.run("t", txn)

    assert await stored() == [("crm", token_hash(token))]  # never the token itself
    assert [t.last_used_at for t in await store.list_api_tokens()] == [None]
    assert await store.api_token_name(token) == "crm"
    first_use = clock.seconds()
    assert [t.last_used_at for t in await store.list_api_tokens()] == [first_use]
    clock.advance(10)
    assert await store.api_token_name(token) == "crm"
    assert [t.last_used_at for t in await store.list_api_tokens()] == [first_use]  # < 1 min
    for bad in (token[:-1], token + "x", token.upper(), "", "srt_", "Bearer " + token, "x" * 500):
        assert await store.api_token_name(bad) is None
    assert await store.remove_api_token("crm") is True
    assert await store.remove_api_token("crm") is False
    assert await store.api_token_name(token) is None
