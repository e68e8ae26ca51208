"""Classify a remote SMTP failure reply (or a DSN status) into a bounce category.

The categories are those of the events contract (docs: SPEC section 5). This module knows
nothing about delivery: the delivery manager feeds it 4xx/5xx replies, and the DSN parser feeds
it the ``Status:`` and ``Diagnostic-Code:`` fields of bounce messages, which carry the same
codes and texts.

Precedence, first decision wins:

1. **Transient rate limiting.** For a transient failure (4xx, or enhanced class 4 in a DSN),
   :data:`TRANSIENT_FIRST_RULES` decide before the status: greylisting → ``policy``, explicit
   rate-limit wording ("rate limited", "too many connections", "receiving mail too quickly",
   "unexpected volume", ...) → ``rate-limited``, because providers attach such text to many
   status codes (Gmail's ``450 4.2.1 ... receiving mail too quickly``, ``421 4.7.0 ... unusual
   rate``).
2. **Decisive enhanced status** (RFC 3463 and later registrations, :data:`FIRM_STATUSES`): for
   example X.1.1 bad mailbox, X.1.2 bad destination system, X.2.2 mailbox full, X.3.4 too big,
   X.4.7 delivery time expired. The text cannot change these, except for the narrow
   refinements in :data:`STATUS_REFINEMENTS` (X.1.10 is Microsoft's "recipient not found" but
   RFC 7505's "null MX"; Gmail also uses X.2.1 for per-recipient rate limiting).
   Sender-side statuses X.1.7/X.1.8 (our return path) are ``technical``: they must never
   produce a hard bounce of the recipient.
3. **The reply text** (:data:`TEXT_RULES`, case-insensitive, first match wins), for every other
   status, because many servers answer ``550 5.7.1`` or ``5.0.0`` whatever the reason. The
   table is ordered from the most specific wording to the most generic, and soft categories
   come before hard ones where a text could match both: a false hard bounce suppresses an
   address forever. Anything that names the *sender* (``Sender address rejected``) never maps
   to a recipient category.
4. **Weak transient wording** (:data:`TRANSIENT_FALLBACK_RULES`: "try again later",
   "exceeded", "busy") means ``rate-limited`` only for transient replies whose status says
   nothing more specific (none, X.0.X or X.7.X).
5. **The status' default** (:data:`SUBJECT_DEFAULTS` and :data:`DEFAULT_STATUSES`): X.7.1 and
   other X.7.X → ``policy``; RFC 7372 authentication codes → ``authentication``; X.3.X,
   X.4.X, X.5.X, X.6.X → ``technical``.
6. Otherwise: ``undetermined`` for a permanent failure, ``technical`` for a transient one.

Status normalisation: the enhanced status is read from the start of the text or of one of its
lines (RFC 3463 section 2), optionally after the basic code (``550-5.1.1``) or a DSN diagnostic
type (``smtp; 550 5.1.1``). When the reply has none, it is derived from the basic code
(``5.0.0``/``4.0.0``). When a server's enhanced class contradicts its basic code (``550 4.1.1``),
the class follows the basic code, which is the one that decides what happens to the message.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

from attrs import frozen

__all__ = [
    "BOUNCE_CATEGORIES",
    "DEFAULT_STATUSES",
    "FIRM_STATUSES",
    "HARD_CATEGORIES",
    "STATUS_REFINEMENTS",
    "SUBJECT_DEFAULTS",
    "TEXT_RULES",
    "TRANSIENT_FALLBACK_RULES",
    "TRANSIENT_FIRST_RULES",
    "Classification",
    "classify_reply",
    "classify_status",
    "parse_enhanced_status",
]

BOUNCE_CATEGORIES: Final[tuple[str, ...]] = (
    "invalid-recipient",
    "invalid-domain",
    "mailbox-full",
    "mailbox-inactive",
    "message-too-large",
    "spam-content",
    "reputation-block",
    "authentication",
    "policy",
    "rate-limited",
    "expired",
    "technical",
    "undetermined",
)
HARD_CATEGORIES: Final[frozenset[str]] = frozenset({"invalid-recipient", "invalid-domain"})


@frozen
class Classification:
    #: One of :data:`BOUNCE_CATEGORIES`.
    category: str
    #: ``category in HARD_CATEGORIES``.
    hard: bool
    #: Enhanced status code, e.g. ``"5.1.1"``; ``"5.0.0"``/``"4.0.0"`` when the reply had none.
    status: str
    #: A permanent failure (5xx, or enhanced class 5).
    permanent: bool


#: A table row: a pattern searched in the lower-cased, whitespace-collapsed text, and the
#: category it means.
Rule: TypeAlias = tuple[re.Pattern[str], str]


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


# --- text patterns, shared by several tables ------------------------------------------------

_RATE_STRONG = _rx(
    r"\brate\b",  # "rate limited", "unusual rate of", "at a rate that prevents"
    r"too many\b",
    r"throttl",
    r"slow (?:it )?down",
    r"too (?:quickly|fast|frequently)",
    r"unexpected volume",
    r"\bvolume\b[^\n]{0,30}\b(?:limit|exceeded|too high)",
    r"sending (?:quota|limit)",
)
_RATE_WEAK = _rx(
    r"try (?:again )?later",
    r"come back later",
    r"later time",
    r"exceeded",
    r"\bbusy\b",
)
_GREYLIST = _rx(r"gr[ae]y[- ]?list")

TRANSIENT_FIRST_RULES: Final[tuple[Rule, ...]] = (
    (_GREYLIST, "policy"),
    (_RATE_STRONG, "rate-limited"),
)
"""Checked first for transient failures, before the status."""

TRANSIENT_FALLBACK_RULES: Final[tuple[Rule, ...]] = ((_RATE_WEAK, "rate-limited"),)
"""Checked last for transient failures whose status is absent, X.0.X or X.7.X."""

TEXT_RULES: Final[tuple[Rule, ...]] = (
    (
        _rx(
            r"message expired",
            r"expired in (?:the )?queue",
            r"delivery time expired",
            r"(?:retry|queue|delivery) (?:time|timeout|period) (?:exceeded|expired)",
            r"too long in (?:the )?queue",
            r"long failure period",
            r"connection timed out",
            r"message timed out",
            r"server did not respond",
            r"not (?:been )?collected after",
            r"allowed queue period",
            r"could not find a gateway",
            r"(?:been|was) in the queue too long",
        ),
        "expired",
    ),
    (
        _rx(
            r"\bdmarc\b",
            r"\bdkim\b",
            r"\bspf\b",
            r"sender policy framework",
            r"domainkeys",
            r"authenticat",  # authentication, (un)authenticated, authenticate
            r"\bsender[- ]?id\b",
            r"\barc (?:validation|seal|fail)",
        ),
        "authentication",
    ),
    # Problems with our own sender address (the VERP return path): never the recipient's fault.
    (
        _rx(
            r"sender (?:address|domain)[^;\n]{0,60}?(?:not found|does not exist|doesn't exist"
            r"|unknown|unresolvable|unrout\w*|no mx|null ?mx|invalid|must resolve|must exist"
            r"|fully[- ]qualified)",
            r"domain of sender",
            r"sender verif",
            r"verify (?:the )?sender",
            r"unverified sender",
            r"(?:bad|invalid) sender",
        ),
        "technical",
    ),
    (
        _rx(r"(?:daily|hourly) (?:user )?(?:sending )?(?:quota|limit)", r"sending (?:quota|limit)"),
        "rate-limited",
    ),
    (
        _rx(
            r"spamhaus",
            r"barracuda",
            r"spamcop",
            r"\bsorbs\b",
            r"uceprotect",
            r"\bpsbl\b",
            r"spamrats",
            r"mailspike",
            r"backscatterer",
            r"spameatingmonkey",
            r"abuseat",
            r"\b(?:cbl|sbl|xbl|pbl|dbl|njabl|dsbl|ivmsip|ivmuri|hostkarma|lashback)\b",
            r"invaluement",
            r"senderscore",
            r"cloudmark",
            r"mail-abuse",
            r"truncate\.gbudb",
            r"nix-?spam",
            r"\b(?:dns)?rbl\b",
            r"\bdnsbl\b",
            r"\brbl[a-z]",
            # PTR / reverse DNS demands: the sending host's reputation, not the message.
            r"\bptr\b",
            r"\brdns\b",
            r"reverse (?:dns|lookup|hostname|mapping|record|name|resolution)",
            r"(?:no|missing|invalid) (?:reverse|ptr)",
            r"forward[- ]confirmed",
            r"\bfcrdns\b",
            r"\bdynamic (?:ip|address|pool)",
            r"(?:dial-?up|residential) (?:ip|address|range|pool)",
            r"\bsurbl\b",
            r"\buribl\b",
            r"block ?list",
            r"black ?list",
            r"deny ?list",
            r"(?<!not )\blisted\b",  # but "not listed in Domino Directory" is an unknown user
            r"reputation",
            r"blocked using",
            r"\bbanned\b(?! content)",
            r"ip name lookup failed",
            r"cannot resolve your (?:address|hostname)",
            # Postfix's reject_unknown_client_hostname / reject_unknown_reverse_client_hostname.
            r"cannot find your (?:reverse )?hostname",
            r"may not be mail exchanger",
            r"not currently accepting mail from your ip",
            r"custom reverse",
            r"open proxy",
            r"suspiciously like spammer",
            r"mismatches client ip",
            r"use the smtp server of your isp",
            r"\b(?:ip|ip address|client host|sending host|your (?:server|host|network))\b"
            r"[^\n]{0,60}?\b(?:blocked|blacklisted|blocklisted|denied)\b",
            r"(?:not accepted|rejected|refused|denied|blocked) from (?:this|your|the|that)"
            r" (?:ip|ip address|network|host|server)\b",
            r"all (?:messages|mail) from [^\n]{0,60}?(?:permanently deferred|blocked|rejected)",
        ),
        "reputation-block",
    ),
    (
        _rx(
            r"\bspam",
            r"spamassassin",
            r"bulk e-?mail",
            r"message filtered",
            r"content denied",
            r"banned content",
            r"recurrent pattern detection",
            r"\bspammy\b",
            r"unsolicited",
            r"\bjunk\b",
            r"bulk mail",
            r"content (?:rejected|filter|polic|violat|restriction)",
            r"(?:prohibited|suspicious|objectionable|malicious|dangerous|unacceptable)"
            r" (?:content|attachment|link|url)",
            r"message content",
            r"rejected (?:due to|because of|for) (?:its )?content",
            r"content presents",
            r"security (?:issue|threat)",
            r"virus",
            r"malware",
            r"phish",
            r"infected",
            r"spamverdacht",
            r"verdacht auf spam",
            r"\bviren\b",
            r"pourriel",
            r"courrier indésirable",
            r"correo (?:no deseado|basura)",
            r"posta indesiderata",
            r"lixo eletrônico",
            r"ウイルス",
            r"迷惑メール",
            r"垃圾邮件",
            r"垃圾郵件",
            r"病毒",
        ),
        "spam-content",
    ),
    (
        _rx(
            r"quota",
            r"mail ?box[^\n]{0,20}\bfull\b",
            r"(?:inbox|account|storage) (?:is )?full",
            r"insufficient (?:system )?storage",
            r"out of (?:storage|space|disk)",
            r"storage (?:allocation|space|limit)",
            r"disk (?:full|quota)",
            r"mail ?box size limit",
            r"exceeds? (?:the )?(?:mailbox|storage)",
            r"(?:mail ?box|inbox|mail ?folder)[^\n]{0,20}\b(?:over|exceed)",
            r"full (?:mail ?box|inbox)",
            r"(?:mail ?folder|mail ?box|inbox) (?:is )?full",
            r"(?:not|doesn't|does not) have enough (?:space|storage|disk)",
            r"not enough (?:storage |disk )?space",
            r"space has been used up",
            r"too much mail data",
            r"too many messages (?:on the server|in (?:the |this |his |her )?mail ?box)",
            r"postfach[^\n]{0,20}(?:voll|überfüllt|übergelaufen)",
            r"(?:speicherplatz|speicher)[^\n]{0,30}(?:erschöpft|voll|überschritten)",
            r"bo[iî]te[^\n]{0,30}(?:pleine|saturée)",
            r"\bbal (?:est )?pleine",
            r"espace (?:disque )?insuffisant",
            r"(?:buz[oó]n|casilla)[^\n]{0,20}(?:llen[oa]|complet[oa])",
            r"casella[^\n]{0,25}piena",
            r"spazio[^\n]{0,15}(?:esaurito|insufficiente)",
            r"caixa[^\n]{0,25}(?:cheia|lotada)",
            r"(?:mailbox|postbus)[^\n]{0,15}\bvol\b",
            r"skrzynka[^\n]{0,20}pełna",
            r"ящик[^\n]{0,20}переполнен",
            r"容量(?:を)?(?:超過|オーバー|制限)",
            r"メールボックスが(?:いっぱい|一杯|満杯)",
            r"(?:邮箱|郵箱|信箱)[^\n]{0,10}(?:已满|满了|已滿|滿了|空间不足|容量不足)",
            r"空间不足",
        ),
        "mailbox-full",
    ),
    (
        _rx(
            r"disabled",
            r"inactive",
            r"deactivated",
            r"suspended",
            r"no longer",
            r"dormant",
            r"(?:account|mail ?box) (?:has been |is )?(?:closed|locked|frozen|expired|terminated"
            r"|cancell?ed)",
            r"expired (?:account|mail ?box)",
            r"temporar(?:y|ily) (?:locked|inactive|disabled)",
            r"archiv(?:ee|ée|ed)\b",
            r"\bsuspend\b",
            r"deaktiviert",
            r"(?:konto|postfach)[^\n]{0,20}gesperrt",
            r"désactivé",
            r"(?:compte|boîte)[^\n]{0,30}(?:suspendu|bloqué|fermé)",
            r"(?:cuenta|buz[oó]n)[^\n]{0,20}(?:desactivad|suspendid|bloquead|inactiv)",
            r"(?:account|casella)[^\n]{0,20}(?:disattivat|sospes|bloccat)",
            r"(?:conta|caixa)[^\n]{0,20}(?:desativad|suspens|bloquead|inativ)",
            r"(?:アカウント|メールボックス)[^\n]{0,10}(?:停止|無効|凍結)",
            r"(?:账户|帐户|帳戶|账号|帐号|邮箱)[^\n]{0,10}(?:停用|冻结|凍結|禁用|已注销)",
        ),
        "mailbox-inactive",
    ),
    (
        _rx(
            r"too (?:large|big)",
            r"size exceeds",
            r"message size",
            r"exceeds? (?:the )?(?:maximum|max|fixed|allowed) (?:message )?size",
            r"message (?:length|exceeds)",
            r"maximum (?:message )?size",
            r"size limit",
            r"max(?:imum)? (?:inbound )?message size",
            r"zu groß",
            r"trop (?:grand|gros|volumineux)",
            r"demasiado grande",
            r"troppo grande",
            r"muito grande",
            r"サイズ[^\n]{0,10}(?:大きすぎ|超過|制限)",
            r"(?:邮件|郵件)[^\n]{0,10}(?:过大|過大|太大)",
        ),
        "message-too-large",
    ),
    (
        _rx(
            r"domain(?: name)?(?: \S+)? (?:not found|does not exist|doesn't exist|unknown"
            r"|not known|is not (?:valid|found)|has no mx)",
            r"(?:no such|unknown|invalid|bad) domain",
            r"\bno mx\b",
            r"\bno (?:valid )?mx (?:record|host)",
            r"\bmx (?:record )?not found",
            r"host (?:or domain )?(?:name )?not found",
            r"(?:host unknown|unknown host)",
            r"unrout\w*",  # unrouteable, unroutable
            r"null ?mx",
            r"nxdomain",
            r"name service error",
            r"does not accept mail",
            r"accepts no mail",
            r"no such (?:host|domain)",
            r"point to non-?existent hosts",
            r"(?<!sender )domain must exist",
            r"(?:mail )?domain [^\n]{0,50}\bis unknown",
            r"name or service not known",
            r"account or domain may not exist",
            r"(?:find|locate|resolve) the (?:recipient(?:'s)? )?domain",
            r"domain (?:name )?(?:could not|cannot|can't|couldn't) be (?:found|resolved)",
            r"(?:domain|host|rechner)[^\n]{0,40}(?:existiert nicht|unbekannt|nicht gefunden)",
            r"domaine[^\n]{0,40}(?:inconnu|inexistant|introuvable|n'existe pas)",
            r"dominio[^\n]{0,40}(?:no existe|inexistente|desconocido|sconosciuto|não existe)",
            r"ドメイン[^\n]{0,20}(?:存在しません|見つかりません|不明)",
            r"(?:域名|網域)[^\n]{0,10}(?:不存在|无效|無效)",
        ),
        "invalid-domain",
    ),
    (
        _rx(
            r"user unknown",
            r"unknown user",
            r"\b(?:user|recipient|mail ?box|address|account|addressee)(?: name)? (?:is )?"
            r"(?:unknown|not found|invalid|not valid|does not exist|doesn't exist"
            r"|unavailable|not available)",
            r"no such (?:user|mail ?box|recipient|account|address|person|local)",
            r"does not exist",
            r"doesn't exist",
            r"recipient (?:address )?rejected",
            r"rejected recipient",
            r"(?<!sender )address rejected",
            r"invalid (?:recipient|mail ?box|address|user)",
            r"unknown (?:recipient|mail ?box|address|local[- ]?part|alias)",
            r"not a valid (?:mail ?box|recipient|address|user)",
            r"\bno mail ?box",
            r"not our customer",
            r"(?:doesn't|does not) have an? \S+ account",
            r"recipientnotfound",
            r"recip ?not ?found",
            r"not listed in",
            r"bad destination mail ?box",
            r"undeliverable address",
            r"(?:address|recipient|user)[^\n]{0,40}(?:couldn't|could not|can't|cannot) be found",
            r"wasn't found at",
            r"\b(?:user|recipient|addressee) not known",
            r"bad (?:address|recipient|mail ?box)",
            r"not present in (?:the )?directory",
            r"mail ?box not present",
            r"(?:cannot|can't) accept (?:user|recipient)",
            r"addresses? (?:were|was|is) unknown",
            r"not an? (?:known|valid|local|active) (?:user|address|recipient|mail ?box)",
            r"no (?:mail ?box|account|user) (?:by|with) that name",
            r"no valid recipients",
            r"recipient (?:is )?not (?:accepted|local|ok|exist)",
            r"\bbadrcptto\b",
            r"badrecipientto",
            r"validrcptto",
            r"envelope recipient",
            r"name is not found",
            r"there is no one at this address",
            r"user missing home directory",
            r"user not exist",
            r"unknown virtual user",
            r"<[^<>\s]{1,255}> not found",
            r"in (?:the )?name directory",
            r"non-?existent (?:user|recipient|address|mail ?box|account)",
            r"(?:user|recipient|mail ?box) \S{1,100} was not found",
            r"unknown e-?mail address",
            r"user \([^)]{1,100}\) unknown",
            r"nessun utente",
            r"\b(?:user|recipient|addressee|mail ?box|address)(?: name)? (?:is )?not recogni[sz]ed",
            r"no mailbox here",
            r"no such (?:e-?mail|name)",
            # German, French, Spanish, Italian, Portuguese, Dutch, Polish, Russian, Japanese,
            # Chinese: "user unknown", "does not exist", "not found".
            r"(?:benutzer|empfänger|adresse|postfach|konto|nutzer|teilnehmer|mailbox|user)"
            r"[^\n]{0,30}(?:unbekannt|existiert nicht|nicht gefunden|gibt es nicht|ungültig)",
            r"unbekannte[rn]? (?:benutzer|empfänger|adresse)",
            r"existiert nicht",
            r"kein(?:e)? (?:solche[rs]? )?(?:benutzer|postfach|empfänger)",
            r"(?:utilisateur|destinataire|adresse|compte|bo[iî]te|bal|nom)[^\n]{0,30}"
            r"(?:inconnue?|inexistante?|introuvable|invalide)",
            r"n'existe pas",
            r"(?:usuario|destinatario|direcci[oó]n|cuenta|buz[oó]n)[^\n]{0,30}"
            r"(?:desconocid|inexistente|no encontrad|no v[aá]lid)",
            r"no existe",
            r"(?:utente|destinatario|indirizzo|casella)[^\n]{0,30}"
            r"(?:sconosciut|inesistente|non trovat|non valid)",
            r"inesistente",
            r"non esiste",
            r"(?:usu[aá]rio|utilizador|destinat[aá]rio|endere[cç]o|conta)[^\n]{0,30}"
            r"(?:desconhecid|inexistente|n[aã]o encontrad|inv[aá]lid)",
            r"n[aã]o existe",
            r"(?:gebruiker|ontvanger|adres|mailbox)[^\n]{0,20}(?:onbekend|bestaat niet)",
            r"onbekende (?:gebruiker|ontvanger)",
            r"bestaat niet",
            r"nie istnieje",
            r"nieznany (?:użytkownik|adres|odbiorca)",
            r"не существует",
            r"нет такого",
            r"(?:пользовател|адрес|получател)[^\n]{0,20}(?:неизвест|не найден)",
            r"宛先不明",
            r"存在しません",
            r"(?:ユーザ|ユーザー|アドレス|宛先)[^\n]{0,15}(?:見つかりません|不明|存在しない)",
            r"(?:用户|用戶|收件人|地址|邮箱|郵箱|帐号|账号|帳號|账户|帐户)[^\n]{0,10}"
            r"(?:不存在|无效|無效|未找到|找不到)",
            r"查无此人",
        ),
        "invalid-recipient",
    ),
    (_rx(r"\bblocked\b", r"\bblock\b"), "reputation-block"),
    (_RATE_STRONG, "rate-limited"),
    (
        _rx(
            r"polic(?:y|ies)",
            r"not allowed",
            r"not permitted",
            r"denied",
            r"prohibited",
            r"refused",
            r"unable to relay",
            r"administrative prohibition",
            r"not authori[sz]ed",
            r"unauthori[sz]ed",
            r"forbidden",
        ),
        "policy",
    ),
)
"""The reply-text table; first match wins. Not used when a firm status decided."""

# --- enhanced status tables ------------------------------------------------------------------

FIRM_STATUSES: Final[dict[tuple[int, int], str]] = {
    (1, 1): "invalid-recipient",  # bad destination mailbox address
    (1, 2): "invalid-domain",  # bad destination system address
    (1, 3): "invalid-recipient",  # bad destination mailbox address syntax
    (1, 6): "mailbox-inactive",  # destination mailbox has moved, no forwarding address
    (1, 7): "technical",  # bad sender's mailbox address syntax (our return path)
    (1, 8): "technical",  # bad sender's system address (our return path domain)
    (1, 10): "invalid-recipient",  # RFC 7505 null MX, but Microsoft's RecipientNotFound
    (2, 1): "mailbox-inactive",  # mailbox disabled, not accepting messages
    (2, 2): "mailbox-full",
    (2, 3): "message-too-large",  # message length exceeds administrative limit
    (2, 4): "technical",  # mailing list expansion problem
    (3, 1): "technical",  # mail system full (the system, not the mailbox)
    (3, 4): "message-too-large",  # message too big for system
    (4, 4): "invalid-domain",  # unable to route
    (4, 7): "expired",  # delivery time expired
    (7, 8): "authentication",  # RFC 4954: authentication credentials invalid
    (7, 11): "authentication",  # RFC 4954: encryption required for authentication mechanism
    (7, 12): "authentication",  # RFC 4954: password transition needed
    (7, 13): "authentication",  # RFC 4954: (SMTP AUTH) user account disabled
    (7, 25): "authentication",  # RFC 7372: reverse DNS validation failed
    (7, 27): "authentication",  # RFC 7505: sender address has null MX
}
"""(subject, detail) → category, decided without looking at the text (but see refinements)."""

STATUS_REFINEMENTS: Final[dict[tuple[int, int], tuple[Rule, ...]]] = {
    (1, 10): ((_rx(r"null ?mx", r"does not accept mail", r"accepts no mail"), "invalid-domain"),),
    (2, 1): ((_RATE_STRONG, "rate-limited"),),
}
"""The only text checks made for a firm status."""

DEFAULT_STATUSES: Final[dict[tuple[int, int], str]] = {
    (7, 9): "authentication",  # RFC 4954 "mechanism too weak"; Yahoo uses it for policy
    **{(7, detail): "authentication" for detail in range(20, 27)},  # RFC 7372: DKIM, SPF, ...
    (7, 29): "authentication",  # RFC 8617: ARC validation failure
    (7, 17): "mailbox-inactive",  # RFC 7293: mailbox owner has changed
    (7, 18): "mailbox-inactive",  # RFC 7293: domain owner has changed
    (7, 28): "rate-limited",  # mail flood detected
}
"""(subject, detail) → category when the text does not say otherwise."""

SUBJECT_DEFAULTS: Final[dict[int, str]] = {
    3: "technical",  # mail system status
    4: "technical",  # network and routing status
    5: "technical",  # mail delivery protocol status
    6: "technical",  # message content or media status (conversions)
    7: "policy",  # security or policy status; X.7.1 included
}
"""subject → category when the text does not say otherwise; X.0.X, X.1.X, X.2.X have none."""

# --- parsing ---------------------------------------------------------------------------------

# At the start of a line: an optional DSN diagnostic type ("smtp;") and basic code ("550-",
# "550 "), then the enhanced status, not followed by more digits or an IP-address-like tail.
_ENHANCED = re.compile(
    r"^[ \t]*(?:[A-Za-z][\w-]*[ \t]*;[ \t]*)?(?:[245]\d\d(?:-|[ \t]+))?"
    r"([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)",
    re.MULTILINE,
)
# What to strip from each line before matching the text tables.
_LINE_PREFIX = re.compile(
    r"^\s*(?:[A-Za-z][\w-]*\s*;\s*(?=\d))?(?:[245]\d\d(?:-|\s+|$))?"
    r"(?:[245]\.\d{1,3}\.\d{1,3}(?!\d|\.\d)\s*)?"
)
# The basic code of a DSN diagnostic: "smtp; 550 ...", "... said: 550 5.1.1 ...".
_BASIC_CODE = re.compile(r"(?:^|;|said:)\s*([245]\d\d)(?=[\s-]|$)", re.MULTILINE)


def parse_enhanced_status(text: str) -> str | None:
    """The first RFC 3463 enhanced status code at the start of ``text`` or of one of its lines.

    ``X.Y.Z`` with X in 2, 4, 5 and Y, Z in 0-999, normalised (``"5.01.1"`` → ``"5.1.1"``).
    A basic code or a DSN diagnostic type may precede it on its line (``"550-5.1.1 ..."``,
    ``"smtp; 550 5.1.1 ..."``). ``None`` when there is none.
    """
    found = _parse(text)
    return None if found is None else _format(found)


def _parse(text: str) -> tuple[int, int, int] | None:
    m = _ENHANCED.search(text)
    if m is None:
        return None
    cls, subject, detail = (int(g) for g in m.groups())
    if subject > 999 or detail > 999:  # pragma: no cover - excluded by the pattern
        return None
    return cls, subject, detail


def _format(status: tuple[int, int, int]) -> str:
    return "{}.{}.{}".format(*status)


def _normalise(text: str) -> str:
    """Lower-cased text, status prefixes removed from each line, whitespace collapsed."""
    lines = (_LINE_PREFIX.sub("", line, count=1) for line in text.splitlines())
    return " ".join(" ".join(lines).split()).lower()


def _first(rules: tuple[Rule, ...], text: str) -> str | None:
    for pattern, category in rules:
        if pattern.search(text):
            return category
    return None


def _categorise(status: tuple[int, int, int] | None, cls: int, text: str) -> str:
    """The category; ``status`` is the parsed enhanced status (None: none in the reply)."""
    transient = cls == 4
    if transient:
        category = _first(TRANSIENT_FIRST_RULES, text)
        if category is not None:
            return category
    key = None if status is None else (status[1], status[2])
    if key is not None and key in FIRM_STATUSES:
        return _first(STATUS_REFINEMENTS.get(key, ()), text) or FIRM_STATUSES[key]
    category = _first(TEXT_RULES, text)
    if category is not None:
        return category
    if transient and (key is None or key[0] in (0, 7)):
        category = _first(TRANSIENT_FALLBACK_RULES, text)
        if category is not None:
            return category
    if key is not None:
        category = DEFAULT_STATUSES.get(key) or SUBJECT_DEFAULTS.get(key[0])
        if category is not None:
            return category
    return "technical" if transient else "undetermined"


def _classification(category: str, status: tuple[int, int, int]) -> Classification:
    return Classification(
        category=category,
        hard=category in HARD_CATEGORIES,
        status=_format(status),
        permanent=status[0] == 5,
    )


def classify_reply(code: int, text: str) -> Classification:
    """Classify a remote failure reply.

    ``code`` is the basic reply code (4xx or 5xx; anything from 500 up counts as permanent,
    anything below as transient); ``text`` is the reply text without the code, its lines joined
    by ``"\\n"`` (each line may still start with the enhanced status, as servers repeat it).
    """
    cls = 5 if code >= 500 else 4
    parsed = _parse(text)
    status = (cls, 0, 0) if parsed is None else (cls, parsed[1], parsed[2])
    return _classification(_categorise(parsed, cls, _normalise(text)), status)


def classify_status(status: str | None, diagnostic: str) -> Classification:
    """Classify a DSN recipient: ``status`` from its ``Status:`` field, ``diagnostic`` from its
    ``Diagnostic-Code:`` field (e.g. ``"smtp; 550 5.1.1 <a@b>: Recipient address rejected"``),
    either possibly empty.

    The status field wins; without a usable one, the enhanced status and then the basic code of
    the diagnostic are used. With none of them the failure counts as permanent (``5.0.0``):
    a bounce message reports a failure. A success status (2.X.X) is kept as it is, with
    ``permanent`` false and a category from the diagnostic text (``undetermined`` if none).
    """
    parsed = _parse(status) if status else None
    if parsed is None:
        parsed = _parse(diagnostic)
    if parsed is not None:
        cls = parsed[0]
        full = parsed
    else:
        m = _BASIC_CODE.search(diagnostic)
        cls = int(m.group(1)[0]) if m else 5
        full = (cls, 0, 0)
    category = _categorise(parsed, cls, _normalise(diagnostic))
    return _classification(category, full)
