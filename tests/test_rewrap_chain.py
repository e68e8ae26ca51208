"""The whole re-wrap chain on a stored message (both engines), verified independently."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from smartrelay.config import DkimKey
from smartrelay.rewrap.chain import RewrapChain, RewrapSettings
from smartrelay.rewrap.dkim import DkimSigner, generate_key, txt_record_name
from smartrelay.rewrap.mime import MimePlan
from smartrelay.storage.store import NewMessage, Store
from smartrelay.tokens import TokenCodec, click_payload, load_keyring
from tests.conftest import PerlVerify

HTML_MESSAGE = (
    b"From: Shop <news@example.com>\r\n"
    b"To: someone@example.net\r\n"
    b"Subject: offers\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"X-SmartRelay-Tag: promo\r\n"
    b"X-SmartRelay-Meta-Campaign: c42\r\n"
    b"\r\n"
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee https://shop.example.com/\r\n"
    b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    b'<html><body><a href="https://shop.example.com/p?a=1&amp;b=2#x">buy</a>'
    b'<a href="mailto:help@example.com">help</a></body></html>\r\n'
    b"--b1--\r\n"
)


def chain_for(store: Store, tmp_path: Path) -> tuple[RewrapChain, TokenCodec, dict[str, str]]:
    _, record = generate_key("example.com", "s1", "rsa", str(tmp_path / "dkim"))
    key = DkimKey("example.com", "s1", str(tmp_path / "dkim" / "example.com.s1.pem"), "rsa-sha256")
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings(
        hostname="relay.test",
        base_url="https://t.example.com",
        return_path_domain="bounces.example.com",
    )
    chain = RewrapChain(settings, codec, DkimSigner([key]), store)
    return chain, codec, {txt_record_name("example.com", "s1"): record}


@pytest_twisted.ensureDeferred
async def test_chain_makes_a_signed_tracked_copy_per_recipient_and_skips_suppressed(
    store: Store, clock: Clock, tmp_path: Path, perl_verify: PerlVerify
) -> None:
    chain, codec, records = chain_for(store, tmp_path)
    await store.add_suppression("gone@example.org", "hard_bounce")
    queued = await store.queue_message(
        NewMessage(
            "news@example.com",
            ("someone@example.net", "Gone@Example.org", "other@example.net"),
            HTML_MESSAGE,
        )
    )
    claimed = await store.claim_due("node", limit=10, lease=60)
    messages = await store.load_messages([queued.queue_id])
    result = await chain.run(messages[queued.queue_id], claimed)

    assert [(r.address, s.reason) for r, s in result.suppressed] == [
        ("Gone@Example.org", "hard_bounce")
    ]
    assert [c.recipient.address for c in result.copies] == [
        "someone@example.net",
        "other@example.net",
    ]
    for copy in result.copies:
        # VERP: the bounce address names this recipient row, and nobody can forge it.
        local, _, domain = copy.sender.partition("@")
        assert domain == "bounces.example.com" and local.startswith("b+")
        assert codec.parse_verp(local[2:].upper()) == copy.recipient.id

        parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
        assert parsed["X-SmartRelay-ID"] == queued.queue_id
        assert parsed["Message-ID"] == f"<{queued.queue_id}@relay.test>"
        assert [k for k in parsed if k.lower().startswith("x-smartrelay-")] == ["X-SmartRelay-ID"]
        assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        unsubscribe = str(parsed["List-Unsubscribe"])
        web_token = unsubscribe.split("/u/")[1].split(">")[0]
        # The address rides along (encrypted), for when the row is purged.
        assert codec.parse_unsubscribe(web_token) == (copy.recipient.id, copy.recipient.address)
        assert copy.recipient.address.split("@")[0] not in web_token
        assert "<mailto:u+" in unsubscribe

        html_part, text_part = None, None
        for part in parsed.walk():
            if part.get_content_type() == "text/html":
                html_part = part.get_content()
            elif part.get_content_type() == "text/plain":
                text_part = part.get_content()
        assert text_part == "See https://shop.example.com/"
        text_bytes = (
            b"Content-Type: text/plain; charset=utf-8\r\n\r\nSee https://shop.example.com/\r\n"
        )
        assert text_bytes in copy.data  # the text part is byte-identical
        assert html_part is not None
        click = html_part.split('href="https://t.example.com/c/')[1].split('"')[0]
        assert codec.parse_click(click) == (
            copy.recipient.id,
            "https://shop.example.com/p?a=1&b=2#x",
        )
        assert 'href="mailto:help@example.com"' in html_part
        pixel = html_part.split('src="https://t.example.com/o/')[1].split('.gif"')[0]
        assert codec.parse_open(pixel) == copy.recipient.id

        assert copy.data.startswith(b"DKIM-Signature:")
        assert perl_verify(copy.data, records)[0] == "pass"


@pytest_twisted.ensureDeferred
async def test_per_message_control_headers_switch_steps_off(store: Store, tmp_path: Path) -> None:
    chain, _, _ = chain_for(store, tmp_path)
    raw = HTML_MESSAGE.replace(
        b"X-SmartRelay-Tag: promo\r\n",
        b"X-SmartRelay-Track-Opens: no\r\nX-SmartRelay-Track-Clicks: no\r\n"
        b"X-SmartRelay-Unsubscribe: no\r\n",
    )
    queued = await store.queue_message(
        NewMessage(
            "news@example.com",
            ("someone@example.net",),
            raw,
            options={"track_opens": False, "track_clicks": False, "unsubscribe": False},
        )
    )
    claimed = await store.claim_due("node", limit=10, lease=60)
    message = (await store.load_messages([queued.queue_id]))[queued.queue_id]
    (copy,) = (await chain.run(message, claimed)).copies
    assert b"List-Unsubscribe" not in copy.data
    # (not "/o/" or "/c/": base64 in the DKIM signature may spell those by chance)
    assert b"https://t.example.com/" not in copy.data
    assert b'href="https://shop.example.com/p?a=1&amp;b=2#x"' in copy.data
    assert b"X-SmartRelay-Track" not in copy.data


@pytest_twisted.ensureDeferred
async def test_the_unsubscribe_link_carries_the_address_when_it_fits(
    store: Store, tmp_path: Path
) -> None:
    """An SMTPUTF8 address rides in the link as any other; one of more than 256 octets (the
    listener counts a path's characters, so it can accept one) gets the link that names the
    row only, and the copy is still made."""
    chain, codec, _ = chain_for(store, tmp_path)
    utf8 = "j\u00fcrgen@b\u00fccher.example"
    too_long = "\u00fc" * 64 + "@" + "b\u00fccher." * 20 + "example"
    assert len(too_long) <= 254 and len(too_long.encode("utf-8")) > 256
    queued = await store.queue_message(
        NewMessage("news@example.com", (utf8, too_long), HTML_MESSAGE)
    )
    claimed = await store.claim_due("node", limit=10, lease=60)
    message = (await store.load_messages([queued.queue_id]))[queued.queue_id]
    copies = {copy.recipient.address: copy for copy in (await chain.run(message, claimed)).copies}
    assert set(copies) == {utf8, too_long}
    for address, expected in ((utf8, utf8), (too_long, None)):
        copy = copies[address]
        parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
        web_token = str(parsed["List-Unsubscribe"]).split("/u/")[1].split(">")[0]
        assert codec.parse_unsubscribe(web_token) == (copy.recipient.id, expected)


def test_tracking_template_gives_the_same_bytes_as_rewriting_each_copy(tmp_path: Path) -> None:
    """The per-message template (HTML tokenized once) and the direct per-recipient rewrite
    produce identical copies, over every MIME fixture."""
    from smartrelay.rewrap.chain import OutgoingCopy, TrackingStep
    from smartrelay.storage.store import ClaimedRecipient, StoredMessage

    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings("relay.test", "https://t.example.com", "bounces.example.com")
    templated, direct = TrackingStep(codec, settings), TrackingStep(codec, settings)
    direct._templating = False
    fixtures = sorted((Path(__file__).parent / "fixtures" / "mime").glob("*.eml"))
    assert fixtures
    changed = 0
    for path in fixtures:
        raw = path.read_bytes()
        message = StoredMessage("Q1", 0.0, "a@example.com", (), {}, {}, raw)
        for recipient_id in (1, 2, 99):
            recipient = ClaimedRecipient(recipient_id, "Q1", "r@example.net", "example.net", 0)
            outputs: list[bytes] = []
            for step in (templated, direct):
                copy = OutgoingCopy.of(message, recipient, "a@example.com", raw)
                step.apply(copy)  # synchronous: it changes the copy in place
                outputs.append(copy.data)
            assert outputs[0] == outputs[1], path.name
            changed += outputs[0] != raw
    assert changed > 0  # some fixtures have HTML to track


@pytest.mark.parametrize("mark", ["\x00", "\x01", "\ue000", "\x00P\x01", "\x000\x01"])
def test_html_holding_a_slot_mark_is_tracked_the_direct_way(tmp_path: Path, mark: str) -> None:
    """The template's slot marks are NUL and SOH: a part that holds one (hostile or broken
    HTML) is rewritten the direct way, with the same result, its own text kept."""
    from smartrelay.rewrap.chain import OutgoingCopy, TrackingStep
    from smartrelay.storage.store import ClaimedRecipient, StoredMessage

    html = f'<html><body><p>a{mark}b</p><a href="https://shop.example.com/x">x</a></body></html>'
    raw = (
        b"From: a@example.com\r\nTo: r@example.net\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + html.encode("utf-8")
        + b"\r\n"
    )
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings("relay.test", "https://t.example.com", "bounces.example.com")
    templated, direct = TrackingStep(codec, settings), TrackingStep(codec, settings)
    direct._templating = False
    message = StoredMessage("Q1", 0.0, "a@example.com", (), {}, {}, raw)
    recipient = ClaimedRecipient(7, "Q1", "r@example.net", "example.net", 0)
    outputs = []
    for step in (templated, direct):
        copy = OutgoingCopy.of(message, recipient, "a@example.com", raw)
        step.apply(copy)
        outputs.append(copy.data)
    assert outputs[0] == outputs[1]
    assert b'href="https://t.example.com/c/' in outputs[0]
    assert f"<p>a{mark}b</p>".encode() in outputs[0]
    assert b"shop.example.com/x" not in outputs[0]


def test_tracking_cuts_each_message_once_whatever_its_recipient_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-recipient copies reuse the message's MIME plan: the message is not walked again."""
    import smartrelay.rewrap.chain as chain_module
    from smartrelay.rewrap.chain import OutgoingCopy, TrackingStep
    from smartrelay.storage.store import ClaimedRecipient, StoredMessage

    cuts: list[bytes] = []
    from smartrelay.rewrap.mime import plan_html_parts as real_plan

    def counting_plan(raw: bytes) -> MimePlan:
        cuts.append(raw)
        return real_plan(raw)

    monkeypatch.setattr(chain_module, "plan_html_parts", counting_plan)
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings("relay.test", "https://t.example.com", "bounces.example.com")
    step = TrackingStep(codec, settings)
    message = StoredMessage("Q1", 0.0, "news@example.com", (), {}, {}, HTML_MESSAGE)
    bodies = set()
    for recipient_id in range(1, 51):
        recipient = ClaimedRecipient(recipient_id, "Q1", f"r{recipient_id}@example.net", "", 0)
        copy = OutgoingCopy.of(message, recipient, "news@example.com", HTML_MESSAGE)
        step.apply(copy)
        bodies.add(copy.body)
    assert cuts == [HTML_MESSAGE]
    assert len(bodies) == 50  # and yet every copy has its own tokens


def test_tracking_templates_are_kept_per_message_never_shared_between_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message's HTML is tokenized once for all its copies, in every job (one per domain),
    and so are its links' click-token payloads; another message is tokenized anew even when
    its HTML is the same (caches keyed by the HTML text or the URL only ever helped identical
    messages, which personalized mail never sends), and the step keeps templates only with
    the PLAN_CACHE messages whose plans it keeps."""
    import smartrelay.rewrap.chain as chain_module
    from smartrelay.rewrap.chain import OutgoingCopy, TrackingStep
    from smartrelay.rewrap.html import rewrite_html as real_rewrite
    from smartrelay.storage.store import ClaimedRecipient, StoredMessage

    tokenized: list[str] = []

    def counting_rewrite(html: str, *args: object, **kwargs: object) -> object:
        tokenized.append(html)
        return real_rewrite(html, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(chain_module, "rewrite_html", counting_rewrite)
    payloads: list[str] = []

    def counting_payload(url: str) -> bytes:
        payloads.append(url)
        return click_payload(url)

    monkeypatch.setattr(chain_module, "click_payload", counting_payload)
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings("relay.test", "https://t.example.com", "bounces.example.com")
    step = TrackingStep(codec, settings)

    def stored(number: int) -> StoredMessage:
        received = f"Received: by relay.test with ESMTP id Q{number}\r\n".encode()
        return StoredMessage(
            f"Q{number}", 0.0, "news@example.com", (), {}, {}, received + HTML_MESSAGE
        )

    first, second = stored(1), stored(2)
    bodies = set()
    for message in (first, second):
        for job in ("example.net", "example.org"):  # two jobs of the same message
            for recipient_id in range(3):
                recipient = ClaimedRecipient(recipient_id, message.queue_id, f"r@{job}", job, 0)
                copy = OutgoingCopy.of(message, recipient, "news@example.com", message.raw)
                step.apply(copy)
                assert b"https://t.example.com/c/" in copy.body
                bodies.add(copy.body)
    assert len(tokenized) == 2  # once per message, whatever its copies and jobs
    link = "https://shop.example.com/p?a=1&b=2#x"
    assert payloads == [link, link]  # its links' token payloads too, kept in the template
    assert len(bodies) == 3  # the same recipient ids get the same tokens in both messages
    for number in range(3, 3 + chain_module.PLAN_CACHE):
        message = stored(number)
        copy = OutgoingCopy.of(
            message,
            ClaimedRecipient(number, message.queue_id, "r@x.test", "x.test", 0),
            "news@example.com",
            message.raw,
        )
        step.apply(copy)
    assert len(step._plans) == chain_module.PLAN_CACHE
    assert first.raw not in step._plans and second.raw not in step._plans
    assert not [name for name in vars(step) if "template" in name]  # kept nowhere else


def test_top_level_7bit_html_whose_line_outgrows_smtp_becomes_quoted_printable(
    tmp_path: Path,
) -> None:
    from smartrelay.rewrap.chain import OutgoingCopy, TrackingStep
    from smartrelay.storage.store import ClaimedRecipient, StoredMessage

    line = b'<p><a href="https://shop.example.com/">x</a>' + b"y" * 940 + b"</p>"
    assert len(line) < 998
    raw = (
        b"From: news@example.com\r\nTo: r@example.net\r\nSubject: long\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        b"\r\n" + line + b"\r\n"
    )
    codec = TokenCodec(load_keyring(str(tmp_path / "secret.key")))
    settings = RewrapSettings("relay.test", "https://t.example.com", "bounces.example.com")
    message = StoredMessage("Q1", 0.0, "news@example.com", (), {}, {}, raw)
    recipient = ClaimedRecipient(7, "Q1", "r@example.net", "example.net", 0)
    copy = OutgoingCopy.of(message, recipient, "news@example.com", raw)
    TrackingStep(codec, settings).apply(copy)

    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in copy.fields
    assert max(len(x) for x in copy.data.split(b"\r\n")) <= 78
    parsed = email.message_from_bytes(copy.data, policy=email.policy.default)
    html = parsed.get_content()
    assert "https://t.example.com/c/" in html and "y" * 940 in html
    assert "https://shop.example.com/" not in html  # rewritten


@pytest.mark.parametrize(
    "signature",
    [
        [b"DKIM-Signature: v=1; a=rsa-sha256;\r\n b=AAAA\r\n"],
        [b"DKIM-Signature: v=1; b=AAAA\r\n", b"DKIM-Signature: v=1; b=BBBB\r\n"],
        [b"DKIM-Signature: v=1; a=rsa-sha256;\n b=AAAA\n"],  # LF: a message of one bare line
        [],
    ],
)
def test_the_signature_fields_go_on_top_as_the_joined_bytes_cut_would(
    signature: list[bytes],
) -> None:
    """The DKIM step puts the signer's fields on top as they are, cut as split_header_block
    would cut their join (a lone LF becomes a space)."""
    from smartrelay.rewrap.chain import DkimStep, OutgoingCopy
    from smartrelay.storage.store import ClaimedRecipient, StoredMessage

    raw = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"
    message = StoredMessage("Q1", 0.0, "a@example.com", (), {}, {}, raw)
    recipient = ClaimedRecipient(1, "Q1", "r@example.net", "example.net", 0)
    put = OutgoingCopy.of(message, recipient, "a@example.com", raw)
    added = OutgoingCopy.of(message, recipient, "a@example.com", raw)
    DkimStep._put(put, list(signature))
    DkimStep._add(added, b"".join(signature))
    assert put.fields == added.fields
    for field in put.fields:  # CRLF line ends only
        assert field.endswith(b"\r\n") and b"\n" not in field.replace(b"\r\n", b"")
