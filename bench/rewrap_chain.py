"""The re-wrap chain alone: CPU per copy on the personalized load, and what its caches do.

The messages are `bench/load.py`'s (every one different, as real mail is; ``--shape
newsletter``: its 355 KB newsletters, 120 links and a PDF, 300 of them by default),
stored as the listener stores them (a Received field and a queue id of their own). Each
message goes to ``--recipients`` recipients spread over ``--domains`` domains: the delivery
manager runs the chain once per message and domain (a job), so a message to three domains is
three runs over the same stored message. The default, one recipient, is transactional mail;
``--recipients 50 --domains 10`` is one message sent to many. ``--identical`` sends the
load's first message every time (what the old benchmark did), to show what the caches gain
from identical messages alone.

The chain keeps two things, for a message's copies and its next jobs (see
smartrelay/rewrap/chain.py): the MIME plan of the message, and the tokenized templates of its
HTML parts, with their links' click-token payloads. Nothing is kept across messages. The
script counts the hits of each and measures the CPU per copy with it and with it turned off
(``--off plans,templates``: not reused at all, not even by the copies of one message).
``--url-cache`` puts back, for comparison, the cache across messages that tokens.py had
(each URL's payload, LRU, 4,096 URLs) and counts its hits. The RSA signature runs inline
and is timed on its own, so the chain's Python cost is the difference.

    .venv/bin/python bench/rewrap_chain.py [--shape transactional|newsletter] [--messages 2000]
        [--recipients 1] [--domains 1] [--identical] [--off plans,templates] [--url-cache]
        [--seed 1] [--profile] [--warnings] [--glibc-defaults]

``--warnings`` turns the content checks on (docs/deliverability.md), as the relay runs them,
with the events counted instead of stored, to measure their CPU share.

glibc's malloc thresholds are set as every relay process sets them
(smartrelay/malloc_trim.py: freed memory kept until the trim); ``--glibc-defaults`` leaves
glibc's own, under which each big buffer of a newsletter's copy costs page faults.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, succeed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load import LOADS, describe

import smartrelay.rewrap.chain as chain_module
from smartrelay.config import DkimKey
from smartrelay.events import WarningEvent
from smartrelay.malloc_trim import glibc_malloc_trim
from smartrelay.rewrap.chain import RewrapChain, RewrapResult, RewrapSettings, WarningRecorder
from smartrelay.rewrap.dkim import DkimSigner, generate_key
from smartrelay.storage.store import ClaimedRecipient, StoredMessage, Suppression
from smartrelay.tokens import TokenCodec, click_payload, load_keyring

CACHES = ("plans", "templates")
Job = tuple[StoredMessage, tuple[ClaimedRecipient, ...]]


def bench_chain(
    signer: DkimSigner, codec: TokenCodec, record_warnings: WarningRecorder | None
) -> RewrapChain:
    """The chain as the benchmarks run it: no suppression list, the key operation inline."""
    settings = RewrapSettings(
        hostname="relay.example.org",
        base_url="https://t.example.org",
        return_path_domain="bounces.example.org",
    )
    return RewrapChain(
        settings,
        codec,
        signer,
        NoSuppressions(),  # type: ignore[arg-type]
        in_thread=lambda work: succeed(work()),
        record_warnings=record_warnings,
    )


class NoSuppressions:
    """The chain's one use of the store."""

    def active_suppressions(self, addresses: Iterable[str]) -> Deferred[dict[str, Suppression]]:
        list(addresses)
        return succeed({})


def jobs(
    messages: int, recipients: int, domains: int, identical: bool, seed: int, shape: str
) -> list[Job]:
    """One stored message per load message, its recipients cut into one job per domain."""
    out: list[Job] = []
    rid = 0
    make = LOADS[shape]
    for index in range(messages):
        load = make(0 if identical else index, seed)
        body = load.data.replace(b"\n", b"\r\n")
        queue_id = f"Q{index:08d}"
        received = (
            "Received: from client (localhost [127.0.0.1])\r\n"
            f"\tby relay.example.org (SmartRelay) with ESMTP id {queue_id}\r\n"
            f"\tfor <{load.recipient}>; Mon, 23 Nov 2026 12:00:00 +0000\r\n"
        ).encode()
        message = StoredMessage(
            queue_id, time.time(), "app@example.com", (), {}, {}, received + body
        )
        claimed = []
        for number in range(recipients):
            domain = f"d{number % domains}.example.net"
            claimed.append(ClaimedRecipient(rid, queue_id, f"r{number}@{domain}", domain, 0))
            rid += 1
        for d in range(domains):
            share = tuple(r for r in claimed if r.domain == f"d{d}.example.net")
            if share:
                out.append((message, share))
    return out


class Counters:
    """Lookups and misses of the plan and template caches (by counting the work a miss does)."""

    def __init__(self) -> None:
        self.plan_lookups = self.plan_misses = 0
        self.template_lookups = self.template_misses = 0

    def install(self, chain: RewrapChain) -> None:
        tracking = chain._tracking
        counters = self

        def counted(method: Callable[..., Any], lookups: str) -> Callable[..., Any]:
            @functools.wraps(method)
            def wrapper(*args: Any) -> Any:
                setattr(counters, lookups, getattr(counters, lookups) + 1)
                return method(*args)

            return wrapper

        tracking._plan = counted(tracking._plan, "plan_lookups")  # type: ignore[method-assign]
        tracking._template = counted(tracking._template, "template_lookups")  # type: ignore[method-assign]
        checked_plan = chain_module._checked_plan
        rewrite_html = getattr(chain_module, "rewrite_html")  # noqa: B009 (not exported)

        def plan_miss(raw: bytes) -> Any:
            self.plan_misses += 1
            return checked_plan(raw)

        def template_miss(*args: Any, **kwargs: Any) -> Any:
            self.template_misses += 1
            return rewrite_html(*args, **kwargs)

        setattr(chain_module, "_checked_plan", plan_miss)  # noqa: B010
        setattr(chain_module, "rewrite_html", template_miss)  # noqa: B010

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


class _Forgetful(dict[Any, Any]):
    def __setitem__(self, key: Any, value: Any) -> None:
        pass


def turn_off(names: Iterable[str]) -> None:
    """Caches not reused at all: kept for zero entries (plans, templates), or not kept."""
    for name in names:
        if name == "plans":
            chain_module.PLAN_CACHE = 0
        elif name == "templates":  # a message's templates dict that keeps nothing
            planned = functools.partial(chain_module._Planned, templates=_Forgetful())
            setattr(chain_module, "_Planned", planned)  # noqa: B010


def rate(hits: int, lookups: int) -> str:
    return f"{hits / lookups:.1%} of {lookups:,}" if lookups else "no lookups"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, help="default 2000 (newsletter: 300)")
    parser.add_argument(
        "--shape",
        choices=sorted(LOADS),
        default="transactional",
        help="bench/load.py's messages: transactional, or newsletter (60 KB HTML, 120 links,"
        " a 200 KiB PDF)",
    )
    parser.add_argument("--recipients", type=int, default=1, help="per message")
    parser.add_argument("--domains", type=int, default=1, help="jobs per message")
    parser.add_argument("--identical", action="store_true", help="the same message every time")
    parser.add_argument("--off", default="", help=f"caches not reused: {','.join(CACHES)}")
    parser.add_argument("--url-cache", action="store_true", help="the old cache, to compare")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile one pass, top 30")
    parser.add_argument(
        "--warnings", action="store_true", help="with the content checks (recorded nowhere)"
    )
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's malloc thresholds (the relay sets its own)",
    )
    args = parser.parse_args()
    allocator = glibc_malloc_trim()
    if allocator is not None and not args.glibc_defaults:
        allocator.keep_freed_memory()
    if args.messages is None:
        args.messages = 2000 if args.shape == "transactional" else 300
    off = [name for name in args.off.split(",") if name]
    if set(off) - set(CACHES):
        parser.error(f"--off takes {', '.join(CACHES)}")
    turn_off(off)
    url_cache = None
    if args.url_cache:
        url_cache = functools.lru_cache(maxsize=4096)(click_payload)
        setattr(chain_module, "click_payload", url_cache)  # noqa: B010

    with tempfile.TemporaryDirectory(prefix="smartrelay-bench-chain-") as directory:
        measure(args, off, url_cache, directory)


def measure(
    args: argparse.Namespace,
    off: list[str],
    url_cache: functools._lru_cache_wrapper[bytes] | None,
    directory: str,
) -> None:
    key_path, _ = generate_key("example.com", "bench", "rsa", directory)
    signer = DkimSigner([DkimKey("example.com", "bench", key_path)])
    codec = TokenCodec(load_keyring(os.path.join(directory, "secret.key")))
    warned: list[WarningEvent] = []

    async def record_warnings(queue_id: str, event: WarningEvent) -> bool:
        warned.append(event)
        return True

    chain = bench_chain(signer, codec, record_warnings if args.warnings else None)
    counters = Counters()
    counters.install(chain)
    # Two different halves of the load: the first warms (imports, the From domain), the
    # second is measured, so that nothing measured was seen in the warm-up.
    shape = args.shape
    warm = jobs(
        args.messages, args.recipients, args.domains, args.identical, args.seed + 1000, shape
    )
    measured = jobs(args.messages, args.recipients, args.domains, args.identical, args.seed, shape)

    def one_pass(work: list[Job]) -> list[RewrapResult]:
        results: list[RewrapResult] = []
        for message, recipients in work:
            Deferred.fromCoroutine(chain.run(message, recipients)).addCallback(results.append)
        return results

    one_pass(warm)
    counters.reset()
    if url_cache is not None:
        url_cache.cache_clear()  # counted from here; the warm-up's URLs are not the measured
    started = time.process_time()
    results = one_pass(measured)
    elapsed = time.process_time() - started
    copies = sum(len(r.copies) for r in results)
    chain_ms = elapsed / copies * 1000
    assert copies == args.messages * args.recipients and not any(r.failed for r in results)
    key = signer.keys_for("example.com")[0]
    started = time.process_time()
    for _ in range(500):
        key.sign_digest(b"\x01" * 32)
    rsa_ms = (time.process_time() - started) / 500 * 1000

    distinct = {id(message): message for message, _ in measured}
    sample = [LOADS[shape](0 if args.identical else i, args.seed) for i in range(200)]
    print(
        f"load: {shape} shape, {describe(sample)} (first 200)"
        + (" - all identical" if args.identical else "")
    )
    print(
        f"{len(distinct):,} messages x {args.recipients} recipient(s) in {args.domains}"
        f" domain(s): {len(measured):,} chain runs, {copies:,} copies;"
        f" caches off: {', '.join(off) or 'none'}"
    )
    print(
        f"chain: {chain_ms:.3f} ms CPU per copy, of which RSA-2048 {rsa_ms:.3f} ms;"
        f" without the RSA operation: {chain_ms - rsa_ms:.3f} ms per copy"
    )
    if args.warnings:
        kinds = sorted({w["kind"] for event in warned for w in event.warnings})
        print(f"content checks on: {len(warned):,} warning events ({', '.join(kinds) or 'none'})")
    c = counters
    print(f"plan cache hits: {rate(c.plan_lookups - c.plan_misses, c.plan_lookups)}")
    print(
        f"template cache hits: {rate(c.template_lookups - c.template_misses, c.template_lookups)}"
    )
    if url_cache is not None:
        info = url_cache.cache_info()
        hits = rate(info.hits, info.hits + info.misses)
        print(f"URL payload cache (across messages) hits: {hits}")
    if args.profile:
        profile = cProfile.Profile()
        again = jobs(
            args.messages, args.recipients, args.domains, args.identical, args.seed + 7, shape
        )
        profile.runcall(one_pass, again)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
