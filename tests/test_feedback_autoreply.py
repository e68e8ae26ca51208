"""feedback/autoreply.py: RFC 3834 auto-replies and out-of-office subjects, never bounces."""

from __future__ import annotations

from email.header import Header

import pytest

from smartrelay.feedback.autoreply import autoreply_reason, bounce_look
from smartrelay.feedback.mime import parse_message


def msg(headers: str, body: str = "text\n") -> bytes:
    return (headers.strip("\n") + "\n\n" + body).encode("utf-8")


@pytest.mark.parametrize(
    "field",
    [
        "Auto-Submitted: auto-replied",
        "Auto-Submitted: Auto-Replied (vacation)",
        "Auto-Submitted: auto-generated",
        "X-Autoreply: yes",
        "X-Autorespond: Out of Office",
        "X-Autoresponder: 1",
        "Precedence: auto_reply",
        "Precedence: auto-reply",
        "X-POST-MessageClass: 9; Autoresponder",
        "X-Vacation: yes",
    ],
)
def test_autoreply_headers(field: str) -> None:
    raw = msg(f"From: a@example.net\nSubject: Re: hello\n{field}")
    assert autoreply_reason(parse_message(raw)) is not None


@pytest.mark.parametrize(
    "field",
    [
        "Auto-Submitted: no",
        "X-Autoreply: no",
        "Precedence: bulk",
        "Precedence: list",
        "X-Auto-Response-Suppress: All",  # alone: Exchange sets it on many messages
    ],
)
def test_not_autoreply_headers(field: str) -> None:
    raw = msg(f"From: a@example.net\nSubject: Re: hello\n{field}")
    assert autoreply_reason(parse_message(raw)) is None


SUBJECTS = [
    ("en", "Out of Office: Your order"),
    ("en", "Automatic reply: Your invoice"),
    ("en", "Auto-Reply: Re: hello"),
    ("en", "AutoReply"),
    ("en", "I am away until Monday"),
    ("en", "On vacation"),
    ("en", "away from my mail"),  # vacation(1)
    ("en", "Auto: Your order"),  # RFC 3834 section 3.1.5
    ("de", "Abwesenheitsnotiz: Ihre Bestellung"),
    ("de", "Automatische Antwort: Rechnung"),
    ("de", "Ich bin nicht im Büro"),
    ("fr", "Réponse automatique : Votre commande"),
    ("fr", "Absent du bureau"),
    ("es", "Respuesta automática: Su pedido"),
    ("es", "Fuera de la oficina"),
    ("it", "Risposta automatica: Ordine"),
    ("it", "Fuori sede"),
    ("nl", "Automatisch antwoord: Uw bestelling"),
    ("nl", "Afwezig"),
    ("pt", "Resposta automática: Seu pedido"),
    ("pt", "Fora do escritório"),
    ("ja", "自動応答: ご注文"),
    ("ja", "不在通知"),
    ("zh", "自动回复: 您的订单"),
    ("zh", "自動回覆\uff1a您的訂單"),  # full-width colon
    ("ru", "Автоответ: Ваш заказ"),
    ("ru", "Автоматический ответ: Ваш заказ"),
    ("pl", "Odpowiedź automatyczna: Zamówienie"),
    ("pl", "Automatyczna odpowiedź"),
    ("sv", "Automatiskt svar: Din beställning"),
    ("sv", "Frånvaro"),
    ("da", "Autosvar: Din ordre"),
    ("fi", "Automaattinen vastaus: Tilaus"),
    ("tr", "Otomatik yan\u0131t: Sipari\u015finiz"),
    ("cs", "Automatická odpověď: Objednávka"),
    ("ko", "자동 응답: 주문"),
]


@pytest.mark.parametrize(("language", "subject"), SUBJECTS)
@pytest.mark.parametrize("charset", ["utf-8", "native"])
def test_out_of_office_subjects(language: str, subject: str, charset: str) -> None:
    """Each subject as plain UTF-8 header text and RFC 2047 encoded in a charset its
    senders' mailers use."""
    native = {"ja": "iso-2022-jp", "ru": "koi8-r", "zh": "utf-8", "pl": "iso-8859-2"}
    if charset == "native":
        encoded = Header(subject, native.get(language, "utf-8")).encode()
        raw = f"From: x@example.net\nSubject: {encoded}\n\nbody\n".encode("ascii")
    else:
        raw = msg(f"From: x@example.net\nSubject: {subject}")
    message = parse_message(raw)
    assert autoreply_reason(message) is not None
    assert bounce_look(message) is None


@pytest.mark.parametrize(
    "subject",
    [
        "Your order has shipped",
        "Re: the office party",
        "Meeting notes",
        "Re: absent-minded",
    ],
)
def test_ordinary_subjects(subject: str) -> None:
    assert autoreply_reason(parse_message(msg(f"From: a@b.example\nSubject: {subject}"))) is None


@pytest.mark.parametrize(
    ("headers", "looks"),
    [
        ("From: MAILER-DAEMON@mx.example.org\nSubject: failure notice", True),
        ("From: Mail Delivery System <mailer-daemon@mx.example.org>\nSubject: x", True),
        ("From: postmaster@example.org\nSubject: Delivery Status Notification", True),
        ("From: a@example.org\nSubject: Undeliverable: Your invoice", True),
        ("From: a@example.org\nSubject: Unzustellbar: Ihre Rechnung", True),
        ("From: a@example.org\nSubject: Non remis : Votre commande", True),
        ("From: a@example.org\nSubject: Returned mail: User unknown", True),
        ("From: a@example.org\nSubject: =?utf-8?b?6YWN5L+h5LiN6IO9?=", True),  # 配信不能
        # a postmaster's own vacation message is an auto-reply, not a bounce
        ("From: postmaster@example.org\nSubject: Out of Office", False),
        ("From: alice@example.org\nSubject: Re: hello", False),
    ],
)
def test_bounce_look(headers: str, looks: bool) -> None:
    assert (bounce_look(parse_message(msg(headers))) is not None) is looks
