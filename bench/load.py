"""The benchmarks' load: personalized messages, every one different.

Real transactional mail is rendered per recipient: own name, order number, amounts, and URLs
carrying ids and tokens. A benchmark sending one message over and over measures caches that
real mail never hits, so every message here is generated from ``(seed, index)`` alone
(deterministic: the same seed gives the same load to Postfix and to SmartRelay, run after
run, and any one message can be made again on its own).

The transactional shape (the default) mixes four kinds, in these shares:

* receipt (35%): an order's items with prices, totals and VAT; 11-23 links (each item and
  its review page, the invoice with a token, the order, the footer), 5-10 KB;
* password reset (25%): a one-time link with a 32-byte token, a short footer; 3 links, 3 KB;
* shipping notice (25%): carrier and tracking number, the items; 9-21 links, 4-9 KB;
* digest (15%, newsletter-ish): 10-22 stories, each with two or three links carrying the
  recipient's id; 25-61 links, 10-24 KB.

The second shape (``--shape newsletter``), a newsletter campaign: every message
multipart/mixed, a multipart/alternative (text/plain, then a 60 KB HTML part, +-2 KB,
both UTF-8 and quoted-printable) and the campaign's PDF of 200 KiB in base64, about 355 KB
on the wire. The HTML has 120 links: the recipient's id in all but the four shared footer
ones (a quarter of them signed as well), a preferences and an unsubscribe link with tokens,
"Picked for you" products (12, each its own prices and currency), 18 journal stories, 6
events in cities near the recipient, apps and social networks. One of three subject lines
(an A/B/C test), the first name in some; the editor's letter fills the HTML to its size.
The PDF (a valid one: four pages of Flate-compressed text and a photo of noise, which
compresses no better than a real catalogue's JPEGs) is the same bytes in every message of a
seed, as one campaign sends one catalogue to all: nothing in SmartRelay or Postfix keeps
anything across messages, so this flatters neither.

Each transactional message is multipart/alternative (text, then HTML), UTF-8; every message
is From app@example.com (both shapes), with one recipient per message
(``<first>.<last>.<index>@example.net``). Half the transactional messages use
quoted-printable for both parts, half 8bit (then the names, the currency signs and the
typography go through as raw UTF-8, sent with ``BODY=8BITMIME``; header fields are RFC
2047-encoded). The footer's help, privacy, terms and contact links are the same in every
message; every other link carries the recipient's id or a token of its own.

    .venv/bin/python bench/load.py [--shape transactional|newsletter] [--seed 1] [--count 1000]
        [--show 3]   # a summary, then samples (a base64 part cut to its first lines)
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import quopri
import random
import statistics
import unicodedata
import zlib
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
    #: The attachment's size (decoded bytes), 0 without one.
    attachment: int = 0


class _Writer:
    """Text and HTML of one message, built side by side."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.html: list[str] = []
        self.links = 0

    def link(self, label: str, url: str, style: str = "color:#0b63ce") -> str:
        return self.wrap(_escape(label), url, style)

    def wrap(self, inner_html: str, url: str, style: str = "color:#0b63ce") -> str:
        """A link around markup (an image, a button's table cell)."""
        self.links += 1
        href = url.replace("&", "&amp;")
        return f'<a href="{href}" style="{style}">{inner_html}</a>'


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


# -- the second shape: a newsletter campaign -------------------------------------------------

NEWSLETTER_HTML_BYTES = 60_000  # the HTML part's target size, decoded (each message +-2 KB)
NEWSLETTER_LINKS = 120
ATTACHMENT_BYTES = 200 * 1024  # the campaign's PDF
ATTACHMENT_NAME = "example-shop-winter-catalogue-2026.pdf"
CAMPAIGN = "winter-2026"
NAV = [("New in", "new"), ("Running", "running"), ("Hiking", "hiking"),
       ("Camping", "camping"), ("Winter", "winter"), ("Sale", "sale")]  # fmt: skip
SOCIAL = ["Facebook", "Instagram", "YouTube", "TikTok", "Pinterest", "Strava"]
CITIES = [
    "Amsterdam", "Berlin", "Lisbon", "Lyon", "Oslo", "Kraków", "Malmö", "Zürich", "Dublin",
    "Porto", "Göteborg", "Bologna", "Ghent", "Tallinn", "Innsbruck", "Bergen",
]  # fmt: skip
SUBJECTS = [  # the campaign's A/B/C subject lines
    "{first}, our winter catalogue is here",
    "New season, new trails: the winter catalogue",
    "Picked for you, {first}: 12 winter essentials",
]
_CELL = "font-family:Helvetica,Arial,sans-serif;font-size:15px;line-height:22px;color:#1f2933"
_BUTTON = (
    "background:#0b63ce;color:#ffffff;font-size:14px;font-weight:bold;line-height:40px;"
    "text-align:center;text-decoration:none;display:block;border-radius:4px"
)


@functools.cache
def campaign_pdf(seed: int = DEFAULT_SEED) -> bytes:
    """The campaign's attachment: a valid PDF of ATTACHMENT_BYTES (within a few hundred),
    the same for every message of a run, as one campaign sends one catalogue to everyone.
    Four pages of text (Flate-compressed, real zlib streams) and a photo: an RGB image of
    noise, incompressible like the JPEG photos of a real catalogue."""
    rng = random.Random(f"smartrelay-bench-pdf:{seed}")
    pages = 4
    contents = []
    for page in range(pages):
        lines = ["BT /F1 11 Tf 56 780 Td 14 TL"]
        for _ in range(48):
            name, slug = rng.choice(PRODUCTS)
            lines.append(
                f"({name} - art. {slug}-{rng.randrange(100, 999)} -"
                f" EUR {_money(rng, 4, 180):.2f}) '"
            )
        lines.append("ET")
        if page == 0:
            lines.append("q 320 0 0 240 137 40 cm /Im1 Do Q")
        contents.append(zlib.compress("\n".join(lines).encode(), 9))
    # Objects: 1 catalog, 2 pages, 3 font, 4 image, then a page and its content per page.
    kids = " ".join(f"{5 + 2 * i} 0 R" for i in range(pages))
    bodies: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"",  # the image, sized last
    ]
    for i, content in enumerate(contents):
        bodies.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font"
            b" << /F1 3 0 R >> /XObject << /Im1 4 0 R >> >> /Contents "
            + f"{6 + 2 * i} 0 R >>".encode()
        )
        bodies.append(
            f"<< /Length {len(content)} /Filter /FlateDecode >>\nstream\n".encode()
            + content
            + b"\nendstream"
        )
    overhead = 15 + sum(len(b) + 20 for b in bodies) + 190 + 20 * (len(bodies) + 1) + 60
    width = 320
    height = max(1, (ATTACHMENT_BYTES - overhead) // (width * 3))
    pixels = rng.randbytes(width * height * 3)
    bodies[3] = (
        f"<< /Type /XObject /Subtype /Image /Width {width} /Height {height} /ColorSpace"
        f" /DeviceRGB /BitsPerComponent 8 /Length {len(pixels)} >>\nstream\n".encode()
        + pixels
        + b"\nendstream"
    )
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(bodies, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(bodies) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += (
        f"trailer\n<< /Size {len(bodies) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(out)


@functools.cache
def _attachment_base64(seed: int) -> bytes:
    return base64.encodebytes(campaign_pdf(seed))  # 76-character lines


def _url(rng: random.Random, path: str, uid: str, content: str) -> str:
    """A campaign link: the recipient's id, the block it sits in, now and then a signature."""
    url = (
        f"https://shop.example.com/{path}?utm_source=newsletter&utm_medium=email"
        f"&utm_campaign={CAMPAIGN}&utm_content={content}&rid={uid}"
    )
    return url + f"&sig={_token(rng, 6)}" if rng.random() < 0.25 else url


def _section_title(title: str) -> str:
    return (
        '<tr><td style="padding:28px 24px 8px 24px;font-family:Georgia,serif;font-size:24px;'
        f'line-height:30px;color:#111827;font-weight:bold">{_escape(title)}</td></tr>'
    )


def _paragraphs(rng: random.Random, size: int) -> list[str]:
    """Sentences in paragraphs, ``size`` characters or a sentence more."""
    out: list[str] = []
    written = 0
    while written < size:
        sentences = [_sentence(rng, rng.randrange(8, 26)) for _ in range(rng.randrange(3, 7))]
        out.append(" ".join(sentences))
        written += len(out[-1]) + 60
    return out


def _newsletter_body(rng: random.Random, w: _Writer, first: str, uid: str) -> str:
    symbol = rng.choice(CURRENCIES)[0]
    subject = rng.choice(SUBJECTS).format(first=first)
    preheader = f"{first}, {_sentence(rng, 10)}"
    w.html += _head_html(subject, preheader)
    # top bar, logo and navigation
    browser = f"https://news.example.com/view/{CAMPAIGN}?rid={uid}&t={_token(rng, 12)}"
    w.html.append(
        '<tr><td align="center" style="padding:8px 24px;font-family:Helvetica,Arial,sans-serif;'
        f'font-size:11px;color:#6b7785">Trouble reading this e-mail? '
        f"{w.link('View it in your browser', browser, 'color:#6b7785')}</td></tr>"
    )
    logo = _url(rng, "", uid, "logo")
    w.html.append(
        '<tr><td align="center" style="padding:16px 24px">'
        + w.wrap(
            '<img src="https://cdn.example.com/nl/logo@2x.png" width="180" height="48"'
            ' alt="Example Shop" style="display:block;border:0;outline:none">',
            logo,
            "text-decoration:none",
        )
        + "</td></tr>"
    )
    nav = [
        w.link(label, _url(rng, f"c/{slug}", uid, f"nav-{slug}"), "color:#1f2933;"
               "text-decoration:none;font-weight:bold;padding:0 8px")
        for label, slug in NAV
    ]  # fmt: skip
    w.html.append(
        f'<tr><td align="center" style="{_CELL};border-bottom:1px solid #e4e7eb;'
        f'padding:8px 16px 16px 16px">{" &middot; ".join(nav)}</td></tr>'
    )
    w.text += [f"View in your browser: {browser}", "", "EXAMPLE SHOP", ""]
    w.text += [f"{label}: {_url(rng, f'c/{slug}', uid, 'nav-text')}" for label, slug in NAV]
    # hero
    hero = _url(rng, f"lp/{CAMPAIGN}", uid, "hero")
    w.html += [
        "<tr><td>"
        + w.wrap(
            f'<img src="https://cdn.example.com/nl/{CAMPAIGN}/hero-{rng.randrange(1, 5)}.jpg"'
            ' width="600" height="320" alt="The winter catalogue" style="display:block;'
            'width:100%;max-width:600px;height:auto;border:0">',
            hero,
            "text-decoration:none",
        )
        + "</td></tr>",
        f'<tr><td style="{_CELL};padding:24px"><h1 style="font-family:Georgia,serif;'
        f'font-size:30px;line-height:36px;margin:0 0 12px 0">{_escape(subject)}</h1>'
        f'<p style="margin:0 0 16px 0">{_escape(_sentence(rng, rng.randrange(20, 40)))}</p>'
        '<table role="presentation" cellpadding="0" cellspacing="0" align="center"><tr>'
        '<td style="border-radius:4px;background:#0b63ce" width="260">'
        + w.link("Browse the catalogue", hero + "&cta=1", _BUTTON)
        + "</td></tr></table></td></tr>",
    ]
    w.text += ["", subject.upper(), "", f"Browse the catalogue: {hero}&cta=1", ""]
    # The editor's letter goes here, written last: its length sets the HTML's size.
    letter_at, text_letter_at = len(w.html), len(w.text)
    # products picked for the recipient: 12 x 3 links
    w.html.append(_section_title(f"Picked for you, {first}"))
    w.text += ["", f"PICKED FOR YOU, {first.upper()}", ""]
    picks = rng.sample(PRODUCTS, 12)
    for row in range(0, 12, 2):
        cells = []
        for name, slug in picks[row : row + 2]:
            sku = f"{slug}-{rng.randrange(100, 999)}"
            url = _url(rng, f"p/{sku}", uid, f"pick-{row}")
            price = _money(rng, 9, 240)
            was = price * rng.choice((1.0, 1.0, 1.25, 1.4))
            old = (
                f' <span style="text-decoration:line-through;color:#9aa5b1">{symbol}{was:,.2f}'
                "</span>"
                if was > price
                else ""
            )
            cells.append(
                '<td width="50%" valign="top" style="padding:12px">'
                + w.wrap(
                    f'<img src="https://cdn.example.com/img/{sku}@2x.jpg" width="264"'
                    f' height="264" alt="{_escape(name)}" style="display:block;width:100%;'
                    'height:auto;border:0;border-radius:6px">',
                    url,
                    "text-decoration:none",
                )
                + f'<p style="{_CELL};margin:10px 0 4px 0;font-weight:bold">'
                + w.link(name, url + "&pos=name", "color:#1f2933;text-decoration:none")
                + f'</p><p style="{_CELL};margin:0 0 10px 0">{symbol}{price:,.2f}{old}</p>'
                '<table role="presentation" cellpadding="0" cellspacing="0" width="100%"><tr>'
                '<td style="border-radius:4px;background:#0b63ce">'
                + w.link("Shop now", url + "&pos=button", _BUTTON)
                + "</td></tr></table></td>"
            )
            w.text += [f"* {name}, {symbol}{price:,.2f}", f"  {url}", ""]
        w.html.append(
            '<tr><td><table role="presentation" width="100%" cellpadding="0"'
            f' cellspacing="0"><tr>{"".join(cells)}</tr></table></td></tr>'
        )
    # stories: 18 x 3 links
    w.html.append(_section_title("From the journal"))
    w.text += ["", "FROM THE JOURNAL", ""]
    for position in range(18):
        topic = rng.choice(TOPICS)
        slug = f"{topic.lower().replace(' ', '-').replace('&', 'and')}-{rng.randrange(10**5)}"
        url = (
            f"https://journal.example.com/{slug}?utm_source=newsletter&utm_campaign={CAMPAIGN}"
            f"&utm_content=story-{position}&u={uid}"
        )
        teaser = _sentence(rng, rng.randrange(8, 24))
        w.html.append(
            '<tr><td style="padding:12px 24px;border-bottom:1px solid #e4e7eb">'
            '<table role="presentation" width="100%" cellpadding="0" cellspacing="0"><tr>'
            '<td width="160" valign="top" style="padding-right:16px">'
            + w.wrap(
                f'<img src="https://cdn.example.com/journal/{slug}-thumb@2x.jpg" width="160"'
                f' height="120" alt="{_escape(topic)}" style="display:block;border:0;'
                'border-radius:4px">',
                url + "&pos=image",
                "text-decoration:none",
            )
            + f'</td><td valign="top" style="{_CELL}">'
            f'<p style="margin:0;font-size:11px;color:#0b63ce">{rng.choice(NAV)[0].upper()}</p>'
            '<h3 style="font-family:Georgia,serif;font-size:19px;line-height:25px;'
            'margin:4px 0 6px 0">'
            + w.link(topic, url + "&pos=title", "color:#111827;text-decoration:none")
            + f'</h3><p style="margin:0 0 6px 0">{_escape(teaser)}</p><p style="margin:0">'
            + w.link("Read the story →", url + "&pos=more", "color:#0b63ce;font-weight:bold")
            + "</p></td></tr></table></td></tr>"
        )
        w.text += [f"* {topic}", f"  {teaser}", f"  {url}", ""]
    # events near the recipient: 6 links
    w.html.append(_section_title("Events near you"))
    w.text += ["", "EVENTS NEAR YOU", ""]
    for city in rng.sample(CITIES, 6):
        day = f"{rng.randrange(1, 29)} {rng.choice(('Jan', 'Feb', 'Mar'))}"
        url = f"https://events.example.com/{city.lower()}?rid={uid}&e={_token(rng, 5)}"
        w.html.append(
            f'<tr><td style="{_CELL};padding:6px 24px"><b>{day}</b> &middot; {_escape(city)}:'
            f" {_escape(_sentence(rng, rng.randrange(6, 14)))} "
            + w.link("Register", url)
            + "</td></tr>"
        )
        w.text.append(f"{day}, {city}: {url}")
    # the apps and the social networks: 8 links
    apps = [
        w.wrap(
            f'<img src="https://cdn.example.com/nl/{store}-badge.png" width="135" height="40"'
            f' alt="{label}" style="border:0">',
            f"https://shop.example.com/app/{store}?rid={uid}",
            "text-decoration:none;padding:0 6px",
        )
        for store, label in (("ios", "App Store"), ("android", "Google Play"))
    ]
    social = [
        w.wrap(
            f'<img src="https://cdn.example.com/nl/social/{name.lower()}.png" width="32"'
            f' height="32" alt="{name}" style="border:0">',
            f"https://{name.lower()}.example/exampleshop?utm_source=newsletter&rid={uid}",
            "text-decoration:none;padding:0 6px",
        )
        for name in SOCIAL
    ]
    w.html.append(
        f'<tr><td align="center" style="padding:24px">{"".join(apps)}</td></tr>'
        f'<tr><td align="center" style="padding:0 24px 24px 24px">{"".join(social)}</td></tr>'
    )
    # the footer: preferences, unsubscribe and the four shared links
    prefs = f"https://shop.example.com/account/email?uid={uid}&sig={_token(rng, 8)}"
    unsubscribe = f"https://shop.example.com/unsubscribe?uid={uid}&c={CAMPAIGN}&t={_token(rng, 16)}"
    shared = [w.link(label, url, "color:#6b7785") for label, url in SHARED_FOOTER]
    w.html += [
        '<tr><td class="muted" style="border-top:1px solid #e4e7eb;padding:24px">',
        "<p>You receive this newsletter because you subscribed at Example Shop."
        f" {w.link('E-mail preferences', prefs, 'color:#6b7785')} &middot;"
        f" {w.link('Unsubscribe', unsubscribe, 'color:#6b7785')}</p>",
        "<p>" + " &middot; ".join(shared) + "</p>",
        "<p>Example Shop Ltd &middot; 1 Example Street &middot; 1000 Example City</p>",
        "</td></tr></table>",
        "</td></tr></table></body></html>",
    ]
    w.text += [
        "",
        "--",
        "You receive this newsletter because you subscribed at Example Shop.",
        f"E-mail preferences: {prefs}",
        f"Unsubscribe: {unsubscribe}",
        *(f"{label}: {url}" for label, url in SHARED_FOOTER),
        "Example Shop Ltd, 1 Example Street, 1000 Example City",
    ]
    # The editor's letter fills the HTML up to its target size (the rest varies per message).
    target = NEWSLETTER_HTML_BYTES + rng.randrange(-1500, 1500)
    have = sum(len(line.encode()) + 1 for line in w.html)
    letter = _paragraphs(rng, max(200, target - have - 200))
    w.html.insert(
        letter_at,
        f'<tr><td style="{_CELL};padding:0 24px 8px 24px"><p style="margin:0 0 12px 0">'
        f"Dear {_escape(first)},</p>"
        + "".join(f'<p style="margin:0 0 12px 0">{_escape(p)}</p>' for p in letter)
        + "</td></tr>",
    )
    w.text[text_letter_at:text_letter_at] = [f"Dear {first},", "", *letter, ""]
    return subject


def newsletter(index: int, seed: int = DEFAULT_SEED) -> LoadMessage:
    """Message ``index`` of the newsletter load ``seed``: multipart/mixed (multipart/alternative
    of text and HTML, both quoted-printable, then the campaign's PDF in base64)."""
    rng = random.Random(f"smartrelay-bench-newsletter:{seed}:{index}")
    first, last = rng.choice(FIRST), rng.choice(LAST)
    local = f"{_ascii(first)}.{_ascii(last)}.{index}".lower()
    recipient = f"{local}@{DOMAIN}"
    uid = hashlib.blake2s(f"nl:{seed}:{index}".encode(), digest_size=6).hexdigest()
    w = _Writer()
    subject = _newsletter_body(rng, w, first, uid)
    mixed, alternative = f"=_mix_{_token(rng, 8)}", f"=_alt_{_token(rng, 8)}"
    head = [
        f'From: "Example Shop" <{SENDER}>',
        f"To: {_encoded(f'{first} {last}')} <{recipient}>",
        f"Subject: {_encoded(subject)}",
        f"Date: Thu, 3 Dec 2026 09:{rng.randrange(60):02d}:{rng.randrange(60):02d} +0000",
        f"Message-ID: <newsletter.{CAMPAIGN}.{uid}.{_token(rng, 6)}@app.example.com>",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{mixed}"',
    ]
    parts = [
        "\n".join(head).encode(),
        b"\n\nThis is a multi-part message in MIME format.\n\n",
        f'--{mixed}\nContent-Type: multipart/alternative; boundary="{alternative}"\n\n'.encode(),
    ]
    for subtype, body in (("plain", "\n".join(w.text) + "\n"), ("html", "\n".join(w.html) + "\n")):
        parts.append(
            f"--{alternative}\nContent-Type: text/{subtype}; charset=utf-8\n"
            "Content-Transfer-Encoding: quoted-printable\n\n".encode()
        )
        parts.append(quopri.encodestring(body.encode()))
    parts += [
        f"--{alternative}--\n\n--{mixed}\n".encode(),
        f'Content-Type: application/pdf; name="{ATTACHMENT_NAME}"\n'
        f'Content-Disposition: attachment; filename="{ATTACHMENT_NAME}"\n'
        "Content-Transfer-Encoding: base64\n\n".encode(),
        _attachment_base64(seed),
        f"--{mixed}--\n".encode(),
    ]
    return LoadMessage(
        index, "newsletter", recipient, b"".join(parts), w.links, False, len(campaign_pdf(seed))
    )


#: bench/relay.py's --shape: the load's message ``index`` of ``seed``.
LOADS = {"transactional": personalized, "newsletter": newsletter}


def _encoded(text: str) -> str:
    """RFC 2047 when not ASCII (the header section stays ASCII: no SMTPUTF8 needed)."""
    if text.isascii():
        return f'"{text}"' if "'" in text else text
    return Header(text, "utf-8").encode()


def _ascii(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name.replace("ł", "l").replace("ø", "o"))
    return "".join(c for c in decomposed if c.isascii() and c.isalnum())


def load(
    start: int, count: int, seed: int = DEFAULT_SEED, shape: str = "transactional"
) -> Iterator[LoadMessage]:
    make = LOADS[shape]
    for index in range(start, start + count):
        yield make(index, seed)


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
    attached = sorted(m.attachment for m in messages if m.attachment)
    attachments = ""
    if attached:
        size = (
            f"{attached[0]:,}"
            if attached[0] == attached[-1]
            else f"{attached[0]:,}-{attached[-1]:,}"
        )
        attachments = f"; {len(attached) / len(messages):.0%} with a {size}-byte PDF (base64)"
    return (
        f"{len(messages):,} personalized messages: {sizes[0]:,}-{sizes[-1]:,} bytes"
        f" (median {statistics.median(sizes):,.0f}, mean {statistics.fmean(sizes):,.0f}),"
        f" {links[0]}-{links[-1]} links (median {statistics.median(links):.0f}); {shares};"
        f" 8bit {eight:.0%}, quoted-printable {1 - eight:.0%}{attachments}"
    )


def shown(message: LoadMessage, base64_lines: int = 3) -> str:
    """The message as text, each base64 part's body cut to its first lines."""
    out: list[str] = []
    state = "text"  # "header" of a base64 part, its "body", or any other "text"
    body_lines = 0
    for line in message.data.decode("utf-8", "replace").split("\n"):
        if state == "text" and line.lower().startswith("content-transfer-encoding: base64"):
            state = "header"
        elif state == "header" and not line:
            state, body_lines = "body", 0
        elif state == "body" and line.startswith("--"):
            if body_lines > base64_lines:
                out.append(f"[... {body_lines - base64_lines:,} more lines of base64 ...]")
            state = "text"
        elif state == "body":
            body_lines += 1
            if body_lines > base64_lines:
                continue
        out.append(line)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--shape", choices=sorted(LOADS), default="transactional")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--show", type=int, default=0, help="print the first N messages")
    args = parser.parse_args()
    messages = list(load(0, args.count, args.seed, args.shape))
    print(describe(messages))
    for message in messages[: args.show]:
        print(f"--- {message.index} {message.kind} <{message.recipient}>")
        print(shown(message))


if __name__ == "__main__":
    main()
