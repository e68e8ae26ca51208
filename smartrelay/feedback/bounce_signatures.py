"""The table of non-standard bounce formats: data read by :mod:`smartrelay.feedback.nonstandard`.

Each :class:`Signature` says how to recognise one family of bounce texts (an MTA's or a
provider's own wording, in whatever language it writes), where the failed addresses are, and
where the reason is. The table is ordered: the first signature that recognises a bounce *and*
yields at least one address wins, so specific formats come before the generic ones at the end.
Adding an MTA is adding a row (docs/feedback-text-bounces.md says how).

All patterns are matched case-insensitively with ``re.MULTILINE`` against the report's text
(its text parts decoded, cut before the returned message, at most
:data:`~smartrelay.feedback.nonstandard.MAX_REPORT_CHARS` characters). Every pattern must be
linear: bounded repetitions only, no nested unbounded quantifiers (a hypothesis test feeds the
table megabytes of hostile text).
"""

from __future__ import annotations

from typing import Final, Literal

from attrs import frozen

__all__ = [
    "ADDR",
    "BOUNCE_HEADERS",
    "CUT_MARKERS",
    "DELAY_MARKERS",
    "SENTENCE_ADDRESSES",
    "SIGNATURES",
    "SUCCESS_MARKERS",
    "Signature",
]

#: One mail address, captured as the group ``addr``: a dot-atom-ish local part (Unicode letters
#: allowed, for SMTPUTF8) and a domain of at least two labels.
ADDR: Final = (
    r"(?P<addr>[\w.!#$%&'*+/=?^`{|}~-]{1,64}@(?:[\w-]{1,63}\.){1,10}[^\W\d_]{2,63}"
    r"|[\w.!#$%&'*+/=?^`{|}~-]{1,64}@(?:[\w-]{1,63}\.){1,10}xn--[\w-]{1,59})"
)


@frozen
class Signature:
    """One bounce format."""

    #: Shown in logs and tests.
    name: str
    #: The report's text matches one of these (empty: no text condition).
    body: tuple[str, ...] = ()
    #: ``(header name, pattern)``: one of these headers of the bounce matches (empty: no header
    #: condition). With both ``body`` and ``headers`` given, both must match.
    headers: tuple[tuple[str, str], ...] = ()
    #: The region holding the addresses begins after the first match of this pattern (None:
    #: after the first ``body`` match, or at the start of the text).
    start: str | None = None
    #: ... and ends before the first match of this pattern after its start (None: the end of
    #: the report text, which is already cut before the returned message).
    end: str | None = None
    #: Patterns with an ``addr`` group (built with :data:`ADDR`) that find the failed
    #: addresses in the region; empty: the generic address lines (an address alone at the start
    #: of a line, in angle brackets or not, or after a label such as ``Recipient address:``).
    addresses: tuple[str, ...] = ()
    #: A pattern with a ``reason`` group, searched in the region: the reason of every address
    #: found, put before the text that follows each address (None: that text alone).
    reason: str | None = None
    #: ``delayed`` for a warning that the message is still being retried.
    action: Literal["failed", "delayed"] = "failed"


#: Headers that mark a message as a bounce of some kind: the condition of the language and
#: generic rows, whose wording alone could also appear in a person's mail.
BOUNCE_HEADERS: Final[tuple[tuple[str, str], ...]] = (
    (
        "From",
        r"mailer[-_ ]?daemon|postmaster|mail ?delivery|mail ?system|mdaemon|\bdaemon\b"
        r"|delivery[-_ ]?(?:subsystem|notification|status|system)|administrator|\bmta\b"
        r"|\bsmtp\b|\bexchange\b|mail-?router|mailmaster|mailadmin",
    ),
    (
        "Subject",
        r"undeliver|not delivered|delivery (?:status|failure|failed|notification|problem"
        r"|report|error|has failed|incomplete|delayed)|returned (?:mail|message)|failure notice"
        r"|mail delivery|non[- ]?delivery|nondeliverable|could not be delivered|bounce"
        r"|rejected|delayed mail|mail failure|error sending|unzustellbar|nicht zustellbar|zustell"
        r"|non remis|non distribu|échec|no (?:se )?(?:pudo|puede) entregar|no entregado"
        r"|devuelto|non recapita|mancata consegna|não entregue|nao entregue|devolvid"
        r"|(?:não foi possível|impossível) entregar"
        r"|onbestelbaar|niet afgeleverd|エラー|不達|配信|退信|投递|投遞|未送达|送信失敗"
        r"|не доставлен|недоставлен|niedostarcz",
    ),
    ("X-Failed-Recipients", r"@"),
    ("Content-Type", r"multipart/report"),
)

#: Where the generic address lines find nothing: an address inside a sentence that says it
#: failed ("Your message to <a@b> was rejected", "could not deliver the message to a@b").
SENTENCE_ADDRESSES: Final[tuple[str, ...]] = (
    r"(?:message|mail|e-?mail) (?:to|for|addressed to) <?" + ADDR + r">?,? (?:was|could|has|is"
    r"|couldn't|cannot|can't|failed|did)",
    r"(?:deliver|delivery|delivering|delivered|send|sent|sending)(?: of)?(?: (?:your|the|this)"
    r" (?:message|mail|e-?mail))? to:? <?" + ADDR,
    r"(?:undeliverable|rejected|refused|failed|failure) (?:to|for):? <?" + ADDR,
    r"(?:recipient|address|user|mailbox)(?: address)?:? <" + ADDR + r">",
)

#: A line that starts the returned message (or its headers): the report text ends there.
CUT_MARKERS: Final[tuple[str, ...]] = (
    r"^[ \t]*-{2,}[ \t]*(?:the )?(?:this is a copy of|below this line is a copy"
    r"|below the next line is a copy|original message|original-message|returned message"
    r"|returned mail|start of returned"
    r"|start of the original|message (?:text|headers) follows|copy of the message|the original"
    r" message|header of the original|original headers|mensaje original|message d'origine"
    r"|message original|originalnachricht|original-nachricht|ursprüngliche nachricht"
    r"|messaggio originale|mensagem original|oorspronkelijk bericht|元のメッセージ|原始邮件"
    r"|原邮件|原始郵件|kopie der (?:ursprünglichen )?nachricht|copie du message"
    r"|copia del (?:mensaje|messaggio)|cópia da mensagem)",
    r"^[ \t]*(?:original message (?:follows|headers)|original message headers:"
    r"|included is a copy of the message header|your message reads(?: \(in part\))?:"
    r"|possibly truncated original message follows|message headers follow"
    r"|-+ ?original message ?-+|the (?:original|returned) message (?:is )?(?:attached|follows)"
    r"|\*+ ?end of message ?\*+|below is a copy of the original message:?)",
    r"^[ \t]*={3,}[ \t]*(?:original|returned)",
)

#: Wording that makes the whole report a warning (the message is still being retried).
DELAY_MARKERS: Final[tuple[str, ...]] = (
    r"this is a warning (?:message )?only",
    r"has not yet been delivered",
    r"have not yet been delivered",
    r"delivery (?:to the following recipients? )?(?:has been |is )?delayed",
    r"delivery (?:status notification )?\(delay\)",
    r"message (?:delivery )?(?:has been |is )?delayed",
    r"will (?:continue|keep) (?:to )?(?:try|trying|retry|retrying|attempt)",
    r"(?:will|shall) (?:retry|try again|attempt (?:delivery|to deliver) again)",
    r"still (?:being )?(?:retried|trying|retrying|attempting)",
    r"no action is required on your part",
    r"you do not need to resend",
    r"delivery incomplete",
    r"temporary problem delivering",
    r"technical details of temporary failure",
    r"noch nicht zugestellt",
    r"zustellung verzögert",
    r"n'a pas encore pu être (?:remis|distribué)",
    r"remise différée",
    r"entrega (?:retrasada|demorada|atrasada)",
    r"consegna ritardata",
    r"delivery attempts will continue",
    r"will be retried",
    r"(?:has been|was) (?:postponed|deferred)",
    r"please do not resend",
    r"this is just a warning",
    r"transient non-fatal errors?",
    r"delays in delivering your message",
    r"delivery is delayed to these recipients",
)

#: Wording of a delivery or relay receipt (Exchange's "Delivered:" and "Relayed:", Notes'
#: return receipts): without failure wording beside it, such a text is no bounce.
SUCCESS_MARKERS: Final[tuple[str, ...]] = (
    r"your message has been delivered to the following recipients",
    r"delivery to (?:these|the following) recipients? (?:or groups )?(?:is complete|succeeded"
    r"|was successful|has been completed)",
    r"(?:was|has been) (?:successfully )?(?:delivered|relayed) to the (?:following|destination)",
    r"the message was successfully (?:delivered|relayed)",
    r"zustellung (?:war )?erfolgreich",
    r"remis avec succès",
)

SIGNATURES: Final[tuple[Signature, ...]] = (
    # --- Gmail / Google Workspace (new and old texts) -------------------------------------
    Signature(
        name="gmail",
        body=(
            r"^[ \t]*(?:address not found|message not delivered|message blocked|delivery"
            r" incomplete|message rejected|recipient inbox full)[ \t]*$",
            r"(?:wasn't|was not|couldn't be|could not be) delivered to \S{1,80}@",
            r"there was a (?:temporary )?problem delivering your message to",
        ),
        addresses=(
            r"(?:wasn't|was not|couldn't be|could not be|hasn't been|has not been) delivered to"
            r" <?" + ADDR,
            r"problem delivering your message to <?" + ADDR,
        ),
    ),
    Signature(
        name="gmail-old",
        body=(
            r"delivery to the following recipients? (?:failed|has been delayed|was aborted)",
            r"technical details of (?:permanent|temporary) failure",
        ),
    ),
    # --- Exchange / Office 365 / Outlook.com / Hotmail -------------------------------------
    Signature(
        name="office365",
        body=(
            r"your message to \S{1,80}@\S{1,255} couldn't be delivered",
            r"^[ \t]*delivery has failed to these recipients or (?:groups|distribution lists)",
            r"^[ \t]*(?:the following recipient\(s\) cannot be reached|did not reach the"
            r" following recipient)",
            r"your message did not reach some or all of the intended recipients",
            r"diagnostic information for administrators",
        ),
        end=r"^[ \t]*original message headers",
        addresses=(
            r"your message to <?" + ADDR + r">? couldn't be delivered",
            r"^[ \t]*(?:[^<>@\n]{1,80}<(?:mailto:)?)?['\"]?"
            + ADDR
            + r"['\">]{0,2}[ \t]*(?:\([^)\n]{0,300}\))?"
            r"[ \t]*(?:on [^\n]{0,60})?$",
            r"^[ \t]*" + ADDR + r"[ \t]*\n",
        ),
    ),
    # --- Exim (English and its translations) ------------------------------------------------
    Signature(
        name="exim-text",
        body=(
            r"this message was created automatically by mail delivery software",
            r"a message that you sent (?:could not be delivered|has not yet been delivered"
            r"|was rejected)",
            r"the following address(?:\(es\)|es)? failed",
            r"diese nachricht wurde automatisch",
            r"ce message a été créé automatiquement",
            r"este mensaje (?:fue|ha sido) (?:creado|generado) automáticamente",
            r"questo messaggio è stato (?:creato|generato) automaticamente",
            r"esta mensagem foi (?:criada|gerada) automaticamente",
        ),
    ),
    # --- qmail and friends ------------------------------------------------------------------
    Signature(
        name="qmail",
        body=(
            r"this is the qmail-send program",
            r"i'm afraid i wasn't able to deliver your message",
            r"this is the (?:deliver program|email server|mail delivery agent) at",
        ),
        addresses=(r"^[ \t]*<" + ADDR + r">:?",),
    ),
    # --- Postfix's own text -----------------------------------------------------------------
    Signature(
        name="postfix",
        body=(
            r"this is the (?:mail system|postfix program) at host",
            r"your message could not be delivered to one or more recipients",
        ),
        addresses=(r"^[ \t]*<" + ADDR + r">(?=[ \t]*(?::|\(expanded from))",),
    ),
    # --- Sendmail and Sendmail-based (AOL, older Yahoo, many ISPs) --------------------------
    Signature(
        name="sendmail",
        body=(
            r"-{3,} ?the following addresses had (?:permanent fatal|transient non-fatal) errors",
            r"-{3,} ?transcript of session follows",
            r"the original message was received at",
        ),
        start=r"the following addresses had|transcript of session follows",
    ),
    # --- Yahoo / AOL ------------------------------------------------------------------------
    Signature(
        name="yahoo",
        body=(
            r"sorry,? we were unable to deliver your message to the following address",
            r"unable to deliver message to the following address",
            r"message from yahoo",
        ),
        addresses=(r"^[ \t]*<?" + ADDR + r">?:",),
    ),
    Signature(
        name="aol",
        body=(
            r"your mail to the following recipients could not be delivered",
            r"this message was undeliverable due to the following reason",
        ),
    ),
    # --- Lotus Notes / Domino ---------------------------------------------------------------
    Signature(
        name="domino",
        body=(r"^[ \t]*was not delivered to:",),
        start=r"was not delivered to:",
        end=r"^[ \t]*because:",
        reason=r"because:\s*(?P<reason>[^\n]{1,400}(?:\n[ \t]{1,20}\S[^\n]{0,400}){0,5})",
    ),
    # --- GroupWise / Novell -----------------------------------------------------------------
    Signature(
        name="groupwise",
        body=(
            r"the message that you sent was undeliverable to the following",
            r"the following recipients? (?:did not receive|could not receive) this message",
        ),
        addresses=(
            r"^[ \t]*<?" + ADDR + r">?(?:[ \t]*\([^)\n]{0,200}\))?[ \t]*$",
            r"^[ \t]*<?" + ADDR + r">?[: \t]",
        ),
    ),
    # --- Mirapoint, MXLogic, MessageLabs, Postini, Barracuda, MailEnable ---------------------
    Signature(
        name="mirapoint",
        body=(r"your message cannot be delivered to the following recipients",),
        addresses=(r"recipient address:[ \t]*<?" + ADDR,),
    ),
    Signature(
        name="barracuda",
        body=(r"was (?:blocked|rejected) by (?:our|the) (?:barracuda|spam firewall)",),
        addresses=(r"your message to:?[ \t]*<?" + ADDR,),
    ),
    Signature(
        name="filtering-services",
        body=(
            r"delivery to the following recipients failed",
            r"the following recipients? (?:could not be reached|could not receive)",
            r"the following address(?:es)? failed",
            r"message from[ \t]+\S{0,40}psmtp\.com",
            r"message could not be delivered to some recipients",
            r"could not deliver message to the following recipient",
            r"message not delivered to the following addresses",
        ),
        addresses=(
            r"(?:recipient|failed recipient|intended recipient):[ \t]*(?:\[smtp:)?<?" + ADDR,
        ),
    ),
    # --- OpenSMTPD, Apache James, MailMarshal, InterScan MSS ---------------------------------
    Signature(
        name="opensmtpd",
        body=(
            r"this is the mailer-daemon, please do not reply",
            r"an error has occurred while attempting to deliver a message",
        ),
    ),
    Signature(
        name="james",
        body=(r"this is the james mail server at",),
        start=r"^[ \t]*failed recipient\(s\):",
        reason=r"^[ \t]*error message:[ \t]*\n?(?P<reason>[^\n]{1,400}(?:\n[^\n]{1,400}){0,3})",
    ),
    Signature(
        name="mailmarshal",
        body=(r"the following recipients were affected", r"could not be delivered because of"),
        start=r"the following recipients were affected:?",
        reason=r"could not be delivered because of[ \t]*\n?\s{0,40}(?P<reason>[^\n]{1,400}"
        r"(?:\n[ \t]*\S[^\n]{0,400}){0,3})",
    ),
    Signature(
        name="interscan-mss",
        body=(r"^[ \t]*sent <<< rcpt to:", r"^[ \t]*received >>> [45]\d\d"),
        addresses=(r"rcpt to:[ \t]*<" + ADDR,),
    ),
    # --- MDaemon, IMail, Courier, Smail and other Windows/Unix MTAs -------------------------
    Signature(
        name="mdaemon",
        body=(
            r"the attached message had (?:permanent|transient) fatal delivery errors",
            r"the following addresses did not receive a copy of your message",
            r"-{2,} session transcript -{2,}",
        ),
        addresses=(r"rcpt to:[ \t]*<" + ADDR, r"^[ \t>]*" + ADDR + r"[ \t]*$"),
    ),
    Signature(
        name="imail",
        body=(
            r"^[ \t]*unknown user:",
            r"delivery failed \d{1,3} attempts?:",
            r"^[ \t]*original message follows\.",
        ),
        addresses=(
            r"unknown user:[ \t]*<?" + ADDR,
            r"delivery failed \d{1,3} attempts?:[ \t]*<?" + ADDR,
            r"rcpt to:[ \t]*<" + ADDR,
        ),
    ),
    Signature(
        name="courier",
        body=(r"running the courier mail server", r"^[ \t]*undeliverable mail[ \t]*$"),
    ),
    Signature(
        name="smail",
        body=(r"failed addresses follow:",),
        start=r"failed addresses follow:",
        end=r"message text follows:",
    ),
    Signature(
        name="interscan-smtpsvc",
        body=(
            r"the email below could not be delivered to the following user",
            r"message from interscan e-mail viruswall",
            r"^[ \t]*unable to deliver message to",
        ),
    ),
    # --- other languages (texts from old MTAs and localised providers) ------------------------
    Signature(
        name="german",
        headers=BOUNCE_HEADERS,
        body=(
            r"konnte nicht (?:zugestellt|ausgeliefert) werden",
            r"(?:nicht|un)zustellbar",
            r"zustellung (?:ist )?fehlgeschlagen",
            r"folgende[nr]? (?:empfänger|adresse)",
        ),
    ),
    Signature(
        name="french",
        headers=BOUNCE_HEADERS,
        body=(
            r"n'a (?:pas )?pu être (?:remis|distribué|délivré|acheminé)",
            r"non (?:remis|distribuable)",
            r"échec de (?:la )?(?:remise|distribution|livraison)",
            r"impossible de (?:remettre|distribuer|délivrer)",
            r"destinataires? suivants?",
        ),
    ),
    Signature(
        name="spanish",
        headers=BOUNCE_HEADERS,
        body=(
            r"no (?:se )?(?:ha )?(?:pudo|podido) (?:ser )?entreg",
            r"no (?:se )?pudo entregar",
            r"error (?:en la|de) entrega",
            r"destinatarios? siguientes?",
            r"siguientes? destinatarios?",
        ),
    ),
    Signature(
        name="italian",
        headers=BOUNCE_HEADERS,
        body=(
            r"non (?:è stato possibile|e' stato possibile|si è potuto) (?:consegnare|recapitare)",
            r"non (?:è|e') stat[oa] (?:consegnat|recapitat)",
            r"(?:mancata|impossibile la) (?:consegna|recapito)",
            r"seguenti destinatari",
        ),
    ),
    Signature(
        name="portuguese",
        headers=BOUNCE_HEADERS,
        body=(
            r"não (?:pôde|pode|foi possível) (?:ser )?entreg",
            r"nao (?:pode|foi possivel) (?:ser )?entreg",
            r"falha na entrega",
            r"seguintes? destinatários?",
        ),
    ),
    Signature(
        name="dutch",
        headers=BOUNCE_HEADERS,
        body=(
            r"kon niet (?:worden )?(?:afgeleverd|bezorgd)",
            r"onbestelbaar",
            r"volgende ontvanger",
        ),
    ),
    Signature(
        name="japanese",
        headers=BOUNCE_HEADERS,
        body=(
            r"配信(?:でき|出来)ませんでした",
            r"送信(?:でき|出来)ませんでした",
            r"届きませんでした",
            r"配送(?:でき|出来)ませんでした",
            r"宛先(?:不明|が見つかりません)",
            r"エラーメール",
            r"このメールは(?:自動的に|システムから)",
        ),
    ),
    Signature(
        name="chinese",
        headers=BOUNCE_HEADERS,
        body=(
            r"退信",
            r"(?:无法|無法|未能|不能)(?:成功)?(?:投递|投遞|送达|送達|发送|發送)",
            r"投递失败|投遞失敗|发送失败|發送失敗",
            r"系统退信|系統退信",
        ),
    ),
    Signature(
        name="russian-polish",
        headers=BOUNCE_HEADERS,
        body=(
            r"не (?:может быть|удалось|было) доставлен",
            r"не удалось доставить",
            r"nie (?:może|mogła|mogło|można) (?:zostać )?dostarcz",
        ),
    ),
    # --- generic: a broken delivery-status part, then any bounce-like wording -----------------
    Signature(
        name="delivery-status-text",
        body=(r"^[ \t]*final-recipient:[ \t]*[\w-]{1,20};",),
        addresses=(r"^[ \t]*final-recipient:[ \t]*[\w-]{1,20};[ \t]*<?" + ADDR,),
    ),
    Signature(
        name="generic",
        headers=BOUNCE_HEADERS,
        body=(
            r"(?:could|can) ?not (?:be )?deliver",
            r"(?:couldn't|cannot|can't|unable to|failed to) (?:be )?deliver",
            r"was not delivered",
            r"undeliver(?:able|ed)",
            r"delivery (?:has )?failed",
            r"(?:failure|failed) (?:notice|delivery)",
            r"permanent (?:fatal )?error",
            r"following (?:address|recipient)",
            r"returned mail",
            r"non[- ]?delivery",
            r"mail delivery (?:failed|failure|subsystem|system)",
            r"delivery status notification",
            r"not (?:be )?reached",
        ),
    ),
)
"""The ordered table."""
