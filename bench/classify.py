"""Classifier benchmark: reports classified per second on one core (``classify_message``).

Runs the fixtures of tests/fixtures/feedback (DSNs of Postfix, Exim, Sendmail, Exchange, Gmail,
ARF and non-ARF complaints, auto-replies, text bounces) round-robin for ``--seconds``, then a
few hostile shapes (a 25 MB report, 190 nested containers, a 1 MB header) once each.

    .venv/bin/python bench/classify.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from smartrelay.feedback.classify import MAX_REPORT_SIZE, classify_message

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "feedback"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    reports = [p.read_bytes() for p in sorted(FIXTURES.glob("*.eml"))]
    size = sum(map(len, reports)) / len(reports)
    kinds: Counter[str] = Counter()
    count = 0
    cpu_start, start = time.process_time(), time.monotonic()
    while time.monotonic() - start < args.seconds:
        for raw in reports:
            kinds[classify_message(raw).kind] += 1
        count += len(reports)
    wall = time.monotonic() - start
    cpu = time.process_time() - cpu_start
    print(f"{len(reports)} fixtures (mean {size:,.0f} bytes), {count:,} reports in {wall:.1f} s")
    print(f"  {count / cpu:,.0f} reports/s per CPU second ({1e6 * cpu / count:,.0f} us each)")
    print(f"  {count / wall:,.0f} reports/s wall clock; kinds: {dict(kinds)}")

    hostile = {
        "25 MB + 1 (refused unread)": b"Subject: x\n\n" + b"x" * MAX_REPORT_SIZE,
        "24 MB DSN body": (FIXTURES / "postfix-user-unknown.eml").read_bytes()
        + b"y" * (24 * 1024 * 1024),
        "190 nested multiparts": b"".join(
            b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(190)
        ),
        "1 MB header line": b"Subject: " + b"z" * (1 << 20) + b"\n\nbody\n",
        "20,000 parts": b"Content-Type: multipart/mixed; boundary=p\n\n"
        + b"--p\nContent-Type: text/plain\n\nx\n" * 20_000
        + b"--p--\n",
    }
    for name, raw in hostile.items():
        t = time.process_time()
        report = classify_message(raw)
        print(f"  {name}: {report.kind} in {time.process_time() - t:.3f} s CPU ({report.note})")


if __name__ == "__main__":
    main()
