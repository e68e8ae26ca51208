"""``smartrelay-ctl feedback list`` and ``feedback reprocess`` (the real console script, on both
engines); the reports are stored and processed in-process, as the relay does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from smartrelay.config import Config
from smartrelay.feedback.model import ClassifiedRecipient, FailedRecipient, Report
from smartrelay.feedback.processor import FeedbackProcessor
from smartrelay.storage.interfaces import ICursor, IDatabaseEngine
from smartrelay.storage.store import NewFeedback, NewMessage, Store
from smartrelay.timefmt import rfc3339
from smartrelay.tokens import TokenCodec, load_keyring
from tests.support.run import (
    Result,
    assert_cli_error,
    assert_ok,
    call,
    ctl,
    ctl_all,
    query,
    write_config,
)
from tests.support.sink import ReceivedMessage
from tests.test_feedback_e2e import postfix_dsn

DOMAIN = "bounces.example.com"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return tmp_path / "secret.key"


@pytest.fixture
def config(tmp_path: Path, database_url: str, secret: Path, engine: IDatabaseEngine) -> Path:
    """A config for the test's (migrated) database, with the token key file the tests use."""
    extra = (
        f"[inbound]\nreturn_path_domain = {json.dumps(DOMAIN)}\n"
        f"[rewrap]\nsecret_file = {json.dumps(str(secret))}\n"
    )
    return write_config(tmp_path, database_url, extra)


@pytest.fixture
def codec(secret: Path) -> TokenCodec:
    return TokenCodec(load_keyring(str(secret)))


def unused_classifier(raw: bytes) -> Report:
    raise AssertionError("a mailto unsubscribe is not classified")


async def queue(store: Store, address: str) -> tuple[str, int]:
    queued = await store.queue_message(
        NewMessage(sender="app@example.com", recipients=(address,), raw=b"Subject: x\r\n\r\nx\r\n")
    )
    rows = await store.pending_recipients(queued.queue_id)
    assert [r.address for r in rows] == [address]

    async def txn(cursor: ICursor) -> int:
        await cursor.execute("SELECT id FROM recipients WHERE queue_id = ?", (queued.queue_id,))
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])

    return queued.queue_id, await store.run("id", txn, readonly=True)


async def run(config: Path, *args: str) -> Result:
    return await deferToThread(ctl, config, *args)


@pytest_twisted.ensureDeferred
async def test_feedback_list(config: Path, store: Store, clock: Clock, codec: TokenCodec) -> None:
    queue_id, recipient_id = await queue(store, "reader@example.net")
    mailto = f"u+{codec.unsubscribe_mailto_token(recipient_id)}@{DOMAIN}"
    processed = await store.store_feedback(
        NewFeedback("", (mailto,), b"Subject: unsubscribe\r\n\r\n")
    )
    clock.advance(1)
    unmatched = await store.store_feedback(NewFeedback("", (f"postmaster@{DOMAIN}",), b"dsn"))
    clock.advance(1)
    new = await store.store_feedback(
        NewFeedback("mailer-daemon@example.org", (f"b+x@{DOMAIN}",), b"?")
    )
    stranger = Report(
        "bounce",
        (
            ClassifiedRecipient(
                FailedRecipient("stranger@example.org", "failed", "5.1.1"),
                "invalid-recipient",
                True,
            ),
        ),
    )
    processor = FeedbackProcessor(lambda: succeed(store), codec, Config(), lambda raw: stranger)
    assert (await processor.process(processed)).state == "processed"
    assert (await processor.process(unmatched)).state == "unmatched"

    everything, only_unmatched, only_ignored, bad_state = ctl_all(
        config,
        call("feedback", "list"),
        call("feedback", "list", "--state", "unmatched"),
        call("feedback", "list", "--state", "ignored"),
        call("feedback", "list", "--state", "lost"),
    )
    start = 1_700_000_000
    unmatched_line = (
        f"{unmatched}\t{rfc3339(start + 1)}\tunmatched\tbounce\t-\t-\t-"
        "\tno message sent to stranger@example.org in the last 30 days"
    )
    assert assert_ok(everything).lines == [
        f"{processed}\t{rfc3339(start)}\tprocessed\tunsubscribe\tmailto\t{queue_id}"
        "\treader@example.net\tmailto unsubscribe",
        unmatched_line,
        f"{new}\t{rfc3339(start + 2)}\tnew\t-\t-\t-\t-\t-",
    ]
    assert assert_ok(only_unmatched).lines == [unmatched_line]
    assert assert_ok(only_ignored).lines == ["no feedback report ignored"]
    assert bad_state.returncode == 2 and "invalid choice: 'lost'" in bad_state.stderr


@pytest_twisted.ensureDeferred
async def test_feedback_reprocess(
    config: Path, store: Store, clock: Clock, codec: TokenCodec, database_url: str
) -> None:
    """Reports left unmatched (here: by an older version that ignored mailto unsubscribes)
    are processed again; the second time, nothing more is recorded."""
    reports = []
    for address in ("a@example.net", "b@example.net", "c@example.net"):
        _, recipient_id = await queue(store, address)
        mailto = f"u+{codec.unsubscribe_mailto_token(recipient_id)}@{DOMAIN}"
        reports.append(await store.store_feedback(NewFeedback("", (mailto,), b"unsubscribe me")))
        clock.advance(1)
    query(
        database_url,
        "UPDATE feedback_reports SET state = 'unmatched', reason = 'older version'"
        " WHERE report_id <> ?",
        (reports[2],),
    )

    all_unmatched = assert_ok(await run(config, "feedback", "reprocess", "--all-unmatched"))
    assert all_unmatched.lines == [
        f"{reports[0]}\tprocessed\tmailto unsubscribe",
        f"{reports[1]}\tprocessed\tmailto unsubscribe",
        "2 unmatched report(s) reprocessed",
    ]
    one, unknown, both, neither = ctl_all(
        config,
        call("feedback", "reprocess", reports[0]),
        call("feedback", "reprocess", "Rnosuchreport"),
        call("feedback", "reprocess", reports[0], "--all-unmatched"),
        call("feedback", "reprocess"),
    )
    assert assert_ok(one).lines == [f"{reports[0]}\tprocessed\tduplicate: already unsubscribed"]
    assert_cli_error(unknown, "no feedback report Rnosuchreport")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert neither.returncode == 2 and "one of the arguments" in neither.stderr
    rows = query(database_url, "SELECT recipient, data FROM events WHERE type = 'unsubscribed'")
    assert sorted(rows) == [
        ("a@example.net", '{"method": "mailto"}'),
        ("b@example.net", '{"method": "mailto"}'),
    ]
    # The third was never unmatched: still new, for the relay.
    assert query(
        database_url, "SELECT state FROM feedback_reports WHERE report_id = ?", (reports[2],)
    ) == [("new",)]


@pytest_twisted.ensureDeferred
async def test_feedback_reprocess_classifies_a_real_dsn(
    config: Path, store: Store, codec: TokenCodec, database_url: str
) -> None:
    """``reprocess ID`` with the real classifier and the relay's token key: a Postfix DSN
    that an earlier version left ``ignored`` is recorded as the bounce it is."""
    queue_id, recipient_id = await queue(store, "bob@example.net")
    sender = f"b+{codec.verp_token(recipient_id)}@{DOMAIN}"
    copy = ReceivedMessage(
        sender, ["bob@example.net"], f"X-SmartRelay-ID: {queue_id}\r\n\r\nhi\r\n".encode(), False, 0
    )
    report_id = await store.store_feedback(
        NewFeedback("", (sender,), postfix_dsn(copy, "bob@example.net"))
    )
    query(
        database_url,
        "UPDATE feedback_reports SET state = 'ignored', reason = 'older version'"
        " WHERE report_id = ?",
        (report_id,),
    )
    result = assert_ok(await run(config, "feedback", "reprocess", report_id))
    assert result.lines == [
        f"{report_id}\tprocessed\tbounced: invalid-recipient (hard) for bob@example.net"
    ]
    [(data,)] = query(database_url, "SELECT data FROM events WHERE type = 'bounced'")
    assert json.loads(data)["source"] == "dsn"
    assert query(database_url, "SELECT address, reason FROM suppressions") == [
        ("bob@example.net", "hard_bounce")
    ]
