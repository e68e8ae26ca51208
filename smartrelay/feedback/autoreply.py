"""Auto-replies (RFC 3834 and the older conventions): vacation and out-of-office answers.

An auto-reply is never a bounce. Its signs, as data:

* :data:`AUTOREPLY_HEADERS`: ``Auto-Submitted: auto-replied`` / ``auto-generated`` (RFC
  3834), ``X-Autoreply``, ``X-Autorespond``, ``Precedence: auto_reply`` and kin;
* :data:`AUTOREPLY_SUBJECTS`: out-of-office and vacation subjects in many languages (also
  what makes Exchange's ``X-Auto-Response-Suppress`` replies recognisable).

But bounces carry the same headers (a DSN is ``auto-generated``, Exim's text bounces are
``auto-replied``): :func:`bounce_look` tells them apart by their sender (MAILER-DAEMON,
postmaster, "Mail Delivery System") and subject (:data:`BOUNCE_SUBJECTS`, many languages).
"""

from __future__ import annotations

import re
from email.message import Message
from typing import Final

from smartrelay.feedback.mime import address_of, header

__all__ = [
    "AUTOREPLY_HEADERS",
    "AUTOREPLY_SUBJECTS",
    "BOUNCE_SENDERS",
    "BOUNCE_SUBJECTS",
    "autoreply_reason",
    "bounce_look",
]


def _words(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.I)


#: (lower-cased header name, pattern its value must match): each one marks an auto-reply.
AUTOREPLY_HEADERS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("auto-submitted", _words(r"^\s*auto-(?:replied|generated|notified)\b")),
    ("x-autoreply", _words(r"^(?!\s*(?:no|false|0)\s*$)")),
    ("x-autorespond", _words(r"^(?!\s*(?:no|false|0)\s*$)")),
    ("x-autoresponder", _words(r"^(?!\s*(?:no|false|0)\s*$)")),
    ("x-autoreply-from", _words(r".")),
    ("x-mail-autoreply", _words(r".")),
    ("x-vacation", _words(r"^(?!\s*(?:no|false|0)\s*$)")),
    ("precedence", _words(r"^\s*auto[-_]?reply\b")),
    ("x-precedence", _words(r"^\s*auto[-_]?reply\b")),
    ("x-post-messageclass", _words(r"autorespond")),
    ("x-fc-machinegenerated", _words(r"^\s*true\b")),
    ("delivered-to", _words(r"^\s*autoresponder\b")),
)

AUTOREPLY_SUBJECTS: Final[re.Pattern[str]] = _words(
    # en
    r"\bout of (?:the )?office\b",
    r"\bautomatic(?:ally)? (?:reply|response|answer)\b",
    r"\bauto[- ]?(?:reply|replied|response|responder|answer)\b",
    r"\bon (?:vacation|holidays?|leave|annual leave|parental leave|maternity leave)\b",
    r"\bvacation (?:reply|message|notice|response|notification)\b",
    r"\baway from (?:my|the) (?:office|desk|(?:e-?)?mail)\b",
    r"^\s*auto:",  # RFC 3834 section 3.1.5's suggested subject prefix
    r"\b(?:i am|i'm) (?:currently )?(?:away|out)\b",
    r"\babsence (?:notice|notification|message)\b",
    r"^\s*(?:re:\s*)?ooo\b",
    r"\bout of office\b",
    # de
    r"\babwesenheit",
    r"\bautomatische (?:antwort|benachrichtigung)",
    r"\bnicht im büro\b",
    r"\baußer haus\b",
    r"\bim urlaub\b",
    r"\burlaubsabwesenheit",
    # fr
    r"\bréponse automatique\b",
    r"\breponse automatique\b",
    r"\babsente? du bureau\b",
    r"\bmessage d'absence\b",
    r"\ben (?:congés?|vacances)\b",
    r"\bd'absence\b",
    # es
    r"\brespuesta autom[aá]tica\b",
    r"\bfuera de (?:la )?oficina\b",
    r"\bde vacaciones\b",
    r"\bausencia\b",
    # it
    r"\brisposta automatica\b",
    r"\bfuori (?:sede|ufficio)\b",
    r"\bin ferie\b",
    r"\bassenza\b",
    # nl
    r"\bautomatisch antwoord\b",
    r"\bautomatische reactie\b",
    r"\bafwezig(?:heid)?\b",
    r"\bbuiten kantoor\b",
    r"\bmet vakantie\b",
    # pt
    r"\bresposta autom[aá]tica\b",
    r"\bfora do escrit[oó]rio\b",
    r"\bde f[eé]rias\b",
    r"\baus[eê]ncia\b",
    # ja, zh, ko
    r"自動応答",
    r"自動返信",
    r"不在(?:通知|のお知らせ|です)",
    r"休暇",
    r"自动回复",
    r"自動回覆",
    r"自動回復",
    r"不在办公室",
    r"休假",
    r"자동 ?응답",
    r"부재",
    # ru, uk
    r"автоответ",
    r"автоматический ответ",
    r"нет на месте",
    r"в отпуске",
    r"автоматична відповідь",
    # pl, cs, hu
    r"\bodpowied[zź] automatyczna\b",
    r"\bautomatyczna odpowied[zź]\b",
    r"\bnieobecno[sś][cć]\b",
    r"\bpoza biurem\b",
    r"\bautomatick[aá] odpov[eě][dď]",
    r"\bnep[rř][ií]tomnost",
    r"\bautomatikus v[aá]lasz\b",
    r"\bh[aá]zon k[ií]v[uü]l\b",
    # sv, da, no, fi
    r"\bautomatiskt svar\b",
    r"\bautomatisk svar\b",
    r"\bautosvar\b",
    r"\bfr[aå]nvaro\b",
    r"\bfr[aå]nvarande\b",
    r"\bfrav[æe]r(?:ende)?\b",
    r"\bautomaattinen vastaus\b",
    r"\bpoissa (?:toimistolta)?\b",
    r"\blomalla\b",
    # tr
    r"\botomatik (?:yan[\u0131i]t|cevap)\b",
    r"\bofis d[\u0131i][şs][\u0131i]nda\b",
)
"""Subjects of out-of-office and vacation replies."""

BOUNCE_SUBJECTS: Final[re.Pattern[str]] = _words(
    r"undeliver",
    r"undelivered",
    r"delivery status notification",
    r"returned mail",
    r"returned to sender",
    r"mail delivery (?:failed|failure|problem|error|system)",
    r"delivery (?:failure|failed|has failed|error|problem|notification|report)",
    r"failure notice",
    r"non[- ]?deliver",
    r"nondeliverable",
    r"could not be delivered",
    r"(?:message|mail) not delivered",
    r"not (?:been )?delivered",
    r"mail system error",
    r"^\s*(?:rejected|returned|failed|bounced?):",
    r"\bbounced? (?:mail|message)",
    r"delivery (?:delayed|has been delayed)",
    r"warning: (?:could not send|message .* delayed)",
    r"mail could not be delivered",
    # de, fr, es, it, nl, pt
    r"unzustellbar",
    r"nicht zustellbar",
    r"zustellung (?:fehlgeschlagen|gescheitert)",
    r"fehlgeschlagene zustellung",
    r"non remis",
    r"non distribuable",
    r"[ée]chec de (?:la )?(?:remise|distribution)",
    r"no se (?:puede|pudo) entregar",
    r"no entregado",
    r"error de entrega",
    r"non recapitabile",
    r"mancato recapito",
    r"impossibile recapitare",
    r"onbestelbaar",
    r"niet (?:afgeleverd|bezorgd)",
    r"n[ãa]o (?:foi )?entregue",
    r"falha (?:na|de) entrega",
    r"imposs[ií]vel entregar",
    # ja, zh, ru, pl, sv
    r"配信(?:不能|エラー|失敗)",
    r"配送(?:エラー|失敗)",
    r"不達",
    r"退信",
    r"投递失败",
    r"未送达",
    r"無法傳遞",
    r"无法投递",
    r"не доставлено",
    r"недоставленное",
    r"ошибка доставки",
    r"не удается доставить",
    r"niedostarczalne",
    r"nie (?:można|mozna) dostarczy",
    r"kan inte levereras",
    r"olevererbar",
    r"ej levererat",
)
"""Subjects of bounces (text or DSN), in many languages."""

BOUNCE_SENDERS: Final[re.Pattern[str]] = _words(
    r"^(?:mailer[-_]?daemon|mail[-_]?daemon|postmaster|mail[-_.]?delivery[-_.]?(?:system|subsystem)?"
    r"|mailerdaemon|bounces?|maildelivery|nobody-bounce)(?:[-_+.][^@]*)?(?:@|$)",
)
"""Sender addresses (local parts) of bounces."""
_BOUNCE_DISPLAY_NAMES = _words(
    r"mail delivery (?:system|subsystem|service)",
    r"mailer[- ]daemon",
    r"mail administrator",
    r"microsoft outlook",
    r"postmaster",
)


def autoreply_reason(message: Message) -> str | None:
    """What marks ``message`` as an auto-reply (a short note), or None.

    Bounces carry the same signs: check :func:`bounce_look` too.
    """
    for name, pattern in AUTOREPLY_HEADERS:
        value = header(message, name, decode=False)
        if value and pattern.search(value):
            return f"{name}: {value[:60]}"
        if not value and name.startswith("x-auto") and _present(message, name):
            return name
    subject = header(message, "subject")
    m = AUTOREPLY_SUBJECTS.search(subject)
    if m is not None:
        return f"subject: {m.group(0)}"
    return None


def subject_says_autoreply(message: Message) -> bool:
    return AUTOREPLY_SUBJECTS.search(header(message, "subject")) is not None


def _present(message: Message, name: str) -> bool:
    return any(key.lower() == name for key, _value in message.raw_items())


def bounce_look(message: Message) -> str | None:
    """What makes ``message`` look like a bounce by its sender or subject, or None.

    The sender alone does not count when the subject says auto-reply (a postmaster's vacation
    message is an auto-reply).
    """
    subject = header(message, "subject")
    m = BOUNCE_SUBJECTS.search(subject)
    if m is not None:
        return f"subject: {m.group(0)}"
    from_field = header(message, "from")
    sender = address_of(from_field)
    by_sender = BOUNCE_SENDERS.search(sender) or _BOUNCE_DISPLAY_NAMES.search(
        from_field.split("<")[0]
    )
    if by_sender and AUTOREPLY_SUBJECTS.search(subject) is None:
        return f"sender: {sender[:60]}"
    return None
