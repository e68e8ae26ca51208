"""The benchmarks' load: personalized transactional messages, every one different.

Real transactional mail is rendered per recipient: own name, order number, amounts, and URLs
carrying ids and tokens. A benchmark sending one message over and over measures caches that
real mail never hits, so every message here is generated from ``(seed, index)`` alone
(deterministic: the same seed gives the same load to Postfix and to SmartRelay, run after
run, and any one message can be made again on its own).

Four shapes, in these shares:

* receipt (35%): an order's items with prices, totals and VAT; 11-23 links (each item and
  its review page, the invoice with a token, the order, the footer), 5-10 KB;
* password reset (25%): a one-time link with a 32-byte token, a short footer; 3 links, 3 KB;
* shipping notice (25%): carrier and tracking number, the items; 9-21 links, 4-9 KB;
* digest (15%, newsletter-ish): 10-22 stories, each with two or three links carrying the
  recipient's id; 25-61 links, 10-24 KB.

Each is multipart/alternative (text, then HTML), UTF-8, From app@example.com, one recipient
per message (``<first>.<last>.<index>@example.net``). Half the messages use quoted-printable
for both parts, half 8bit (then the names, the currency signs and the typography go through
as raw UTF-8, sent with ``BODY=8BITMIME``; header fields are RFC 2047-encoded). The footer's
help, privacy, terms and contact links are the same in every message; every other link
carries the recipient's id or a token of its own.

    .venv/bin/python bench/load.py [--seed 1] [--count 1000] [--show 3]   # summary, samples
"""

from __future__ import annotations

import argparse
import hashlib
import quopri
import random
import statistics
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from email.header import Header

SENDER = "app@example.com"
DOMAIN = "example.net"
DEFAULT_SEED = 1

FIRST = [
    "Ada", "Alex", "Amélie", "Ana", "Björn", "Chen", "Chloé", "Dmitri", "Elif", "Emma",
    "Fatima", "François", "Grace", "Hannah", "Hiroshi", "Ines", "Jakub", "José", "Karin",
    "Lars", "Léa", "Liam", "Łukasz", "Mateo", "Mia", "Noah", "Nuno", "Olga", "Omar", "Paula",
    "Priya", "Rafael", "Sofía", "Søren", "Tomás", "Yara", "Zoë", "Jürgen", "Aoife", "Kwame",
]  # fmt: skip
LAST = [
    "Andersen", "Bianchi", "Brown", "Costa", "Dubois", "Eriksson", "Fernández", "García",
    "Hoffmann", "Ivanova", "Jensen", "Kowalski", "Kumar", "Larsen", "López", "Müller",
    "Nakamura", "Novák", "O'Brien", "Okafor", "Petrović", "Rossi", "Schäfer", "Silva",
    "Smith", "Søndergaard", "Tanaka", "Virtanen", "Wang", "Weiß", "Öztürk", "Zieliński",
]  # fmt: skip
PRODUCTS = [
    ("Trail running shoes", "shoes"), ("Merino wool socks", "socks"), ("Water bottle", "bottle"),
    ("Headlamp 400 lm", "headlamp"), ("Rain jacket", "jacket"), ("Running belt", "belt"),
    ("Sports sunglasses", "sunglasses"), ("Energy gels (12)", "gels"), ("Compression sleeves",
    "sleeves"), ("GPS watch strap", "strap"), ("Thermal base layer", "baselayer"),
    ("Trekking poles", "poles"), ("Camping stove", "stove"), ("Down sleeping bag", "bag"),
    ("Insulated mug", "mug"), ("First-aid kit", "firstaid"), ("Dry bag 20 L", "drybag"),
    ("Gaiters", "gaiters"), ("Beanie", "beanie"), ("Touchscreen gloves", "gloves"),
]  # fmt: skip
CARRIERS = [
    ("DHL", "https://www.dhl.example/track?id="),
    ("UPS", "https://www.ups.example/track/"),
    ("PostNL", "https://postnl.example/t/"),
    ("La Poste", "https://laposte.example/suivi?code="),
]
TOPICS = [
    "Release notes", "How we cut our build time in half", "Customer story", "Webinar",
    "Security advisory", "New in the API", "Tips & tricks", "Pricing update", "Roadmap",
    "Community spotlight", "Engineering blog", "Case study", "Changelog", "Events near you",
]  # fmt: skip
WORDS = [
    "delivery", "account", "order", "update", "team", "release", "feature", "support",
    "product", "service", "mail", "performance", "secure", "simple", "fast", "reliable",
    "customer", "report", "weekly", "monthly", "project", "improvement", "dashboard",
    "integration", "latest", "news", "guide", "started", "details", "review", "settings",
]  # fmt: skip
CURRENCIES = [("€", "EUR"), ("£", "GBP"), ("$", "USD"), ("kr", "SEK")]
SHARED_FOOTER = [
    ("Help centre", "https://shop.example.com/help"),
    ("Privacy", "https://shop.example.com/privacy"),
    ("Terms", "https://shop.example.com/terms"),
    ("Contact us", "https://shop.example.com/contact"),
]


@dataclass(frozen=True)
class LoadMessage:
    """One message: its envelope recipient, its shape, and its bytes (LF line ends)."""

    index: int
    kind: str
    recipient: str
    data: bytes
    links: int
    eight_bit: bool


class _Writer:
    """Text and HTML of one message, built side by side."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.html: list[str] = []
        self.links = 0

    def link(self, label: str, url: str, style: str = "color:#0b63ce") -> str:
        self.links += 1
        href = url.replace("&", "&amp;")
        return f'<a href="{href}" style="{style}">{_escape(label)}</a>'


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _token(rng: random.Random, nbytes: int) -> str:
    return rng.getrandbits(8 * nbytes).to_bytes(nbytes, "big").hex()


def _sentence(rng: random.Random, words: int) -> str:
    chosen = [rng.choice(WORDS) for _ in range(words)]
    return " ".join(chosen).capitalize() + "."


def _money(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 2)


def _head_html(title: str, preheader: str) -> list[str]:
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_escape(title)}</title>",
        "<style>body{margin:0;padding:0;background:#f4f5f7}"
        " table{border-collapse:collapse} td{font-family:Helvetica,Arial,sans-serif;"
        "font-size:14px;line-height:20px;color:#1f2933} .muted{color:#6b7785;font-size:12px}"
        " .btn{background:#0b63ce;color:#fff;padding:10px 18px;border-radius:4px;"
        "text-decoration:none;display:inline-block}</style>",
        "</head><body>",
        f'<div style="display:none;max-height:0;overflow:hidden">{_escape(preheader)}</div>',
        '<table role="presentation" width="100%" cellpadding="0" cellspacing="0"'
        ' style="background:#f4f5f7"><tr><td align="center">',
        '<table role="presentation" width="600" cellpadding="16" cellspacing="0"'
        ' style="background:#ffffff;margin:24px 0">',
    ]


def _footer(w: _Writer, rng: random.Random, uid: str, brand: str, minimal: bool) -> None:
    """The shared links; a minimal footer (password resets) has two and no preferences."""
    prefs = f"https://shop.example.com/account/email?uid={uid}&sig={_token(rng, 8)}"
    shared = SHARED_FOOTER[:2] if minimal else SHARED_FOOTER
    links = [w.link(label, url, "color:#6b7785") for label, url in shared]
    preferences = "" if minimal else f" {w.link('E-mail preferences', prefs, 'color:#6b7785')}"
    w.html += [
        '<tr><td class="muted" style="border-top:1px solid #e4e7eb">',
        f"<p>You receive this e-mail because you have an account at {brand}.{preferences}</p>",
        "<p>" + " &middot; ".join(links) + "</p>",
        f"<p>{brand} Ltd &middot; 1 Example Street &middot; 1000 Example City</p>",
        "</td></tr></table>",
        "</td></tr></table></body></html>",
    ]
    w.text += [
        "",
        "--",
        f"You receive this e-mail because you have an account at {brand}.",
        *([] if minimal else [f"E-mail preferences: {prefs}"]),
        *(f"{label}: {url}" for label, url in shared),
        f"{brand} Ltd, 1 Example Street, 1000 Example City",
    ]


def _items(w: _Writer, rng: random.Random, uid: str, symbol: str, count: int) -> float:
    total = 0.0
    for position, (name, slug) in enumerate(rng.sample(PRODUCTS, count)):
        quantity = rng.choice((1, 1, 1, 2, 3))
        price = _money(rng, 4, 180)
        total += quantity * price
        sku = f"{slug}-{rng.randrange(100, 999)}"
        url = f"https://shop.example.com/p/{sku}?utm_source=email&utm_medium=tx&rid={uid}"
        review = f"https://shop.example.com/review/{sku}?o={uid}&pos={position}"
        w.html += [
            "<tr><td>",
            '<table role="presentation" width="100%"><tr>',
            f'<td width="64"><img src="https://cdn.example.com/img/{sku}.jpg" width="64"'
            f' height="64" alt="{_escape(name)}"></td>',
            f'<td>{w.link(name, url)}<br><span class="muted">Art. {sku} &middot;'
            f" qty {quantity}</span><br>{w.link('Write a review', review, 'color:#6b7785')}</td>",
            f'<td align="right">{symbol}{quantity * price:,.2f}</td>',
            "</tr></table>",
            "</td></tr>",
        ]
        w.text.append(f"  {quantity} x {name} ({sku})  {symbol}{quantity * price:,.2f}")
        w.text.append(f"    {url}")
    return total


def _receipt(rng: random.Random, w: _Writer, first: str, uid: str) -> tuple[str, str]:
    symbol, code = rng.choice(CURRENCIES)
    order = f"{rng.randrange(2024, 2027)}-{rng.randrange(100000, 999999)}"
    subject = f"Your receipt for order {order}"
    w.html += _head_html(subject, f"Thanks {first}, here is your receipt.")
    w.html += [
        f'<tr><td><h1 style="font-size:22px">Thank you, {_escape(first)}!</h1>',
        f"<p>We have received your payment for order <b>{order}</b>."
        f" {_escape(_sentence(rng, rng.randrange(8, 20)))}</p></td></tr>",
    ]
    w.text += [f"Thank you, {first}!", "", f"We have received your payment for order {order}.", ""]
    total = _items(w, rng, uid, symbol, rng.randrange(2, 9))
    shipping = rng.choice((0.0, 4.95, 6.9))
    vat = round((total + shipping) * 0.2, 2)
    invoice = f"https://shop.example.com/orders/{order}/invoice.pdf?t={_token(rng, 16)}"
    account = f"https://shop.example.com/account/orders/{order}?uid={uid}"
    w.html += [
        '<tr><td><table role="presentation" width="100%">',
        f'<tr><td>Subtotal</td><td align="right">{symbol}{total:,.2f}</td></tr>',
        f'<tr><td>Shipping</td><td align="right">{symbol}{shipping:,.2f}</td></tr>',
        f'<tr><td>of which VAT (20%)</td><td align="right">{symbol}{vat:,.2f}</td></tr>',
        f'<tr><td><b>Total paid ({code})</b></td><td align="right">'
        f"<b>{symbol}{total + shipping:,.2f}</b></td></tr>",
        "</table></td></tr>",
        f"<tr><td><p>{w.link('Download your invoice', invoice, 'color:#fff')}"
        f" &nbsp; {w.link('View your order', account)}</p>",
        f"<p>{_escape(_sentence(rng, rng.randrange(15, 40)))}</p></td></tr>",
    ]
    w.text += [
        "",
        f"Subtotal {symbol}{total:,.2f}, shipping {symbol}{shipping:,.2f}, VAT {symbol}{vat:,.2f}",
        f"Total paid: {symbol}{total + shipping:,.2f} ({code})",
        "",
        f"Invoice: {invoice}",
        f"Your order: {account}",
    ]
    return subject, "receipt"


def _reset(rng: random.Random, w: _Writer, first: str, uid: str) -> tuple[str, str]:
    subject = "Reset your password"
    token = _token(rng, 32)
    url = f"https://accounts.example.com/reset?uid={uid}&token={token}"
    minutes = rng.choice((15, 30, 60))
    ip = f"198.51.100.{rng.randrange(1, 255)}"
    w.html += _head_html(subject, "Someone asked to reset your password.")
    w.html += [
        f'<tr><td><h1 style="font-size:22px">Hi {_escape(first)},</h1>',
        f"<p>Someone (hopefully you) asked to reset the password of your account from"
        f" {ip}. The link below works once, for {minutes} minutes.</p>",
        f'<p style="text-align:center">{w.link("Choose a new password", url, "color:#fff")}</p>',
        "<p>If you did not ask for this, ignore this e-mail: your password stays as it is."
        f" {_escape(_sentence(rng, rng.randrange(6, 18)))}</p></td></tr>",
    ]
    w.text += [
        f"Hi {first},",
        "",
        f"Someone (hopefully you) asked to reset the password of your account from {ip}.",
        f"The link below works once, for {minutes} minutes:",
        "",
        url,
        "",
        "If you did not ask for this, ignore this e-mail: your password stays as it is.",
    ]
    return subject, "reset"


def _shipping(rng: random.Random, w: _Writer, first: str, uid: str) -> tuple[str, str]:
    carrier, base = rng.choice(CARRIERS)
    number = f"{rng.choice('JKLMNZ')}{rng.randrange(10**11, 10**12)}"
    order = f"{rng.randrange(2024, 2027)}-{rng.randrange(100000, 999999)}"
    day = rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"))
    subject = f"Order {order} has shipped: arriving {day}"
    track = f"{base}{number}"
    ours = f"https://shop.example.com/track/{order}?uid={uid}&k={_token(rng, 6)}"
    symbol = rng.choice(CURRENCIES)[0]
    w.html += _head_html(subject, f"{carrier} {number}")
    w.html += [
        f'<tr><td><h1 style="font-size:22px">Good news, {_escape(first)}!</h1>',
        f"<p>Your order <b>{order}</b> is on its way with {carrier} and should arrive on"
        f" {day}. Tracking number: <b>{number}</b>.</p>",
        f"<p>{w.link(f'Track with {carrier}', track)} &middot;"
        f" {w.link('Delivery options', ours)}</p></td></tr>",
    ]
    w.text += [
        f"Good news, {first}!",
        "",
        f"Your order {order} is on its way with {carrier} and should arrive on {day}.",
        f"Tracking number {number}: {track}",
        f"Delivery options: {ours}",
        "",
    ]
    _items(w, rng, uid, symbol, rng.randrange(1, 8))
    w.html.append(f"<tr><td><p>{_escape(_sentence(rng, rng.randrange(10, 30)))}</p></td></tr>")
    return subject, "shipping"


def _digest(rng: random.Random, w: _Writer, first: str, uid: str) -> tuple[str, str]:
    week = rng.randrange(1, 53)
    subject = f"{first}, your weekly digest (week {week})"
    w.html += _head_html(subject, "What happened this week")
    w.html.append(
        f'<tr><td><h1 style="font-size:22px">This week for you, {_escape(first)}</h1></td></tr>'
    )
    w.text += [f"This week for you, {first}", ""]
    for _ in range(rng.randrange(10, 23)):
        topic = rng.choice(TOPICS)
        slug = f"{topic.lower().replace(' ', '-').replace('&', 'and')}-{rng.randrange(10**5)}"
        url = f"https://blog.example.com/{slug}?utm_source=digest&utm_campaign=w{week}&u={uid}"
        w.html += [
            '<tr><td style="border-bottom:1px solid #e4e7eb">',
            f'<h2 style="font-size:17px;margin:0 0 6px">{w.link(topic, url, "color:#1f2933")}</h2>',
            f"<p>{_escape(_sentence(rng, rng.randrange(18, 45)))}</p>",
            f"<p>{w.link('Read more →', url + '&cta=1')}",
        ]
        if rng.random() < 0.3:
            share = f"https://blog.example.com/share?post={slug}&from={uid}"
            w.html.append(f" &middot; {w.link('Share', share, 'color:#6b7785')}")
        w.html.append("</p></td></tr>")
        w.text += [f"* {topic}", f"  {url}", ""]
    return subject, "digest"


SHAPES = (("receipt", 35, _receipt), ("reset", 25, _reset), ("shipping", 25, _shipping),
          ("digest", 15, _digest))  # fmt: skip


def personalized(index: int, seed: int = DEFAULT_SEED) -> LoadMessage:
    """Message ``index`` of the load ``seed``: always the same bytes for the same pair."""
    rng = random.Random(f"smartrelay-bench-load:{seed}:{index}")
    first, last = rng.choice(FIRST), rng.choice(LAST)
    local = f"{_ascii(first)}.{_ascii(last)}.{index}".lower()
    recipient = f"{local}@{DOMAIN}"
    uid = hashlib.blake2s(f"{seed}:{index}".encode(), digest_size=6).hexdigest()
    roll = rng.randrange(100)
    shape = SHAPES[-1][2]
    for _name, share, candidate in SHAPES:
        if roll < share:
            shape = candidate
            break
        roll -= share
    w = _Writer()
    subject, kind = shape(rng, w, first, uid)
    _footer(w, rng, uid, "Example Shop", minimal=kind == "reset")
    eight_bit = rng.random() < 0.5
    boundary = f"=_alt_{_token(rng, 8)}"
    encoding = "8bit" if eight_bit else "quoted-printable"
    text = "\n".join(w.text) + "\n"
    html = "\n".join(w.html) + "\n"
    head = [
        f'From: "Example Shop" <{SENDER}>',
        f"To: {_encoded(f'{first} {last}')} <{recipient}>",
        f"Subject: {_encoded(subject)}",
        f"Date: {rng.choice(('Mon', 'Tue', 'Wed', 'Thu', 'Fri'))}, {rng.randrange(1, 29)}"
        f" Nov 2026 {rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
        " +0000",
        f"Message-ID: <{kind}.{uid}.{_token(rng, 6)}@app.example.com>",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/alternative; boundary="{boundary}"',
    ]
    parts = []
    for subtype, body in (("plain", text), ("html", html)):
        data = body.encode()
        if not eight_bit:
            data = quopri.encodestring(data)
        parts.append(
            f"--{boundary}\nContent-Type: text/{subtype}; charset=utf-8\n"
            f"Content-Transfer-Encoding: {encoding}\n\n".encode()
            + data
        )
    raw = "\n".join(head).encode() + b"\n\n" + b"".join(parts) + f"--{boundary}--\n".encode()
    return LoadMessage(index, kind, recipient, raw, w.links, eight_bit)


def _encoded(text: str) -> str:
    """RFC 2047 when not ASCII (the header section stays ASCII: no SMTPUTF8 needed)."""
    if text.isascii():
        return f'"{text}"' if "'" in text else text
    return Header(text, "utf-8").encode()


def _ascii(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name.replace("ł", "l").replace("ø", "o"))
    return "".join(c for c in decomposed if c.isascii() and c.isalnum())


def load(start: int, count: int, seed: int = DEFAULT_SEED) -> Iterator[LoadMessage]:
    for index in range(start, start + count):
        yield personalized(index, seed)


def smtp_data(message: LoadMessage) -> bytes:
    """The message as DATA sends it: CRLF line ends, dot-stuffed, with the final dot."""
    data = message.data.replace(b"\n", b"\r\n")
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def describe(messages: list[LoadMessage]) -> str:
    """One line: how many, sizes, links, shapes, encodings."""
    sizes = sorted(len(m.data) for m in messages)
    links = sorted(m.links for m in messages)
    kinds: dict[str, int] = {}
    for m in messages:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    shares = ", ".join(f"{k} {v / len(messages):.0%}" for k, v in sorted(kinds.items()))
    eight = sum(m.eight_bit for m in messages) / len(messages)
    return (
        f"{len(messages):,} personalized messages: {sizes[0]:,}-{sizes[-1]:,} bytes"
        f" (median {statistics.median(sizes):,.0f}, mean {statistics.fmean(sizes):,.0f}),"
        f" {links[0]}-{links[-1]} links (median {statistics.median(links):.0f}); {shares};"
        f" 8bit {eight:.0%}, quoted-printable {1 - eight:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--show", type=int, default=0, help="print the first N messages")
    args = parser.parse_args()
    messages = list(load(0, args.count, args.seed))
    print(describe(messages))
    for message in messages[: args.show]:
        print(f"--- {message.index} {message.kind} <{message.recipient}>")
        print(message.data.decode("utf-8", "replace"))


if __name__ == "__main__":
    main()
