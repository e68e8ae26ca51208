"""bench/load.py's second shape, the newsletter (issue 19): sizes, links and attachment within
the shape's bounds, the MIME structure it claims, one message per (seed, index), every message
different; the transactional load unchanged; bench/rewrap_chain.py and bench/relay.py's
options for it; the queue run on PostgreSQL, run for real on a small queue."""

from __future__ import annotations

import email
import email.policy
import hashlib
import importlib
import os
import re
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from smartrelay.rewrap.dkim import generate_key
from smartrelay.tokens import load_keyring
from tests.conftest import service_missing
from tests.support.postfix import find_postfix_tool
from tests.support.postgres import PostgresUnavailable, find_bindir

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def bench_module(name: str) -> Any:
    """bench/ is not a package: its scripts import each other by name."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def pdf_is_consistent(pdf: bytes) -> None:
    """The xref table's offsets point at the objects they name, startxref at the table."""
    assert pdf.startswith(b"%PDF-1.7\n") and pdf.endswith(b"%%EOF\n")
    startxref = int(pdf.rsplit(b"startxref\n", 1)[1].split(b"\n", 1)[0])
    assert pdf[startxref:].startswith(b"xref\n0 ")
    entries = re.findall(rb"(\d{10}) 00000 n \n", pdf[startxref:])
    assert len(entries) >= 6
    for number, offset in enumerate(entries, 1):
        assert pdf[int(offset) :].startswith(f"{number} 0 obj\n".encode())


def test_newsletter_has_the_shape_it_claims() -> None:
    load = bench_module("load")
    pdf = load.campaign_pdf(1)
    assert 200 * 1024 - 2048 <= len(pdf) <= 200 * 1024 + 2048
    pdf_is_consistent(pdf)
    messages = [load.newsletter(index, 1) for index in range(12)]
    for m in messages:
        assert m.kind == "newsletter" and m.links == 120 and m.attachment == len(pdf)
        assert 330_000 <= len(m.data) <= 380_000
        # SMTP's line limit (RFC 5321 4.5.3.1.6): QP and base64 keep lines short.
        assert max(len(line) for line in m.data.split(b"\n")) <= 998
        message = parsed(m.data)
        assert message["To"].addresses[0].addr_spec == m.recipient
        assert message.get_content_type() == "multipart/mixed"
        alternative, attachment = message.iter_parts()
        assert alternative.get_content_type() == "multipart/alternative"
        text, html = alternative.iter_parts()
        for part, subtype in ((text, "plain"), (html, "html")):
            assert part.get_content_type() == f"text/{subtype}"
            assert part["Content-Transfer-Encoding"] == "quoted-printable"
            assert part.get_content_charset() == "utf-8"
        assert attachment.get_content_type() == "application/pdf"
        assert attachment.get_content_disposition() == "attachment"
        assert attachment.get_filename() == load.ATTACHMENT_NAME
        assert attachment["Content-Transfer-Encoding"] == "base64"
        assert attachment.get_payload(decode=True) == pdf  # one campaign, one catalogue
        page = html.get_payload(decode=True)
        assert isinstance(page, bytes)
        assert 57_000 <= len(page) <= 63_000
        hrefs = re.findall(rb'<a href="([^"]+)"', page)
        assert len(hrefs) == 120
        # All but the four shared footer links carry the recipient's id.
        uid = re.search(rb"rid=([0-9a-f]{12})", page)
        assert uid is not None
        assert sum(uid[1] in href for href in hrefs) == 116
        assert b"unsubscribe" in page and b"Picked for you" in page
        # The text version has one link per item (50), not the HTML's image and button links.
        assert text.get_content().count("https://") >= 40


def test_newsletters_are_one_per_seed_and_index_and_all_different() -> None:
    load = bench_module("load")
    assert load.newsletter(7, 1) == load.newsletter(7, 1)
    script = "import hashlib, load; print(hashlib.sha256(load.newsletter(7, 1).data).hexdigest())"
    again = subprocess.run(  # a process of its own: nothing carried in caches
        [sys.executable, "-c", script],
        cwd=BENCH,
        capture_output=True,
        text=True,
        check=True,
    )
    assert again.stdout.strip() == hashlib.sha256(load.newsletter(7, 1).data).hexdigest()
    assert load.newsletter(7, 2).data != load.newsletter(7, 1).data
    messages = list(load.load(0, 40, 1, "newsletter"))
    assert len({m.data for m in messages}) == 40
    assert len({m.recipient for m in messages}) == 40
    htmls = set()
    for m in messages:
        html = parsed(m.data).get_body(("html",))
        assert html is not None
        htmls.add(html.get_content())
    assert len(htmls) == 40
    assert len({load.campaign_pdf(1), load.campaign_pdf(2)}) == 2  # each seed its own file


def test_the_transactional_load_is_unchanged() -> None:
    """The load every earlier result was measured with (seed 1, its first 40 messages)."""
    load = bench_module("load")
    digest = hashlib.sha256()
    for m in load.load(0, 40, 1):
        digest.update(m.recipient.encode() + b"\0" + m.data + b"\0")
        assert m.attachment == 0
    assert digest.hexdigest() == "44f3ed84828cadcb45794780494fe30fa42ddef1fa898dabfaabc0f7e0d66437"


def test_describe_and_show_name_the_shape() -> None:
    load = bench_module("load")
    messages = list(load.load(0, 5, 1, "newsletter"))
    line = load.describe(messages)
    assert "newsletter 100%" in line and "120-120 links" in line
    assert f"with a {len(load.campaign_pdf(1)):,}-byte PDF" in line
    shown = load.shown(messages[0])
    assert "more lines of base64" in shown and len(shown) < 120_000
    assert shown.endswith(f"{parsed(messages[0].data).get_boundary()}--\n")
    result = subprocess.run(
        [sys.executable, "load.py", "--shape", "newsletter", "--count", "3", "--show", "1"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith("3 personalized messages: ")
    assert "Content-Type: application/pdf" in result.stdout


def test_relay_bench_options_for_the_shape_and_the_queue_engine() -> None:
    relay = bench_module("relay")
    args = relay.parse_args(["--shape", "newsletter"])
    assert (args.messages, args.latency_messages, args.warmup) == (1000, 500, 50)
    assert args.queue_messages == 10_000 and args.queue_engine == "sqlite"
    quick = relay.parse_args(["--shape", "newsletter", "--quick", "--queue-engine", "postgresql"])
    assert (quick.messages, quick.latency_messages, quick.warmup) == (100, 50, 10)
    assert quick.queue_engine == "postgresql"
    default = relay.parse_args([])
    assert (default.shape, default.messages, default.queue_messages) == (
        "transactional",
        5000,
        100_000,
    )
    # What the client sends: the message as DATA needs it, one transaction per message.
    [sent] = relay.make_load(3, 1, 1, shape="newsletter")
    message = bench_module("load").newsletter(3, 1)
    assert sent.commands.startswith(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<")
    assert b"BODY=8BITMIME" not in sent.commands  # quoted-printable and base64 only
    assert sent.data.endswith(b"\r\n.\r\n")
    unstuffed = sent.data[:-3].replace(b"\r\n..", b"\r\n.")
    assert unstuffed == message.data.replace(b"\n", b"\r\n")
    assert relay.allowed_seconds([sent] * 1000) > relay.allowed_seconds([sent] * 100) > 120


def test_rewrap_chain_bench_runs_on_newsletters() -> None:
    """The chain re-wraps each newsletter (the script fails on a failed copy) and says its cost."""
    result = subprocess.run(
        [sys.executable, "rewrap_chain.py", "--shape", "newsletter", "--messages", "3"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "load: newsletter shape, 200 personalized messages" in result.stdout
    assert "3 messages x 1 recipient(s) in 1 domain(s): 3 chain runs, 3 copies" in result.stdout
    assert re.search(r"chain: [0-9.]+ ms CPU per copy", result.stdout)


def test_chain_instructions_bench_runs_the_chain_it_counts(tmp_path: Path) -> None:
    """bench/chain_instructions.py's run under valgrind, without valgrind (which the suite
    does not install): the chain re-wraps the messages it is told to (it fails otherwise)."""
    generate_key("example.com", "bench", "rsa", str(tmp_path))
    load_keyring(str(tmp_path / "secret.key"))
    result = subprocess.run(
        [sys.executable, "chain_instructions.py", "--inner", str(tmp_path), "--from", "2"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    broken = subprocess.run(
        [sys.executable, "chain_instructions.py", "--inner", str(tmp_path / "missing")],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode != 0


def test_queue_run_on_postgresql() -> None:
    """`bench/relay.py --queue-run --queue-engine postgresql`, for real on a small queue: a
    throwaway server, the relay's next hop refusing, every message queued and counted."""
    try:
        find_bindir()
    except PostgresUnavailable as error:
        service_missing(f"PostgreSQL server not installed: {error}")
    if find_postfix_tool("smtp-sink") is None:
        service_missing("postfix smtp-sink not installed")
    result = subprocess.run(
        [
            sys.executable,
            "bench/relay.py",
            "--systems",
            "none",
            "--queue-run",
            "--queue-engine",
            "postgresql",
            "--pg-fsync",
            "off",
            "--queue-messages",
            "200",
            "--queue-settle",
            "0",
            "--sessions",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = result.stdout
    assert "queue run: SmartRelay/PostgreSQL, 200 messages, next hop a closed port" in out
    assert "PG PSS MiB" in out
    row = r"^\s+([\d,]+)\s+([\d,]+)\s+[\d,]+\s+([\d.]+)\s+[\d.]+\s+\d+\s+([\d.]+)"
    rows = re.findall(row, out, re.M)
    assert len(rows) >= 11  # started, then ten steps (each line twice: progress and summary)
    accepted, queued, rss, server_pss = rows[-1]
    assert accepted == queued == "200"
    assert float(rss) > 20 and float(server_pss) > 5
    assert "FAILED" not in out and "problem line" not in out
