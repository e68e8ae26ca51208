"""The re-wrap chain: what turns an accepted message into the copy a recipient receives.

Order (each step one object, one job, DKIM last):

    suppression (per message: suppressed recipients drop out)
    → VERP return path → X-SmartRelay-ID / Message-ID → List-Unsubscribe (+ one-click)
    → open pixel and click links → removal of the control headers → DKIM signature

VERP and the tracking tokens identify the recipient, so from the VERP step on there is one copy
per recipient. Forwarder mode (a smarthost route) skips the chain: the central SmartRelay
does it, and needs the control headers that are still in the message.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence

from attrs import Factory, define, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from smartrelay.events import WarningEvent
from smartrelay.rewrap.content_checks import ContentWarning, check_message
from smartrelay.rewrap.dkim import DkimSigner
from smartrelay.rewrap.headers import (
    CONTROL_PREFIX,
    field_name,
    header_block_end,
    split_header_block,
)
from smartrelay.rewrap.html import NOTRACK_ATTRIBUTE, rewrite_html
from smartrelay.rewrap.mime import MimePlan, plan_html_parts
from smartrelay.storage.store import ClaimedRecipient, Store, StoredMessage, Suppression
from smartrelay.tokens import TokenCodec, click_payload

log = Logger()

#: Runs a function in a thread pool (e.g. ``deferToThreadPool`` on the reactor's pool).
InThread = Callable[[Callable[[], bytes]], Deferred[bytes]]
#: Records a message's ``warning`` event once (``Store.record_warnings``).
WarningRecorder = Callable[[str, WarningEvent], Awaitable[bool]]

TRACE_FIELDS = (b"received", b"return-path")
#: Messages kept cut into parts, with their HTML tokenized, for their next job (a message to
#: several domains is one job per domain). Nothing is shared between messages: each stored
#: message has bytes of its own (its Received field), and personalized mail has HTML of its
#: own too, so a cache keyed by content would only ever hit for identical messages.
PLAN_CACHE = 16
#: A message bigger than this is not kept in that cache, which counts entries, not bytes:
#: only the latest big one is, in a slot of its own, so its recipients share its plan while
#: memory holds one big message's worth at most.
CACHE_ENTRY_LIMIT = 1 << 20


@frozen
class RewrapSettings:
    hostname: str
    base_url: str  # no trailing slash
    return_path_domain: str
    track_opens: bool = True
    track_clicks: bool = True
    list_unsubscribe: bool = True
    unsubscribe_mailto: bool = True


@define
class OutgoingCopy:
    """One recipient's copy of a message, as the steps pass it along: the header fields (each
    with its continuation lines and line end) and the rest (the empty line and the body), so
    that no step parses the header section again."""

    message: StoredMessage
    recipient: ClaimedRecipient
    sender: str
    fields: list[bytes]
    body: bytes

    @classmethod
    def of(
        cls, message: StoredMessage, recipient: ClaimedRecipient, sender: str, data: bytes
    ) -> OutgoingCopy:
        fields, body = split_header_block(data)
        return cls(message, recipient, sender, fields, body)

    @property
    def data(self) -> bytes:
        return b"".join(self.fields) + self.body

    def has_field(self, name: bytes) -> bool:
        return any(field_name(f) == name for f in self.fields)

    def set_field(self, name: bytes, value: bytes) -> None:
        """Replace the value of the (first) field ``name``, or add the field at the end."""
        wanted = name.lower()
        for index, field in enumerate(self.fields):
            if field_name(field) == wanted:
                self.fields[index] = field.split(b":", 1)[0] + b": " + value + b"\r\n"
                return
        self.fields.append(name + b": " + value + b"\r\n")

    def insert_fields(self, new: Sequence[bytes]) -> None:
        """Header fields added after the trace fields (which stay on top, RFC 5321 4.4)."""
        position = 0
        while position < len(self.fields) and field_name(self.fields[position]) in TRACE_FIELDS:
            position += 1
        self.fields[position:position] = new

    def option(self, name: str, default: bool) -> bool:
        """A per-message control header (SPEC section 3) wins over the config default."""
        value = self.message.options.get(name)
        return default if value is None else bool(value)


class IRewrapStep(Interface):
    """One concern of the chain, applied to one recipient's copy."""

    def apply(copy: OutgoingCopy) -> OutgoingCopy | Deferred[OutgoingCopy]:
        """The copy with this step's change made: a Deferred of it when the step waits for
        something (the DKIM step's signing thread), else the copy itself (no Deferred made
        and awaited for each step of each copy)."""


@implementer(IRewrapStep)
class VerpStep:
    """``MAIL FROM:<b+TOKEN@return_path_domain>``: bounces come back to us, attributable."""

    def __init__(self, codec: TokenCodec, return_path_domain: str) -> None:
        self._codec = codec
        self._domain = return_path_domain

    def apply(self, copy: OutgoingCopy) -> OutgoingCopy | Deferred[OutgoingCopy]:
        copy.sender = f"b+{self._codec.verp_token(copy.recipient.id)}@{self._domain}"
        return copy


@implementer(IRewrapStep)
class IdentityStep:
    """``X-SmartRelay-ID`` always (ours only: one the application wrote goes, SPEC section
    3); ``Message-ID`` when the application gave none."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname

    def apply(self, copy: OutgoingCopy) -> OutgoingCopy | Deferred[OutgoingCopy]:
        queue_id = copy.message.queue_id
        copy.fields = [f for f in copy.fields if field_name(f) != b"x-smartrelay-id"]
        fields = [f"X-SmartRelay-ID: {queue_id}\r\n".encode()]
        if not copy.has_field(b"message-id"):
            fields.append(f"Message-ID: <{queue_id}@{self._hostname}>\r\n".encode())
        copy.insert_fields(fields)
        return copy


@implementer(IRewrapStep)
class ListUnsubscribeStep:
    """``List-Unsubscribe`` (HTTPS and mailto) with ``List-Unsubscribe-Post`` (RFC 8058)."""

    def __init__(self, codec: TokenCodec, settings: RewrapSettings) -> None:
        self._codec = codec
        self._settings = settings

    def apply(self, copy: OutgoingCopy) -> OutgoingCopy | Deferred[OutgoingCopy]:
        if not copy.option("unsubscribe", self._settings.list_unsubscribe):
            return copy
        if copy.has_field(b"list-unsubscribe"):
            return copy  # the application manages its own
        recipient_id, address = copy.recipient.id, copy.recipient.address
        try:  # the address in the link: it still unsubscribes once the row is purged
            web_token = self._codec.unsubscribe_token(recipient_id, address)
        except ValueError:  # more than 256 octets (the listener counts characters): the row only
            web_token = self._codec.unsubscribe_token(recipient_id)
        targets = [f"<{self._settings.base_url}/u/{web_token}>"]
        if self._settings.unsubscribe_mailto:
            token = self._codec.unsubscribe_mailto_token(recipient_id)
            targets.append(f"<mailto:u+{token}@{self._settings.return_path_domain}>")
        value = ",\r\n ".join(targets)  # folded: one target per line
        copy.insert_fields(
            [
                f"List-Unsubscribe: {value}\r\n".encode(),
                b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
            ],
        )
        return copy


# The marks of a template's slots: control characters no HTML part holds (one that does is
# rewritten the direct way), and in Latin-1, so that a Latin-1 part's text stays one byte a
# character through the rewrite, the cut and the fill (a mark from the Private Use Area
# made every template's text two bytes a character, and its regex and encoding slower).
_SLOT = re.compile("\x00(P|[0-9]+)\x01")
_UNSAFE_IN_ATTRIBUTE = re.compile(r"[&\"'<>\s]")


@frozen
class HtmlTemplate:
    """An HTML part already rewritten, cut at each tracking URL: filling it for a recipient
    is one join instead of another HTML parse. ``literals`` has one more item than
    ``slots``; a slot is an index into ``links``, or -1 for the pixel. ``payloads`` are the
    links' click-token payloads (:func:`click_payload`), made once for all recipients."""

    literals: tuple[str, ...]
    slots: tuple[int, ...]
    links: tuple[str, ...]
    payloads: tuple[bytes, ...]

    @classmethod
    def from_pieces(
        cls, pieces: list[str], links: tuple[str, ...], payloads: tuple[bytes, ...]
    ) -> HtmlTemplate:
        """From HTML with ``\\x00N\\x01`` (link N) and ``\\x00P\\x01`` (pixel) marks,
        cut by ``_SLOT.split``: text, mark name, text, ..., text."""
        slots = tuple(-1 if name == "P" else int(name) for name in pieces[1::2])
        return cls(tuple(pieces[0::2]), slots, links, payloads)

    def fill(self, pixel: str, click_urls: Sequence[str]) -> str:
        """The HTML with ``click_urls[i]`` for link i and ``pixel`` for the pixel."""
        out = [""] * (2 * len(self.slots) + 1)
        out[0::2] = self.literals
        out[1::2] = [pixel if slot < 0 else click_urls[slot] for slot in self.slots]
        return "".join(out)


@define
class _Planned:
    """A message's MIME plan and the templates of its HTML parts, kept for its recipients."""

    plan: MimePlan | None
    templates: dict[tuple[str, bool, bool], HtmlTemplate | None] = Factory(dict)
    #: Its content warnings are checked (and recorded, if any): not again for its next jobs.
    checked: bool = False


@implementer(IRewrapStep)
class TrackingStep:
    """Open pixel and click links in the HTML parts, per the message's options.

    The HTML of a message is tokenized once (:class:`HtmlTemplate`, kept with the message's
    plan for its recipients); each recipient's copy only fills in its tokens and re-encodes
    the part.
    """

    def __init__(self, codec: TokenCodec, settings: RewrapSettings) -> None:
        self._codec = codec
        self._settings = settings
        self._plans: OrderedDict[bytes, _Planned] = OrderedDict()
        self._big_plan: tuple[bytes, _Planned] | None = None
        # Tracking URLs are written into attributes as they are: only plain ones may be.
        self._templating = not _UNSAFE_IN_ATTRIBUTE.search(settings.base_url)

    def _template(
        self, planned: _Planned, html: str, opens: bool, clicks: bool
    ) -> HtmlTemplate | None:
        """The template of one of ``planned``'s HTML parts, made at its first copy."""
        key = (html, opens, clicks)
        if key in planned.templates:
            return planned.templates[key]
        template = None
        if self._templating and "\x00" not in html and "\x01" not in html:
            links: list[str] = []
            payloads: list[bytes] = []

            def slot(url: str) -> str:
                try:
                    payload = click_payload(url)
                except ValueError:
                    return url  # left as it is, untracked
                links.append(url)
                payloads.append(payload)
                return f"\x00{len(links) - 1}\x01"

            result = rewrite_html(html, slot if clicks else None, "\x00P\x01" if opens else None)
            pieces = _SLOT.split(result.html)
            slots = len(pieces) // 2
            if slots == len(links) + (1 if opens else 0):  # every slot came out intact
                template = HtmlTemplate.from_pieces(pieces, tuple(links), tuple(payloads))
        planned.templates[key] = template
        return template

    def forget_big(self, message: StoredMessage) -> None:
        """``message``'s copies are made: let go of its plan if it is the big one kept."""
        if self._big_plan is not None and self._big_plan[0] is message.raw:
            self._big_plan = None

    def planned(self, message: StoredMessage) -> _Planned:
        """The message's plan, as this step keeps it for the message's copies."""
        return self._plan(message)

    def _plan(self, message: StoredMessage) -> _Planned:
        """The message's MIME cut into HTML parts and the bytes between, once per message
        (the plan is None when the MIME reader cuts the header section elsewhere than the
        chain does, a lone LF before the empty line: its body would not fit the copy's header
        fields). A big message's is kept alone, until its copies are made (forget_big)."""
        raw = message.raw  # the key: bytes keep their hash, and compare by identity first
        if len(raw) > CACHE_ENTRY_LIMIT:
            if self._big_plan is None or self._big_plan[0] is not raw:
                self._big_plan = None  # the old one goes before the new one is made
                self._big_plan = (raw, _Planned(_checked_plan(raw)))
            return self._big_plan[1]
        if raw in self._plans:
            self._plans.move_to_end(raw)
            return self._plans[raw]
        planned = self._plans[raw] = _Planned(_checked_plan(raw))
        while len(self._plans) > PLAN_CACHE:
            self._plans.popitem(last=False)
        return planned

    def apply(self, copy: OutgoingCopy) -> OutgoingCopy | Deferred[OutgoingCopy]:
        opens = copy.option("track_opens", self._settings.track_opens)
        clicks = copy.option("track_clicks", self._settings.track_clicks)
        recipient_id = copy.recipient.id
        base = self._settings.base_url
        pixel = f"{base}/o/{self._codec.open_token(recipient_id)}.gif" if opens else None

        def click_url(url: str) -> str:
            try:
                payload = click_payload(url)  # once: nothing keeps it across copies here
            except ValueError:
                return url  # left as it is, untracked
            [token] = self._codec.click_tokens_for_payloads(recipient_id, [payload])
            return f"{base}/c/{token}"

        def fill(html: str) -> str:
            if not (opens or clicks):  # only the opt-out attribute to remove
                if NOTRACK_ATTRIBUTE not in html.lower():
                    return html
                return rewrite_html(html, None, None).html
            template = self._template(planned, html, opens, clicks)
            if template is None:  # unusual HTML or base_url: the direct way
                return rewrite_html(html, click_url if clicks else None, pixel).html
            tokens = self._codec.click_tokens_for_payloads(recipient_id, template.payloads)
            return template.fill(pixel or "", [f"{base}/c/{token}" for token in tokens])

        planned = self._plan(copy.message)
        plan = planned.plan
        if plan is None or not plan.html_parts:
            return copy
        copy.body, top_to_qp = plan.render_body(fill)
        if top_to_qp:
            copy.set_field(b"Content-Transfer-Encoding", b"quoted-printable")
        return copy


@implementer(IRewrapStep)
class ControlHeaderRemovalStep:
    """Drop every ``X-SmartRelay-*`` header but ``X-SmartRelay-ID`` (SPEC section 3)."""

    def apply(self, copy: OutgoingCopy) -> OutgoingCopy | Deferred[OutgoingCopy]:
        copy.fields = [
            f
            for f in copy.fields
            if not field_name(f).startswith(CONTROL_PREFIX) or field_name(f) == b"x-smartrelay-id"
        ]
        return copy


@implementer(IRewrapStep)
class DkimStep:
    """The signature, last: any later change would break it.

    With ``in_thread`` (a way to run a function in a thread pool), the private-key operation
    runs there, on another core: it is the most expensive part of re-wrapping a copy.
    """

    def __init__(self, signer: DkimSigner, in_thread: InThread | None = None) -> None:
        self._signer = signer
        self._in_thread = in_thread

    def apply(self, copy: OutgoingCopy) -> OutgoingCopy | Deferred[OutgoingCopy]:
        if not self._signer.keys:
            return copy  # nothing to sign with: no copy of the whole message
        if self._in_thread is None:  # the split spares dkimpy's parse of the whole copy
            fields = self._signer.signature_field_list(copy.data, (copy.fields, copy.body))
            return self._put(copy, fields)
        signing = self._signer.signature_fields_off_thread(
            copy.data, self._in_thread, (copy.fields, copy.body)
        )
        return Deferred.fromCoroutine(signing).addCallback(lambda fields: self._put(copy, fields))

    @staticmethod
    def _add(copy: OutgoingCopy, signature_fields: bytes) -> OutgoingCopy:
        if signature_fields:
            fields, _ = split_header_block(signature_fields + b"\r\n")
            copy.fields[0:0] = fields
        return copy

    @staticmethod
    def _put(copy: OutgoingCopy, signature_fields: list[bytes]) -> OutgoingCopy:
        """The fields on top, as they are when they end with CRLF (the signer takes the line
        end of the copy's data, whose fields are cut at CRLF: always, but for a header
        section of one line without a line end), else cut as :meth:`_add` cuts them."""
        if not signature_fields or signature_fields[0].endswith(b"\r\n"):  # one for all
            copy.fields[0:0] = signature_fields
            return copy
        return DkimStep._add(copy, b"".join(signature_fields))


@frozen
class RewrapResult:
    copies: tuple[OutgoingCopy, ...]
    suppressed: tuple[tuple[ClaimedRecipient, Suppression], ...]
    #: Recipients for whom no copy could be made, with the reason (they bounce, ``technical``).
    failed: tuple[tuple[ClaimedRecipient, str], ...] = ()


class RewrapChain:
    def __init__(
        self,
        settings: RewrapSettings,
        codec: TokenCodec,
        signer: DkimSigner,
        store: Store,
        in_thread: InThread | None = None,
        record_warnings: WarningRecorder | None = None,
    ) -> None:
        """``record_warnings``: where each message's content warnings go (the relay passes
        ``store.record_warnings``); None, not checked."""
        self.settings = settings
        self._store = store
        self._signer = signer
        self._record_warnings = record_warnings
        self._tracking = TrackingStep(codec, settings)
        self.steps: tuple[IRewrapStep, ...] = (
            VerpStep(codec, settings.return_path_domain),
            IdentityStep(settings.hostname),
            ListUnsubscribeStep(codec, settings),
            self._tracking,
            ControlHeaderRemovalStep(),
            DkimStep(signer, in_thread),
        )
        #: When a step fails on a copy: the same copy without touching the body (no tracking).
        self.safe_steps = tuple(s for s in self.steps if not isinstance(s, TrackingStep))

    async def run(
        self,
        message: StoredMessage,
        recipients: Sequence[ClaimedRecipient],
        suppressions: Mapping[str, Suppression] | None = None,
    ) -> RewrapResult:
        """``suppressions``: the entries in force for the recipients (by lower-cased
        address), looked up by the caller a moment ago; None: looked up here."""
        active = suppressions
        if active is None:
            active = await self._store.active_suppressions(r.address for r in recipients)
        suppressed = tuple(
            (r, active[r.address.lower()]) for r in recipients if r.address.lower() in active
        )
        copies = []
        failed: list[tuple[ClaimedRecipient, str]] = []
        tracebacks_logged = False
        fields, body = split_header_block(message.raw)  # once per message
        if len(suppressed) < len(recipients):  # a copy goes out: what is in it matters
            await self._check_content(message, fields)
        for recipient in recipients:
            if recipient.address.lower() in active:
                continue
            # A step that raises on one copy (a bug, hostile input nobody foresaw) must not
            # leave the recipient without an outcome: the copy goes without the body's
            # tracking, or, if even that fails, the recipient bounces with the reason.
            try:
                copy = await self._wrap(self.steps, message, recipient, fields, body)
            except Exception as error:
                # One traceback per message (the first copy's): the others fail alike.
                report = log.warn if tracebacks_logged else log.failure
                tracebacks_logged = True
                report(
                    "{queue_id}: re-wrapping the copy for <{rcpt}> failed ({reason}); "
                    "sending it untracked",
                    queue_id=message.queue_id,
                    rcpt=recipient.address,
                    reason=_reason(error),
                )
                try:
                    copy = await self._wrap(self.safe_steps, message, recipient, fields, body)
                except Exception as second:
                    reason = _reason(second)
                    report = log.error if failed else log.failure
                    report(
                        "{queue_id}: no copy for <{rcpt}> could be made ({reason}): bouncing",
                        queue_id=message.queue_id,
                        rcpt=recipient.address,
                        reason=reason,
                    )
                    failed.append((recipient, reason))
                    continue
            copies.append(copy)
        self._tracking.forget_big(message)
        return RewrapResult(tuple(copies), suppressed, tuple(failed))

    async def _check_content(self, message: StoredMessage, fields: Sequence[bytes]) -> None:
        """Compute the message's content warnings and record them, once per message (here:
        once per kept plan; across processes and restarts: ``warnings_checked``, and the
        store records the first only). Never fails the delivery: an error is logged."""
        record = self._record_warnings
        if record is None or message.warnings_checked or not message.raw:
            return
        warnings: tuple[ContentWarning, ...] = ()
        planned = None
        try:
            planned = self._tracking.planned(message)  # the MIME cut once, for tracking too
            if planned.checked:
                return
            warnings = check_message(fields, planned.plan, self._signs)
        except Exception:
            log.failure("{queue_id}: checking the content failed", queue_id=message.queue_id)
        if warnings:
            event = WarningEvent(tuple(w.as_dict() for w in warnings))
            try:
                await record(message.queue_id, event)
            except Exception:  # the next job of the message tries again
                log.failure("{queue_id}: recording its warnings failed", queue_id=message.queue_id)
                return
        if planned is not None:
            planned.checked = True

    def _signs(self, from_domain: str | None) -> bool:
        return from_domain is not None and bool(self._signer.keys_for(from_domain))

    @staticmethod
    async def _wrap(
        steps: Sequence[IRewrapStep],
        message: StoredMessage,
        recipient: ClaimedRecipient,
        fields: Sequence[bytes],
        body: bytes,
    ) -> OutgoingCopy:
        copy = OutgoingCopy(message, recipient, message.sender, list(fields), body)
        for step in steps:
            applied = step.apply(copy)
            copy = await applied if isinstance(applied, Deferred) else applied
        return copy


def _checked_plan(raw: bytes) -> MimePlan | None:
    """:func:`plan_html_parts`, or None when it cuts the header section elsewhere than the
    chain does."""
    plan: MimePlan | None = plan_html_parts(raw)
    if plan is not None and plan.head != raw[: header_block_end(raw)]:
        return None
    return plan


def _reason(error: BaseException) -> str:
    """One line for an event: the exception's type and message, bounded."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 200 else text[:197] + "..."
