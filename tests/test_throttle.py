"""[[delivery.throttle]]: smartrelay.delivery.throttle (TokenBucket, Throttles) on a fake clock."""

from __future__ import annotations

import math

import pytest
from twisted.internet.task import Clock

from smartrelay.config import Throttle, parse_config
from smartrelay.delivery.throttle import Throttles, TokenBucket

STAR = Throttle("*", max_connections=20, max_rate_per_second=1000 / 60)
GMAIL = Throttle("gmail.com", max_connections=5, max_rate_per_second=10)
MAIL_GMAIL = Throttle("mail.gmail.com", max_connections=1, max_rate_per_second=1)
GOOGLE = Throttle("mx:.google.com", max_connections=10, max_rate_per_second=50)
GOOGLE_L = Throttle("mx:.l.google.com", max_connections=8, max_rate_per_second=40)
OUTLOOK = Throttle("mx:outlook.com", max_connections=3, max_rate_per_second=5)
EXAMPLE = Throttle("example.com", max_connections=2, max_rate_per_second=1)

ALL = (GMAIL, GOOGLE, STAR, MAIL_GMAIL, GOOGLE_L, OUTLOOK, EXAMPLE)


@pytest.fixture
def throttles(clock: Clock) -> Throttles:
    return Throttles(clock, ALL, global_max_connections=200)


def count_taken(bucket: TokenBucket, clock: Clock, seconds: float, step: float) -> int:
    """Try to take a token every ``step`` seconds for ``seconds``; how many were taken."""
    taken = 0
    for _ in range(round(seconds / step)):
        while bucket.try_take():
            taken += 1
        clock.advance(step)
    return taken


# -- TokenBucket ----------------------------------------------------------------------------------


def test_bucket_starts_full_with_one_seconds_worth(clock: Clock) -> None:
    bucket = TokenBucket(clock, 10)
    assert bucket.burst == 10
    assert sum(bucket.try_take() for _ in range(15)) == 10
    assert bucket.wait_time() == pytest.approx(0.1)


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_bucket_burst_is_at_least_one(clock: Clock, rate: float) -> None:
    bucket = TokenBucket(clock, rate)
    assert bucket.burst == 1
    assert bucket.try_take()
    assert not bucket.try_take()
    assert bucket.wait_time() == pytest.approx(1 / rate)


def test_60_per_minute_lets_one_a_second_through_after_the_burst(clock: Clock) -> None:
    bucket = TokenBucket(clock, 60 / 60)
    assert bucket.try_take()
    assert not bucket.try_take()
    assert bucket.wait_time() == pytest.approx(1.0)
    clock.advance(0.5)
    assert not bucket.try_take()
    assert bucket.wait_time() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.try_take()
    assert not bucket.try_take()


@pytest.mark.parametrize(("rate", "burst"), [(1.0, None), (1000 / 60, None), (5.0, 20.0)])
def test_over_10_seconds_the_count_stays_within_rate_times_10_plus_burst(
    clock: Clock, rate: float, burst: float | None
) -> None:
    bucket = TokenBucket(clock, rate, burst)
    taken = count_taken(bucket, clock, 10.0, 0.01)
    assert taken <= rate * 10 + bucket.burst
    assert taken >= math.floor(rate * 10 + bucket.burst) - 1


def test_waiting_exactly_wait_time_is_enough(clock: Clock) -> None:
    bucket = TokenBucket(clock, 1000 / 60)
    taken = 0
    while clock.seconds() < 1_700_000_000 + 60:
        wait = bucket.wait_time()
        if wait > 0:
            clock.advance(wait)
        assert bucket.try_take(), "a token must be there after waiting wait_time()"
        taken += 1
    assert 1000 <= taken <= 1000 + math.ceil(bucket.burst) + 1


def test_wait_time_does_not_take(clock: Clock) -> None:
    bucket = TokenBucket(clock, 2)
    assert bucket.wait_time() == 0
    assert bucket.wait_time(2) == 0
    assert bucket.tokens() == 2
    assert bucket.try_take(2)
    assert bucket.wait_time(2) == pytest.approx(1.0)
    assert bucket.wait_time(2) == pytest.approx(1.0)


def test_more_than_the_burst_is_never_available(clock: Clock) -> None:
    bucket = TokenBucket(clock, 1, burst=3)
    clock.advance(1000)
    assert bucket.tokens() == 3  # saving up stops at the burst
    assert bucket.wait_time(4) == math.inf
    assert not bucket.try_take(4)
    assert bucket.try_take(3)


def test_a_clock_stepping_back_adds_no_tokens(clock: Clock) -> None:
    bucket = TokenBucket(clock, 1)
    assert bucket.try_take()
    clock.advance(-100)
    assert not bucket.try_take()
    clock.advance(0.5)  # counted from the earlier, later-looking time: no credit yet
    assert bucket.tokens() == pytest.approx(0.5)


def test_set_rate_keeps_the_tokens(clock: Clock) -> None:
    bucket = TokenBucket(clock, 10)
    for _ in range(8):
        assert bucket.try_take()
    bucket.set_rate(1)
    assert bucket.burst == 1
    assert bucket.tokens() == 1  # 2 left, capped at the new burst
    assert bucket.try_take()
    assert bucket.wait_time() == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (math.inf, None), (1, 0)])
def test_bucket_rejects_nonsense(clock: Clock, rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError):
        TokenBucket(clock, rate, burst)


# -- matching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "mx_host", "expected"),
    [
        # domain entries: exact, subdomain, the most specific; no partial labels
        ("gmail.com", None, GMAIL),
        ("x.gmail.com", None, GMAIL),
        ("mail.gmail.com", None, MAIL_GMAIL),
        ("a.mail.gmail.com", None, MAIL_GMAIL),
        ("GMail.COM.", None, GMAIL),
        ("notgmail.com", None, STAR),
        ("gmail.com.evil.test", None, STAR),
        ("example.org", None, STAR),
        # mx: entries beat domain entries once the MX host is known; the longest suffix wins
        ("gmail.com", "gmail-smtp-in.l.google.com", GOOGLE_L),
        ("gmail.com", "alt1.aspmx.google.com", GOOGLE),
        ("customer.example", "ASPMX.L.GOOGLE.COM.", GOOGLE_L),
        ("customer.example", "smtp.google.com", GOOGLE),
        # ".google.com" is a strict suffix: google.com itself does not match it
        ("gmail.com", "google.com", GMAIL),
        ("customer.example", "notgoogle.com", STAR),
        # an mx: suffix without a leading dot: that host and its subdomains
        ("hotmail.com", "outlook.com", OUTLOOK),
        ("hotmail.com", "mx1.eur.outlook.com", OUTLOOK),
        ("hotmail.com", "notoutlook.com", STAR),
        # an MX host that matches nothing: the domain entries as usual
        ("gmail.com", "mx.example.net", GMAIL),
        ("example.com", "", EXAMPLE),
    ],
)
def test_settings_for_precedence(
    throttles: Throttles, domain: str, mx_host: str | None, expected: Throttle
) -> None:
    assert throttles.settings_for(domain, mx_host) == expected


def test_the_order_of_the_entries_does_not_matter(clock: Clock, throttles: Throttles) -> None:
    backward = Throttles(clock, tuple(reversed(ALL)), global_max_connections=200)
    for domain, mx_host in [
        ("mail.gmail.com", None),
        ("gmail.com", "a.l.google.com"),
        ("gmail.com", "a.google.com"),
        ("x.test", None),
    ]:
        assert backward.settings_for(domain, mx_host) == throttles.settings_for(domain, mx_host)


def test_without_a_star_entry_the_defaults_apply(clock: Clock) -> None:
    throttles = Throttles(clock, (GMAIL,), global_max_connections=10)
    assert throttles.settings_for("example.org") == Throttle()
    assert throttles.settings_for("gmail.com") == GMAIL


def test_idn_domains_match_by_a_label(clock: Clock) -> None:
    entry = Throttle("xn--bcher-kva.de", max_connections=1)
    throttles = Throttles(clock, (entry, STAR), global_max_connections=10)
    assert throttles.settings_for("bücher.de") == entry
    assert throttles.key_for("BÜCHER.de") == "xn--bcher-kva.de"


def test_throttles_of_a_parsed_config(clock: Clock) -> None:
    config = parse_config(
        {"delivery": {"throttle": [{"match": "mx:.Google.com", "max_rate": "60/min"}]}}
    )
    throttles = Throttles(clock, config.delivery.throttles, config.delivery.max_connections)
    google = throttles.settings_for("gmail.com", "aspmx.l.google.com")
    assert google.match == "mx:.google.com"
    assert google.max_rate_per_second == pytest.approx(1.0)
    assert throttles.settings_for("gmail.com") == Throttle()  # the "*" the config added


# -- keys -----------------------------------------------------------------------------------------


def test_domain_and_star_entries_keep_state_per_domain(throttles: Throttles) -> None:
    assert throttles.key_for("gmail.com") == "gmail.com"
    assert throttles.key_for("X.Gmail.COM.") == "x.gmail.com"
    assert throttles.key_for("example.org") == "example.org"
    assert throttles.key_for("example.net") == "example.net"


def test_mx_entries_share_one_state_across_domains(throttles: Throttles) -> None:
    keys = {
        throttles.key_for("gmail.com", "gmail-smtp-in.l.google.com"),
        throttles.key_for("customer.example", "aspmx.l.google.com"),
        throttles.key_for("another.example", "ALT2.ASPMX.L.GOOGLE.COM."),
    }
    assert keys == {"mx:.l.google.com"}
    assert throttles.key_for("x.example", "smtp.google.com") == "mx:.google.com"
    # No mx: match: back to the domain.
    assert throttles.key_for("gmail.com", "mx.example.net") == "gmail.com"


# -- connections ----------------------------------------------------------------------------------


def test_connections_are_capped_per_key(throttles: Throttles) -> None:
    settings = throttles.settings_for("example.com")
    key = throttles.key_for("example.com")
    assert settings.max_connections == 2
    assert throttles.acquire_connection(key, settings)
    assert throttles.acquire_connection(key, settings)
    assert not throttles.acquire_connection(key, settings)
    assert throttles.connections(key) == 2
    # Another key is not affected.
    assert throttles.acquire_connection("example.org", STAR)
    assert throttles.total_connections() == 3
    throttles.release_connection(key)
    assert throttles.connections(key) == 1
    assert throttles.acquire_connection(key, settings)
    assert not throttles.acquire_connection(key, settings)


def test_connections_are_capped_globally(clock: Clock) -> None:
    throttles = Throttles(clock, (STAR,), global_max_connections=3)
    assert throttles.acquire_connection("a.test", STAR)
    assert throttles.acquire_connection("a.test", STAR)
    assert throttles.acquire_connection("b.test", STAR)
    assert not throttles.acquire_connection("b.test", STAR)
    assert not throttles.acquire_connection("c.test", STAR)
    assert throttles.connections("c.test") == 0
    assert throttles.total_connections() == 3
    throttles.release_connection("a.test")
    assert throttles.acquire_connection("c.test", STAR)
    assert throttles.total_connections() == 3


def test_release_never_goes_negative(throttles: Throttles) -> None:
    throttles.release_connection("never-acquired.test")
    assert throttles.connections("never-acquired.test") == 0
    assert throttles.total_connections() == 0
    assert throttles.acquire_connection("a.test", STAR)
    assert throttles.acquire_connection("b.test", STAR)
    for _ in range(3):
        throttles.release_connection("a.test")
    assert throttles.connections("a.test") == 0
    assert throttles.connections("b.test") == 1
    assert throttles.total_connections() == 1  # b's connection is still counted
    throttles.release_connection("b.test")
    throttles.release_connection("b.test")
    assert throttles.total_connections() == 0
    # And the caps still work afterwards.
    settings = Throttle(max_connections=1)
    assert throttles.acquire_connection("a.test", settings)
    assert not throttles.acquire_connection("a.test", settings)


# -- messages -------------------------------------------------------------------------------------


def test_take_message_60_per_minute(clock: Clock) -> None:
    settings = Throttle("*", max_rate_per_second=1.0)
    throttles = Throttles(clock, (settings,), global_max_connections=10)
    assert throttles.take_message("a.test", settings) == 0
    assert throttles.take_message("a.test", settings) == pytest.approx(1.0)
    assert throttles.take_message("a.test", settings) == pytest.approx(1.0)  # nothing taken
    clock.advance(0.25)
    assert throttles.take_message("a.test", settings) == pytest.approx(0.75)
    clock.advance(0.75)
    assert throttles.take_message("a.test", settings) == 0
    # Each key has its own bucket.
    assert throttles.take_message("b.test", settings) == 0


@pytest.mark.parametrize("rate", [1.0, 1000 / 60, 0.2])
def test_take_message_over_10_simulated_seconds(clock: Clock, rate: float) -> None:
    settings = Throttle("*", max_rate_per_second=rate)
    throttles = Throttles(clock, (settings,), global_max_connections=10)
    burst = max(1.0, rate)
    sent = 0
    end = clock.seconds() + 10
    while clock.seconds() < end:
        wait = throttles.take_message("k", settings)
        if wait == 0:
            sent += 1
        else:
            assert wait > 0
            clock.advance(min(wait, end - clock.seconds()))
    assert sent <= rate * 10 + burst
    assert sent >= math.floor(rate * 10 + burst) - 1


def test_a_new_rate_applies_to_an_existing_key(clock: Clock) -> None:
    slow = Throttle("*", max_rate_per_second=1.0)
    fast = Throttle("*", max_rate_per_second=100.0)
    throttles = Throttles(clock, (slow,), global_max_connections=10)
    assert throttles.take_message("k", slow) == 0
    assert throttles.take_message("k", slow) > 0
    clock.advance(0.02)  # 0.02 tokens at the old rate
    assert throttles.take_message("k", fast) == pytest.approx(0.0098)  # 0.98 more at 100/s
    clock.advance(0.0098)
    assert throttles.take_message("k", fast) == 0
    clock.advance(1)  # the burst is now 100
    assert sum(throttles.take_message("k", fast) == 0 for _ in range(150)) == 100


# -- back-off -------------------------------------------------------------------------------------


def test_back_off_stops_sending_and_connecting_until_it_ends(
    throttles: Throttles, clock: Clock
) -> None:
    key, settings = "gmail.com", GMAIL
    assert throttles.backed_off_until(key) is None
    throttles.back_off(key, 30)
    assert throttles.backed_off_until(key) == clock.seconds() + 30
    assert throttles.take_message(key, settings) == pytest.approx(30)
    assert not throttles.acquire_connection(key, settings)
    assert throttles.connections(key) == 0
    # Other keys carry on.
    assert throttles.take_message("example.org", STAR) == 0
    assert throttles.acquire_connection("example.org", STAR)
    clock.advance(20)
    assert throttles.take_message(key, settings) == pytest.approx(10)
    clock.advance(10)
    assert throttles.backed_off_until(key) is None
    assert throttles.take_message(key, settings) == 0
    assert throttles.acquire_connection(key, settings)


def test_a_shorter_back_off_does_not_cut_a_longer_one(throttles: Throttles, clock: Clock) -> None:
    throttles.back_off("k", 300)
    throttles.back_off("k", 10)
    assert throttles.backed_off_until("k") == clock.seconds() + 300
    throttles.back_off("k", 600)
    assert throttles.backed_off_until("k") == clock.seconds() + 600


def test_back_off_does_not_touch_open_connections(throttles: Throttles) -> None:
    assert throttles.acquire_connection("k", STAR)
    throttles.back_off("k", 60)
    assert throttles.connections("k") == 1
    throttles.release_connection("k")
    assert throttles.connections("k") == 0
    assert throttles.total_connections() == 0


# -- memory ---------------------------------------------------------------------------------------


def test_idle_state_is_dropped(clock: Clock) -> None:
    throttles = Throttles(clock, (STAR,), global_max_connections=10, prune_threshold=10)
    for i in range(100):
        assert throttles.take_message(f"d{i}.test", STAR) == 0
        clock.advance(1)  # enough for each bucket to fill up again
    assert throttles.state_size() <= 20
    # Busy keys keep their state: an empty bucket is not forgotten by a sweep.
    while throttles.take_message("busy.test", STAR) == 0:
        pass
    wait = throttles.take_message("busy.test", STAR)
    for i in range(100, 200):
        throttles.take_message(f"d{i}.test", STAR)
    assert throttles.take_message("busy.test", STAR) == pytest.approx(wait)
    # Nor is a running back-off or an open connection.
    throttles.back_off("slow.test", 3600)
    assert throttles.acquire_connection("open.test", STAR)
    for i in range(200, 300):
        throttles.take_message(f"d{i}.test", STAR)
        clock.advance(1)
    assert throttles.backed_off_until("slow.test") is not None
    assert throttles.connections("open.test") == 1
