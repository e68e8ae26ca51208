"""Content warnings at re-wrap (rewrap/content_checks.py): the rules, their bounds on hostile
HTML, and one ``warning`` event per message (storage/warnings.py, both engines), counted by
the roll-ups once per kind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import pytest_twisted
from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from smartrelay.config import DkimKey
from smartrelay.events import WarningEvent
from smartrelay.rewrap import chain as chain_module
from smartrelay.rewrap.chain import RewrapChain, RewrapSettings
from smartrelay.rewrap.content_checks import (
    _ANY_MARK,
    _DOUBLE_ESCAPE,
    _ENCODED_MARKS,
    _MARKS,
    MAX_TAGS,
    ContentWarning,
    check_message,
    find_placeholder,
    scan_html,
)
from smartrelay.rewrap.dkim import DkimSigner, generate_key
from smartrelay.rewrap.headers import split_header_block
from smartrelay.rewrap.mime import plan_html_parts
from smartrelay.smtp.replies import Reply
from smartrelay.storage.interfaces import ICursor
from smartrelay.storage.store import NewMessage, Store
from smartrelay.tokens import TokenCodec, load_keyring
from tests.conftest import real_reactor
from tests.support.delivery_relay import (
    DeliveryRelays,
    Sinks,
    TrackingSinkBackend,
    events,
    message_bytes,
    smtp_route,
    submit,
    wait_for_events,
)


def warnings_of(raw: bytes, signed_domains: tuple[str, ...] = ("example.com",)) -> dict[str, str]:
    fields, _ = split_header_block(raw)

    def signs(domain: str | None) -> bool:
        return domain is not None and any(
            domain == d or domain.endswith("." + d) for d in signed_domains
        )

    found = check_message(fields, plan_html_parts(raw), signs)
    return {w.kind: w.detail for w in found}


def alternative(html: str, text: str = "Hello", subject: str = "Hi") -> bytes:
    return (
        f"From: Shop <news@example.com>\r\nTo: a@example.net\r\nSubject: {subject}\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        f"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
        f"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--b1--\r\n"
    ).encode()


CLEAN = alternative(
    "<html><head><style>@media (max-width:600px){.a{color:red}}</style></head><body>"
    '<p>50%% off, {not a placeholder}</p><a href="https://shop.example/?a=1&amp;b=2">x</a>'
    "</body></html>"
)


def test_a_clean_message_has_no_warning() -> None:
    assert warnings_of(CLEAN) == {}


def test_no_dkim_key_for_the_from_domain_or_no_from_address() -> None:
    assert warnings_of(CLEAN, signed_domains=("other.example",)) == {
        "no-dkim-key": "no [[dkim.keys]] key signs mail from example.com"
    }
    # A parent domain's key signs a subdomain's mail (the signer's own rule).
    sub = CLEAN.replace(b"news@example.com", b"news@mail.example.com")
    assert warnings_of(sub) == {}
    no_from = CLEAN.replace(b"From: Shop <news@example.com>\r\n", b"")
    assert warnings_of(no_from)["no-dkim-key"].startswith("no single From address")


def test_a_double_escaped_href_is_named() -> None:
    raw = alternative(
        '<a href="https://shop.example/p?a=1&amp;amp;b=2">x</a>'
        '<a href="https://shop.example/q?c=1&amp;amp;d=2">y</a><p>&amp;amp; in text is fine</p>'
    )
    assert warnings_of(raw) == {
        "double-escaped-link": "https://shop.example/p?a=1&amp;b=2 (and 1 more)"
    }
    # In the text, an attribute other than href, a comment: not a link.
    raw = alternative('<img alt="&amp;amp;"><!-- <a href="x?a&amp;amp;b"> --><p>&amp;amp;</p>')
    assert warnings_of(raw) == {}


@pytest.mark.parametrize(
    ("html", "detail"),
    [
        ('<a href="https://shop.example/u/{{ user.id }}">x</a>', "link: {{ user.id }} in"),
        ('<a href="https://shop.example/u/%7B%7Bid%7D%7D">x</a>', "link: {{id}} in"),
        ("<a href='https://x.example/?e=*|EMAIL|*'>x</a>", "link: *|EMAIL|* in"),
        ('<a href="https://x.example/%%=v(@id)=%%">x</a>', "link: %%=v(@id)=%% in"),
        ("<p>Hello {{<b>first_name</b>}},</p>", "text: {{first_name}}"),
        ("<p>Dear %%FirstName%%</p>", "text: %%FirstName%%"),
        ("<p>{% if vip %}Gold{% endif %}</p>", "text: {% if vip %}"),
    ],
)
def test_unfilled_placeholders_in_links_and_text(html: str, detail: str) -> None:
    assert warnings_of(alternative(html))["unfilled-placeholder"].startswith(detail)


@pytest.mark.parametrize(
    "html",
    [
        # CSS: }} closes nested blocks, {{ is not CSS but stays out of sight anyway
        "<style>@media screen{.a{color:red}} .b{{x}}</style><p>ok</p>",
        "<script>var t = '{{x}}';</script><p>ok</p>",
        "<!-- {{ debug }} --><p>ok</p>",
        "<title>{{subject}}</title><p>ok</p>",
        '<img alt="{{alt}}" src="https://x.example/a.png">',
        # a literal %% (an invalid URL, not a placeholder), "100%%", a lone brace pair
        '<a href="https://x.example/?d=50%25%25">x</a><p>100%% sure; a }} b</p>',
        # half a placeholder, and one spanning a line break, are not whole ones
        "<p>{{first_name</p><p>{{\nname}}</p>",
    ],
)
def test_what_is_not_an_unfilled_placeholder(html: str) -> None:
    assert "unfilled-placeholder" not in warnings_of(alternative(html))


def test_placeholders_in_the_subject_and_the_text_part() -> None:
    subject = "=?utf-8?q?Hi_*=7CFNAME=7C*?="  # Mailchimp's merge tag, RFC 2047 encoded
    assert warnings_of(alternative("<p>x</p>", subject=subject)) == {
        "unfilled-placeholder": "subject: *|FNAME|*"
    }
    assert warnings_of(alternative("<p>x</p>", text="Hi {{ name }}!")) == {
        "unfilled-placeholder": "text: {{ name }}"
    }
    qp = (
        b"From: a@example.com\r\nSubject: s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nHi %%First=\r\nName%%\r\n"
    )
    assert warnings_of(qp) == {"unfilled-placeholder": "text: %%FirstName%%"}


def test_html_without_a_text_alternative() -> None:
    head = b"From: a@example.com\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
    html_only = head + b"Content-Type: text/html\r\n\r\n<p>x</p>\r\n"
    assert warnings_of(html_only) == {
        "no-text-alternative": "an HTML part without a text/plain alternative"
    }
    # text and HTML side by side in multipart/mixed are not alternatives
    mixed = head + (
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        b"--m\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n"
        b"--m\r\nContent-Type: text/plain\r\n\r\nx\r\n"
        b"--m\r\nContent-Type: text/html\r\n\r\n<p>y</p>\r\n--m--\r\n"
    )
    assert warnings_of(mixed)["no-text-alternative"].startswith("2 HTML parts")
    # alternative(text, related(html, image)) inside mixed(..., an HTML attachment): fine
    nested = head + (
        b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        b'--m\r\nContent-Type: multipart/alternative; boundary="a"\r\n\r\n'
        b"--a\r\nContent-Type: text/plain\r\n\r\nx\r\n"
        b'--a\r\nContent-Type: multipart/related; boundary="r"\r\n\r\n'
        b"--r\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n"
        b"--r\r\nContent-Type: image/png\r\n\r\nPNG\r\n--r--\r\n--a--\r\n"
        b"--m\r\nContent-Type: text/html\r\nContent-Disposition: attachment\r\n\r\n<p>a</p>\r\n"
        b"--m--\r\n"
    )
    assert warnings_of(nested) == {}


def test_details_are_one_bounded_printable_line() -> None:
    url = "https://x.example/" + "a" * 500 + "?b=1&amp;amp;c=\u2028"
    found = warnings_of(alternative(f'<a href="{url}">x</a>'))["double-escaped-link"]
    assert len(found) == 200 and found.endswith("...") and found.isprintable()


# -- bounded on hostile HTML ------------------------------------------------------------------


def timed(html: str) -> float:
    started = time.perf_counter()
    scan_html(html)
    return time.perf_counter() - started


def test_a_25_mb_part_with_100k_links_is_checked_in_bounded_time() -> None:
    link = '<p>Item <a href="https://shop.example/p/{n}?a=1&amp;amp;b=2">x</a></p>\n'
    body = "".join(link.format(n=n) for n in range(100_000))
    html = (body + "<p>{{ name }}</p>" + "y" * (25_000_000 - len(body))).replace("x", "x", 1)
    assert len(html) > 25_000_000
    started = time.perf_counter()
    findings = scan_html(html)
    elapsed = time.perf_counter() - started
    assert len(findings.double_escaped) == 100_000
    assert ("text", "{{ name }}") in findings.placeholders
    assert elapsed < 20, elapsed  # about 1 s here; generous for a loaded machine


@pytest.mark.parametrize(
    "hostile",
    [
        "<a x='" * 2_000_000,  # unclosed quotes
        "<!--" * 3_000_000,  # one comment to the end
        '<a href="{{' * 1_000_000,  # marks and anchors, nothing closed
        "{{" * 6_000_000,  # marks only
        "<a>" * 4_000_000,  # more anchors than MAX_TAGS
        "<style>" * 2_000_000 + "{{x}}",  # raw text never closed
        "%%a" * 4_000_000 + "*|" * 2_000_000,
    ],
)
def test_hostile_html_is_checked_in_bounded_time(hostile: str) -> None:
    assert len(hostile) >= 10_000_000
    assert timed(hostile) < 20  # each is under 2 s here


def test_past_max_tags_the_rest_of_a_part_is_not_checked() -> None:
    html = "<a>" * MAX_TAGS + '<a href="https://x.example/{{id}}">x</a>'
    assert scan_html(html).placeholders == ()
    html = "<a>" * (MAX_TAGS - 1) + '<a href="https://x.example/{{id}}">x</a>'
    assert scan_html(html).placeholders == (("link", "{{id}} in https://x.example/{{id}}"),)


def test_find_placeholder_rules() -> None:
    assert find_placeholder("Hi {{name}}") == "{{name}}"
    assert find_placeholder("a {{" + "x" * 101 + "}}") is None  # longer than 100: prose
    assert find_placeholder("*|FNAME|*") == "*|FNAME|*"
    assert find_placeholder("*| FNAME |*") is None
    assert find_placeholder("%%[ set @a = 1 ]%%") == "%%[ set @a = 1 ]%%"
    assert find_placeholder("%% 100 %%") is None


# -- once per message: store, roll-ups, chain ---------------------------------------------------

EVENT = WarningEvent(
    ({"kind": "no-dkim-key", "detail": "d"}, {"kind": "no-text-alternative", "detail": "e"})
)


async def warning_rows(store: Store, queue_id: str) -> list[tuple[str, str, dict[str, object]]]:
    async def txn(cursor: ICursor) -> list[tuple[str, str, dict[str, object]]]:
        await cursor.execute(
            "SELECT type, recipient, data FROM events WHERE queue_id = ? AND type = 'warning'",
            (queue_id,),
        )
        return [(str(r[0]), str(r[1]), json.loads(r[2])) for r in cursor.fetchall()]

    return await store.run("test", txn, readonly=True)


@pytest_twisted.ensureDeferred
async def test_warnings_are_recorded_once_per_message(store: Store) -> None:
    queued = await store.queue_message(
        NewMessage("app@example.com", ("a@example.net",), b"Subject: x\r\n\r\ny\r\n")
    )
    assert (await store.load_messages([queued.queue_id]))[queued.queue_id].warnings_checked is False
    # Two writers at once (two delivery processes), then a third later (a restart).
    first, second = await Deferred.fromCoroutine(_both(store, queued.queue_id))
    assert sorted([first, second]) == [False, True]
    assert await store.record_warnings(queued.queue_id, EVENT) is False
    assert await warning_rows(store, queued.queue_id) == [
        (
            "warning",
            "",
            {
                "warnings": [
                    {"detail": "d", "kind": "no-dkim-key"},
                    {"detail": "e", "kind": "no-text-alternative"},
                ]
            },
        )
    ]
    assert (await store.load_messages([queued.queue_id]))[queued.queue_id].warnings_checked
    assert await store.record_warnings("no-such-message", EVENT) is False


async def _both(store: Store, queue_id: str) -> tuple[bool, bool]:
    one = store.record_warnings(queue_id, EVENT)
    two = store.record_warnings(queue_id, EVENT)
    return await one, await two


@pytest_twisted.ensureDeferred
async def test_the_roll_ups_count_messages_with_each_kind(store: Store, clock: Clock) -> None:
    for sender in ("app@example.com", "app@example.com", "x@other.example"):
        queued = await store.queue_message(
            NewMessage(
                sender, ("a@example.net", "b@example.org"), b"Subject: x\r\n\r\ny\r\n", tags=("t1",)
            )
        )
        event = (
            EVENT
            if sender.startswith("app")
            else WarningEvent(
                ({"kind": "no-dkim-key", "detail": "d"}, {"kind": "no-dkim-key", "detail": "again"})
            )
        )
        assert await store.record_warnings(queued.queue_id, event)
    clock.advance(60)
    await store.roll_up(clock.seconds(), 1000)
    since, until = clock.seconds() - 7200, clock.seconds() + 3600
    totals = await store.rollup_totals(since, until)
    assert totals[("warning", "no-dkim-key")] == (3, 0)
    assert totals[("warning", "no-text-alternative")] == (2, 0)
    by_domain = await store.rollup_totals(since, until, tag="t1", sender_domain="example.com")
    assert by_domain[("warning", "no-dkim-key")] == (2, 0)
    assert await store.sender_domains_seen(since, until) == [
        ("example.com", 4),
        ("other.example", 2),
    ]


def make_chain(
    store: Store, tmp_path: Path, record: chain_module.WarningRecorder | None
) -> RewrapChain:
    directory = tmp_path / "dkim"
    if not directory.exists():
        generate_key("signed.example", "s1", "ed25519", str(directory))
    key = DkimKey(
        "signed.example", "s1", str(directory / "signed.example.s1.pem"), "ed25519-sha256"
    )
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings("relay.test", "https://t.example.com", "bounces.example.com")
    return RewrapChain(settings, codec, DkimSigner([key]), store, record_warnings=record)


HTML_ONLY = (
    b"From: news@example.com\r\nSubject: Hi {{name}}\r\nContent-Type: text/html\r\n\r\n"
    b'<a href="https://shop.example/?a=1&amp;amp;b=2">x</a>\r\n'
)


@pytest_twisted.ensureDeferred
async def test_the_chain_records_a_message_s_warnings_once(store: Store, tmp_path: Path) -> None:
    calls: list[str] = []

    async def record(queue_id: str, event: WarningEvent) -> bool:
        calls.append(queue_id)
        return await store.record_warnings(queue_id, event)

    chain = make_chain(store, tmp_path, record)
    queued = await store.queue_message(
        NewMessage("news@example.com", ("a@example.net", "b@example.org"), HTML_ONLY)
    )
    claimed = await store.claim_due("node", limit=10, lease=60)
    message = (await store.load_messages([queued.queue_id]))[queued.queue_id]
    for recipient in claimed:  # one job per recipient domain
        result = await chain.run(message, [recipient])
        assert len(result.copies) == 1
    assert calls == [queued.queue_id]  # the second job did not even ask
    [(_, event_recipient, data)] = await warning_rows(store, queued.queue_id)
    assert event_recipient == ""
    assert [w["kind"] for w in data["warnings"]] == [  # type: ignore[attr-defined]
        "no-dkim-key",
        "double-escaped-link",
        "unfilled-placeholder",
        "no-text-alternative",
    ]
    # A restart (a new chain, the message loaded again): recorded already, not checked again.
    again = make_chain(store, tmp_path, record)
    reloaded = (await store.load_messages([queued.queue_id]))[queued.queue_id]
    await again.run(reloaded, claimed[:1])
    assert calls == [queued.queue_id]
    # Another process that loaded the message before: checked, but nothing recorded twice.
    await make_chain(store, tmp_path, record).run(message, claimed[:1])
    assert calls == [queued.queue_id] * 2
    assert len(await warning_rows(store, queued.queue_id)) == 1


@implementer(ILogObserver)
class Collect:
    def __init__(self) -> None:
        self.failures: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if "log_failure" in event:
            self.failures.append(event)


@pytest_twisted.ensureDeferred
async def test_a_failing_check_or_recorder_never_fails_the_delivery(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_record(queue_id: str, event: WarningEvent) -> bool:
        raise RuntimeError("database on fire")

    queued = await store.queue_message(
        NewMessage("news@example.com", ("a@example.net",), HTML_ONLY)
    )
    claimed = await store.claim_due("node", limit=10, lease=60)
    message = (await store.load_messages([queued.queue_id]))[queued.queue_id]
    collect = Collect()
    globalLogPublisher.addObserver(collect)
    try:
        result = await make_chain(store, tmp_path, broken_record).run(message, claimed)
        assert len(result.copies) == 1 and not result.failed
        assert "recording its warnings failed" in collect.failures[-1]["log_format"]

        def broken_check(*args: object) -> tuple[ContentWarning, ...]:
            raise ValueError("a bug")

        monkeypatch.setattr(chain_module, "check_message", broken_check)
        result = await make_chain(store, tmp_path, store.record_warnings).run(message, claimed)
        assert len(result.copies) == 1 and not result.failed
        assert "checking the content failed" in collect.failures[-1]["log_format"]
    finally:
        globalLogPublisher.removeObserver(collect)
    for event in collect.failures:
        event["log_failure"].cleanFailure()
    assert await warning_rows(store, queued.queue_id) == []


# -- end to end: SMTP in, two domains, a deferral and a retry; one event ------------------------


@pytest.fixture
def fast_poll(relays: DeliveryRelays) -> None:
    relays.tunables = evolve(relays.tunables, poll_interval=0.5)


@pytest_twisted.ensureDeferred
async def test_through_the_relay_one_warning_event_whatever_the_jobs_and_retries(
    relays: DeliveryRelays, sinks: Sinks, database_url: str, fast_poll: None
) -> None:
    reactor = real_reactor()
    answers: list[Reply] = []

    def data_script(_: int) -> Reply:  # the first copy is deferred, the rest accepted
        answers.append(Reply(451, "4.3.0", "later") if not answers else Reply(250, "2.0.0", "ok"))
        return answers[-1]

    _, sink_port = await sinks.start(TrackingSinkBackend(data_script=data_script))
    relay = await relays.start(
        database_url, {"routes": smtp_route(sink_port), "retry_schedule": ["1s"]}
    )
    data = message_bytes(
        "news",
        headers=["MIME-Version: 1.0", "Content-Type: text/html; charset=utf-8"],
        body='<p>Hi {{ first_name }}</p><a href="https://shop.example/?a=1&amp;amp;b=2">x</a>\r\n',
    )
    queue_id = await submit(relay.smtp_port, ["a@example.net", "b@example.org"], data)
    await wait_for_events(reactor, relay.store, "delivered", 2, within=30)
    found = [e for e in await events(relay.store, queue_id=queue_id) if e.type == "warning"]
    assert len(found) == 1 and found[0].recipient == ""
    kinds = [w["kind"] for w in found[0].data["warnings"]]
    assert kinds == [
        "no-dkim-key",
        "double-escaped-link",
        "unfilled-placeholder",
        "no-text-alternative",
    ]
    assert "deferred" in {e.type for e in await events(relay.store, queue_id=queue_id)}


# -- never an exception, whatever the input ---------------------------------------------------

HTML_BITS = st.sampled_from(
    ["<a href=", '"', "'", ">", "<!--", "-->", "<style>", "</style", "{{", "}}", "{%", "%}",
     "*|", "|*", "%%", "%7B%7B", "&amp;amp;", "&", "<", " ", "x", "\n", "\x00", "\ud800"]
)  # fmt: skip


@given(st.lists(HTML_BITS | st.text(max_size=5), max_size=60).map("".join))
@settings(max_examples=300, deadline=None)
def test_scan_html_takes_anything(html: str) -> None:
    findings = scan_html(html)
    assert all(where in ("link", "text") for where, _ in findings.placeholders)


@given(
    st.lists(
        st.sampled_from(
            [
                b"From: a@example.com\r\n",
                b"From: \r\n",
                b"Subject: =?x?q?{{a}}?=\r\n",
                b"Subject: *|A|*\r\n",
                b"Content-Type: multipart/alternative; boundary=b\r\n",
                b"Content-Type: text/html; charset=nope\r\n",
                b"Content-Transfer-Encoding: base64\r\n",
                b"\r\n",
                b"--b\r\n",
                b"--b--\r\n",
                b"<a href='{{x}}'>",
                b"=ZZ",
                b"\xff\xfe",
                b"\r",
                b"\n",
            ]
        )
        | st.binary(max_size=8),
        max_size=30,
    ).map(b"".join)
)
@settings(max_examples=300, deadline=None)
def test_check_message_takes_anything(raw: bytes) -> None:
    fields, _ = split_header_block(raw)
    for warning in check_message(fields, plan_html_parts(raw), lambda d: d == "example.com"):
        assert len(warning.detail) <= 200 and warning.detail.isprintable()


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["x", "{", "}", "%", "7", "B", "b", "2", "5", "*", "|", "&amp;", "amp;", "A", "C", "c"]
        )
    ).map("".join)
)
def test_one_regex_tells_whether_html_needs_a_closer_look(html: str) -> None:
    """The regex finds something exactly when one of the substring searches it replaced
    would have (the double escape, a mark, an encoded mark after a "%7" or "%2")."""
    double = _DOUBLE_ESCAPE in html
    marks = any(mark in html for mark in _MARKS) or (
        ("%7" in html or "%2" in html) and any(mark in html for mark in _ENCODED_MARKS)
    )
    assert (_ANY_MARK.search(html) is not None) == (double or marks)
