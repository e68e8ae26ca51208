"""kill -9 while webhook POSTs fail: after a restart every event reaches the receiver, in order.

The relay runs as users run it (``twistd -n smartrelay``) with a ``[[webhooks]]`` endpoint on a
real HTTP server in the test, which answers 500 at first. Mail goes through the relay to
Postfix's ``smtp-sink`` (received and delivered events). The relay is killed with SIGKILL while
the POSTs fail, the receiver is mended, and the relay started again on the same config: the
endpoint's position, failure run and backoff were in the database, and every event is then
acknowledged, first arrivals in position order (duplicates allowed: at least once).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.support.postfix import PostfixSink
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, query, write_relay_config
from tests.support.traffic import states, submit_all, wait_until
from tests.support.webhook_receiver import SECRET, ThreadedReceiver, first_arrivals

MESSAGES = 20


TYPES = ("received", "delivered", "deferred", "bounced")


def positions_order(database_url: str) -> list[tuple[int, str]]:
    """Every event of :data:`TYPES` in position order: (id, type)."""
    order = "id" if database_url.startswith("sqlite:") else "txid, id"
    rows = query(database_url, f"SELECT id, type FROM events ORDER BY {order}")
    return [(int(i), str(t)) for i, t in rows if t in TYPES]


def test_kill_9_while_posts_fail_loses_no_event(
    tmp_path: Path, database_url: str, postfix_sink: PostfixSink
) -> None:
    [smtp_port] = free_ports(1)
    with ThreadedReceiver() as receiver:
        receiver.failing = True
        config = write_relay_config(
            tmp_path,
            database_url,
            extra=(
                "[delivery]\n"
                'retry_schedule = ["1s"]\n'
                "[delivery.routes]\n"
                f'"*" = "smtp://{HOST}:{postfix_sink.port}"\n'
                "[[webhooks]]\n"
                f"url = {json.dumps(receiver.url)}\n"
                f"secret = {json.dumps(SECRET)}\n"
                f"events = {json.dumps(list(TYPES))}\n"
                "batch_size = 7\n"
                'batch_wait = "200ms"\n'
                'timeout = "5s"\n'
            ),
            smtp_listen=f"tcp:{smtp_port}:interface={HOST}",
        )
        first = Twistd(config, tmp_path)
        try:
            first.wait_for("smtp: listening on")
            first.wait_for("delivery: node")  # the database is open and migrated
            wait_until(
                lambda: query(database_url, "SELECT url FROM webhook_endpoints") or None,
                "the endpoint's row",
                timeout=15,
            )
            accepted = submit_all(smtp_port, MESSAGES, 2)
            assert len(accepted) == MESSAGES
            wait_until(
                lambda: (
                    query(database_url, "SELECT 1 FROM webhook_endpoints WHERE attempts >= 2")
                    or None
                ),
                "two failed POSTs recorded",
                timeout=30,
            )
            first.process.send_signal(signal.SIGKILL)
            assert first.wait(10) == -signal.SIGKILL
        finally:
            first.kill()
        failed_before = receiver.snapshot()
        assert failed_before and all(p.status == 500 for p in failed_before)
        [(attempts, failing_since)] = query(
            database_url, "SELECT attempts, failing_since FROM webhook_endpoints"
        )
        assert int(attempts) >= 2 and failing_since is not None
        receiver.failing = False

        second = Twistd(config, tmp_path)
        try:
            wait_until(
                lambda: True if states(database_url)["delivered"] == MESSAGES else None,
                "every recipient delivered",
                timeout=60,
            )
            events = positions_order(database_url)
            assert [t for _, t in events].count("delivered") == MESSAGES
            expected = [i for i, _ in events]
            wait_until(
                lambda: True if set(first_arrivals(receiver.snapshot())) >= set(expected) else None,
                "every event acknowledged",
                timeout=60,
            )
            # The receiver answers before the relay records the acknowledgement: its row
            # catches up a moment later (killing the relay at once could lose that update).
            wait_until(
                lambda: (
                    True
                    if int(query(database_url, "SELECT sent_events FROM webhook_endpoints")[0][0])
                    >= 2 * MESSAGES
                    else None
                ),
                "the acknowledgements recorded",
                timeout=30,
            )
        finally:
            second.kill()
    posts = receiver.snapshot()
    assert all(p.signed for p in posts)
    assert first_arrivals(posts) == expected
    [(attempts, failing_since, sent)] = query(
        database_url, "SELECT attempts, failing_since, sent_events FROM webhook_endpoints"
    )
    assert int(attempts) == 0 and failing_since is None and int(sent) >= 2 * MESSAGES
