"""AUTH brute-force slow-down: smartrelay.smtp.ratelimit.AuthFailureLimiter on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from smartrelay.smtp.ratelimit import AuthFailureLimiter

IP = "192.0.2.1"
OTHER = "192.0.2.2"


@pytest.fixture
def limiter(clock: Clock) -> AuthFailureLimiter:
    return AuthFailureLimiter(clock)


def fail(limiter: AuthFailureLimiter, ip: str, times: int) -> None:
    for _ in range(times):
        limiter.record_failure(ip)


def test_unknown_client_is_neither_delayed_nor_blocked(limiter: AuthFailureLimiter) -> None:
    assert limiter.delay(IP) == 0.0
    assert not limiter.blocked(IP)
    assert limiter.failures(IP) == 0
    assert len(limiter) == 0  # looking does not create entries


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(0, 0.0), (1, 0.0), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (9, 8.0)],
)
def test_delay_doubles_from_the_second_failure_up_to_the_cap(
    limiter: AuthFailureLimiter, failures: int, delay: float
) -> None:
    fail(limiter, IP, failures)
    assert limiter.delay(IP) == delay
    assert not limiter.blocked(IP)


@pytest.mark.parametrize(
    ("base", "cap", "failures", "delay"),
    [
        (0.5, 3.0, 2, 0.5),
        (0.5, 3.0, 3, 1.0),
        (0.5, 3.0, 4, 2.0),
        (0.5, 3.0, 5, 3.0),
        (2.0, 100.0, 6, 32.0),
        (0.0, 8.0, 5, 0.0),
    ],
)
def test_delay_with_other_settings(
    clock: Clock, base: float, cap: float, failures: int, delay: float
) -> None:
    limiter = AuthFailureLimiter(clock, max_failures=50, base_delay=base, max_delay=cap)
    fail(limiter, IP, failures)
    assert limiter.delay(IP) == delay


def test_blocked_at_max_failures(limiter: AuthFailureLimiter) -> None:
    fail(limiter, IP, 9)
    assert not limiter.blocked(IP)
    limiter.record_failure(IP)
    assert limiter.blocked(IP)
    assert limiter.delay(IP) == 8.0
    fail(limiter, IP, 5)  # more failures while blocked keep it blocked
    assert limiter.blocked(IP)
    assert not limiter.blocked(OTHER)


def test_clients_are_counted_separately(limiter: AuthFailureLimiter) -> None:
    fail(limiter, IP, 10)
    limiter.record_failure(OTHER)
    assert limiter.blocked(IP)
    assert not limiter.blocked(OTHER) and limiter.delay(OTHER) == 0.0


def test_success_forgets_failures(limiter: AuthFailureLimiter) -> None:
    fail(limiter, IP, 4)
    fail(limiter, OTHER, 4)
    limiter.record_success(IP)
    assert limiter.delay(IP) == 0.0 and limiter.failures(IP) == 0
    assert limiter.delay(OTHER) == 4.0
    limiter.record_success("198.51.100.7")  # never failed: fine


def test_failures_leave_the_window(clock: Clock, limiter: AuthFailureLimiter) -> None:
    fail(limiter, IP, 5)  # at t0
    clock.advance(200)
    fail(limiter, IP, 5)  # at t0 + 200
    assert limiter.blocked(IP)
    clock.advance(99)  # t0 + 299: all ten still count
    assert limiter.blocked(IP)
    clock.advance(1)  # t0 + 300: the first five are window seconds old and no longer count
    assert not limiter.blocked(IP)
    assert limiter.failures(IP) == 5 and limiter.delay(IP) == 8.0
    clock.advance(200)  # t0 + 500: the rest are gone too
    assert limiter.failures(IP) == 0
    assert limiter.delay(IP) == 0.0 and not limiter.blocked(IP)


def test_block_ends_when_the_window_passes(clock: Clock, limiter: AuthFailureLimiter) -> None:
    fail(limiter, IP, 10)
    clock.advance(299)
    assert limiter.blocked(IP)
    clock.advance(1)
    assert not limiter.blocked(IP)


def test_sliding_window_counts_only_recent_failures(clock: Clock) -> None:
    limiter = AuthFailureLimiter(clock, window=60, max_failures=3)
    for _ in range(10):  # one failure every 30 s: never three within 60 s
        limiter.record_failure(IP)
        assert not limiter.blocked(IP)
        clock.advance(30)
    limiter.record_failure(IP)
    clock.advance(1)
    limiter.record_failure(IP)  # three within 60 s: at t-31, t-1, t
    assert limiter.blocked(IP)


def test_custom_max_failures(clock: Clock) -> None:
    limiter = AuthFailureLimiter(clock, max_failures=3)
    fail(limiter, IP, 2)
    assert not limiter.blocked(IP)
    limiter.record_failure(IP)
    assert limiter.blocked(IP)


def test_ipv6_clients_are_grouped_by_64(limiter: AuthFailureLimiter) -> None:
    for i in range(10):
        limiter.record_failure(f"2001:db8:1:2::{i + 1:x}")
    assert limiter.blocked("2001:db8:1:2:ffff::1")
    assert not limiter.blocked("2001:db8:1:3::1")
    assert limiter.key("2001:DB8:1:2::1") == "2001:db8:1:2::/64"


def test_ipv6_prefix_setting(clock: Clock) -> None:
    limiter = AuthFailureLimiter(clock, ipv6_prefix=128)
    fail(limiter, "2001:db8::1", 10)
    assert limiter.blocked("2001:db8::1")
    assert not limiter.blocked("2001:db8::2")


def test_ipv4_mapped_ipv6_counts_as_ipv4(limiter: AuthFailureLimiter) -> None:
    fail(limiter, "::ffff:192.0.2.1", 5)
    fail(limiter, IP, 5)
    assert limiter.blocked(IP) and limiter.blocked("::ffff:192.0.2.1")


@pytest.mark.parametrize("client", ["", "unix", "not an address", "fe80::1%eth0"])
def test_non_ip_clients_are_keyed_as_given(limiter: AuthFailureLimiter, client: str) -> None:
    fail(limiter, client, 10)
    assert limiter.blocked(client)


def test_expired_clients_are_pruned(clock: Clock, limiter: AuthFailureLimiter) -> None:
    for i in range(1000):
        limiter.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 1000
    clock.advance(301)
    limiter.record_failure(IP)
    assert len(limiter) == 1


def test_pruning_keeps_clients_still_in_the_window(
    clock: Clock, limiter: AuthFailureLimiter
) -> None:
    limiter.record_failure("10.0.0.1")
    clock.advance(100)
    limiter.record_failure("10.0.0.2")
    clock.advance(100)
    limiter.record_failure("10.0.0.1")  # moves 10.0.0.1 behind 10.0.0.2
    clock.advance(150)  # 10.0.0.2's failure is 250 s old, 10.0.0.1's latest 150 s
    limiter.record_failure(IP)
    assert len(limiter) == 3
    clock.advance(100)  # 10.0.0.2: 350 s, 10.0.0.1: 250 s
    limiter.record_failure(IP)
    assert len(limiter) == 2
    assert limiter.failures("10.0.0.1") == 1 and limiter.failures("10.0.0.2") == 0


def test_table_is_capped(clock: Clock) -> None:
    limiter = AuthFailureLimiter(clock, max_entries=100)
    fail(limiter, IP, 10)  # the attacker of interest, first in the table...
    for i in range(99):
        limiter.record_failure(f"10.0.0.{i}")
    clock.advance(1)
    limiter.record_failure(IP)  # ...fails again, so it is now the most recent
    for i in range(500):
        limiter.record_failure(f"10.1.{i // 256}.{i % 256}")
        assert len(limiter) <= 100
    assert len(limiter) == 100
    # The least recently failing clients were forgotten, not the most recent ones.
    assert limiter.failures("10.0.0.0") == 0
    assert limiter.failures("10.1.1.243") == 1


def test_per_client_memory_is_bounded(limiter: AuthFailureLimiter) -> None:
    fail(limiter, IP, 10_000)
    assert limiter.failures(IP) == 10  # only the last max_failures times are kept
    assert limiter.blocked(IP)


def test_default_table_cap_holds_many_clients(clock: Clock) -> None:
    limiter = AuthFailureLimiter(clock)
    for i in range(120_000):
        limiter.record_failure(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(limiter) == 100_000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 0},
        {"window": -1},
        {"max_failures": 0},
        {"base_delay": -1},
        {"max_delay": -1},
        {"max_entries": 0},
        {"ipv6_prefix": 129},
        {"ipv6_prefix": -1},
    ],
)
def test_bad_settings(clock: Clock, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AuthFailureLimiter(clock, **kwargs)  # type: ignore[arg-type]


def test_huge_max_failures_keeps_the_delay_finite(clock: Clock) -> None:
    limiter = AuthFailureLimiter(clock, max_failures=10_000, max_delay=1e308, base_delay=1.0)
    fail(limiter, IP, 5000)
    assert limiter.delay(IP) == 2.0**64
