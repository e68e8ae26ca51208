"""The re-wrap chain alone, per copy: CPU milliseconds for `bench/relay.py`'s message.

Each copy is a different stored message (its own Received field and queue id, as the listener
stores them), so nothing cached per message is reused; what is cached per HTML text (the
tokenized template) is, as in the relay. The RSA signature runs inline here, and is also
timed on its own, so the chain's Python cost is the difference.

    .venv/bin/python bench/rewrap_chain.py [--copies 2000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from relay import build_message

from smartrelay.config import DkimKey
from smartrelay.rewrap.chain import RewrapChain, RewrapResult, RewrapSettings
from smartrelay.rewrap.dkim import DkimSigner, generate_key
from smartrelay.storage.store import ClaimedRecipient, StoredMessage, Suppression
from smartrelay.tokens import TokenCodec, load_keyring


class NoSuppressions:
    """The chain's one use of the store."""

    def active_suppressions(self, addresses: Iterable[str]) -> Deferred[dict[str, Suppression]]:
        list(addresses)
        return succeed({})


def stored_messages(count: int) -> list[tuple[StoredMessage, tuple[ClaimedRecipient, ...]]]:
    body = build_message().replace(b"\n", b"\r\n")
    jobs: list[tuple[StoredMessage, tuple[ClaimedRecipient, ...]]] = []
    for index in range(count):
        queue_id = f"Q{index:08d}"
        received = (
            "Received: from client (localhost [127.0.0.1])\r\n"
            f"\tby relay.example.org (SmartRelay) with ESMTP id {queue_id}\r\n"
            f"\tfor <user{index}@example.net>; Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        ).encode()
        message = StoredMessage(
            queue_id, time.time(), "app@example.com", (), {}, {}, received + body
        )
        recipient = ClaimedRecipient(index, queue_id, f"user{index}@example.net", "example.net", 0)
        jobs.append((message, (recipient,)))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="cProfile one pass, top 30")
    args = parser.parse_args()

    directory = tempfile.mkdtemp(prefix="smartrelay-bench-chain-")
    key_path, _ = generate_key("example.com", "bench", "rsa", directory)
    signer = DkimSigner([DkimKey("example.com", "bench", key_path)])
    codec = TokenCodec(load_keyring(os.path.join(directory, "secret.key")))
    settings = RewrapSettings(
        hostname="relay.example.org",
        base_url="https://t.example.org",
        return_path_domain="bounces.example.org",
    )
    chain = RewrapChain(
        settings,
        codec,
        signer,
        NoSuppressions(),  # type: ignore[arg-type]
        in_thread=lambda work: succeed(work()),
    )
    jobs = stored_messages(args.copies)

    def one_pass() -> list[RewrapResult]:
        results: list[RewrapResult] = []
        for message, recipients in jobs:
            Deferred.fromCoroutine(chain.run(message, recipients)).addCallback(results.append)
        return results

    one_pass()  # warm: templates, caches, imports
    started = time.process_time()
    results = one_pass()
    chain_ms = (time.process_time() - started) / len(jobs) * 1000
    assert len(results) == len(jobs) and all(len(r.copies) == 1 for r in results)
    key = signer.keys_for("example.com")[0]
    started = time.process_time()
    for _ in range(500):
        key.sign_digest(b"\x01" * 32)
    rsa_ms = (time.process_time() - started) / 500 * 1000
    size = len(results[0].copies[0].data)
    print(f"message: {len(jobs[0][0].raw):,} bytes stored, {size:,} bytes per copy")
    print(f"chain: {chain_ms:.3f} ms CPU per copy, of which RSA-2048 {rsa_ms:.3f} ms")
    print(f"chain without the RSA operation: {chain_ms - rsa_ms:.3f} ms per copy")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(one_pass)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
