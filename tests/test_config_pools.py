"""``[[delivery.pools]]`` (SPEC section 2): parsed into Pool values, one clear error per bad key."""

from __future__ import annotations

import tomllib

import pytest

from smartrelay.config import ConfigError, Pool, SourceAddress, parse_config

SPEC_EXAMPLE = """
[[delivery.pools]]                  # outbound source addresses
name = "transactional"
source_addresses = [{ address = "192.0.2.10", helo = "mta1.example.com" }]
senders = ["example.com"]           # sender domains that use this pool
tags = []                           # or messages carrying one of these tags
credentials = []                    # or mail submitted with one of these SMTP credentials
"""


def pools_of(text: str) -> tuple[Pool, ...]:
    return parse_config(tomllib.loads(text), "etc/x.toml").delivery.pools


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        pools_of(text)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_no_pools_by_default() -> None:
    assert pools_of("") == ()


def test_the_spec_example() -> None:
    assert pools_of(SPEC_EXAMPLE) == (
        Pool(
            name="transactional",
            source_addresses=(SourceAddress("192.0.2.10", "mta1.example.com"),),
            senders=("example.com",),
        ),
    )


def test_every_key_in_file_order() -> None:
    pools = pools_of(
        """
[[delivery.pools]]
name = "marketing"
source_addresses = [
  { address = "2001:DB8::0010", helo = "MTA6.Example.com." },
  { address = "198.51.100.7", helo = "mta7.example.com" },
]
tags = ["newsletter", "Promo"]
selection = "round-robin"

[[delivery.pools]]
name = "billing"
source_addresses = [{ address = "198.51.100.8", helo = "mta8.example.com" }]
senders = ["@Billing.Example.COM"]
credentials = ["billing-app"]
"""
    )
    assert [p.name for p in pools] == ["marketing", "billing"]
    marketing, billing = pools
    assert marketing.source_addresses == (
        SourceAddress("2001:db8::10", "mta6.example.com"),
        SourceAddress("198.51.100.7", "mta7.example.com"),
    )
    assert [a.version for a in marketing.source_addresses] == [6, 4]
    assert marketing.tags == ("newsletter", "Promo")
    assert marketing.selection == "round-robin"
    assert billing.senders == ("billing.example.com",)
    assert billing.credentials == ("billing-app",)
    assert billing.selection == "hash"


ADDRESS = '[{ address = "192.0.2.10", helo = "mta1.example.com" }]'


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        (f"source_addresses = {ADDRESS}\nsenders = ['a.test']", "[0].name", "required key"),
        (f"name = ''\nsource_addresses = {ADDRESS}\ntags = ['t']", "[0].name", "invalid pool"),
        ("name = 'p'\nsenders = ['a.test']", "[0].source_addresses", "at least one"),
        ("name = 'p'\nsource_addresses = []\nsenders = ['a.test']", "[0].source_addresses", ""),
        (
            "name = 'p'\nsource_addresses = [{ address = '192.0.2.300', helo = 'a.test' }]\n"
            "tags = ['t']",
            "[0].source_addresses[0].address",
            "invalid IP address '192.0.2.300'",
        ),
        (
            "name = 'p'\nsource_addresses = [{ address = 'mta.example.com', helo = 'a.test' }]\n"
            "tags = ['t']",
            "[0].source_addresses[0].address",
            "invalid IP address",
        ),
        (
            "name = 'p'\nsource_addresses = [{ address = '0.0.0.0', helo = 'a.test' }]\n"
            "tags = ['t']",
            "[0].source_addresses[0].address",
            "cannot be a source address",
        ),
        (
            "name = 'p'\nsource_addresses = [{ address = '192.0.2.1' }]\ntags = ['t']",
            "[0].source_addresses[0].helo",
            "required key",
        ),
        (
            "name = 'p'\nsource_addresses = [{ address = '192.0.2.1', helo = 'mta_1.example' }]\n"
            "tags = ['t']",
            "[0].source_addresses[0].helo",
            "invalid HELO name",
        ),
        (
            "name = 'p'\nsource_addresses = [{ address = '192.0.2.1', helo = 'localhost' }]\n"
            "tags = ['t']",
            "[0].source_addresses[0].helo",
            "fully qualified",
        ),
        (
            "name = 'p'\nsource_addresses = [{ address = '192.0.2.1', helo = 'a.test', x = 1 }]\n"
            "tags = ['t']",
            "[0].source_addresses[0].x",
            "unknown key",
        ),
        (
            "name = 'p'\nsource_addresses = [\n { address = '192.0.2.1', helo = 'a.test' },\n"
            " { address = '192.0.2.01', helo = 'b.test' }]\ntags = ['t']",
            "[0].source_addresses[1].address",
            "invalid IP address",
        ),
        (f"name = 'p'\nsource_addresses = {ADDRESS}", "[0]", "matches no mail"),
        (
            f"name = 'p'\nsource_addresses = {ADDRESS}\nsenders = []\ntags = []",
            "[0]",
            "matches no mail",
        ),
        (f"name = 'p'\nsource_addresses = {ADDRESS}\nsenders = ['a..b']", "[0].senders[0]", ""),
        (f"name = 'p'\nsource_addresses = {ADDRESS}\ntags = ['']", "[0].tags[0]", "invalid tag"),
        (f"name = 'p'\nsource_addresses = {ADDRESS}\ncredentials = [1]", "[0].credentials[0]", ""),
        (
            f"name = 'p'\nsource_addresses = {ADDRESS}\ntags = ['t']\nselection = 'random'",
            "[0].selection",
            "expected 'hash' or 'round-robin'",
        ),
        (
            f"name = 'p'\nsource_addresses = {ADDRESS}\ntags = ['t']\nsender = ['a.test']",
            "[0].sender",
            "did you mean 'senders'",
        ),
    ],
)
def test_a_bad_pool_is_one_clear_error(body: str, key: str, problem: str) -> None:
    message = error_of(f"[[delivery.pools]]\n{body}\n")
    assert message.startswith(f"etc/x.toml: delivery.pools{key}: "), message
    assert problem in message


def test_names_and_addresses_are_unique() -> None:
    one = "[[delivery.pools]]\nname = '{name}'\nsource_addresses = [{{ address = '{ip}',"
    one += " helo = 'a.test' }}]\ntags = ['t']\n"
    message = error_of(one.format(name="p", ip="192.0.2.1") + one.format(name="p", ip="192.0.2.2"))
    assert message == (
        "etc/x.toml: delivery.pools[1].name: duplicate pool name 'p' (also delivery.pools[0])"
    )
    message = error_of(
        one.format(name="p", ip="2001:db8::1") + one.format(name="q", ip="2001:DB8:0::1")
    )
    assert message == (
        "etc/x.toml: delivery.pools[1].source_addresses[0].address: duplicate source address"
        " '2001:db8::1' (also delivery.pools[0].source_addresses[0])"
    )


def test_pools_must_be_an_array_of_tables() -> None:
    message = error_of("[delivery]\npools = 'transactional'\n")
    assert message.startswith("etc/x.toml: delivery.pools: expected an array of tables")
