"""[delivery.routes]: smartrelay.delivery.routing.Router picks the route of a recipient domain."""

from __future__ import annotations

import pytest

from smartrelay.config import Route, parse_config
from smartrelay.delivery.routing import (
    NextHop,
    ResolvedRoute,
    Router,
    domain_key,
    normalize_domain,
)

ROUTES = (
    Route("example.com", "smtp://127.0.0.1:2600"),
    Route("mail.example.com", "mx"),
    Route("partner.test", "smtp+starttls://user:p%40ss@relay.partner.test"),
    Route("secure.test", "smtps://relay.secure.test:4465"),
    Route("other.test", "smtp+starttls://relay.partner.test:587"),
    Route("*", "mx"),
)


@pytest.fixture
def router() -> Router:
    return Router(ROUTES)


# -- matching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "route_domain"),
    [
        ("example.com", "example.com"),  # exact
        ("a.example.com", "example.com"),  # parent
        ("a.b.c.example.com", "example.com"),  # grandparent
        ("mail.example.com", "mail.example.com"),  # a more specific route wins
        ("x.mail.example.com", "mail.example.com"),  # the closest parent wins
        ("notexample.com", "*"),  # a suffix that is not a parent label
        ("example.com.evil.test", "*"),
        ("com", "*"),
        ("gmail.com", "*"),
        ("EXAMPLE.COM", "example.com"),  # case-insensitive
        ("Mail.Example.Com.", "mail.example.com"),  # a trailing dot is ignored
        ("a.example.com.", "example.com"),
    ],
)
def test_most_specific_route_wins(router: Router, domain: str, route_domain: str) -> None:
    assert router.route_for(domain).route.domain == route_domain


def test_the_order_of_the_routes_does_not_matter() -> None:
    forward = Router(ROUTES)
    backward = Router(tuple(reversed(ROUTES)))
    for domain in ("example.com", "x.mail.example.com", "partner.test", "gmail.com"):
        assert forward.route_for(domain) == backward.route_for(domain)


def test_resolved_route_carries_the_normalized_domain(router: Router) -> None:
    resolved = router.route_for("Sub.Example.COM.")
    assert resolved == ResolvedRoute(
        route=ROUTES[0],
        domain="sub.example.com",
        static_hop=NextHop("127.0.0.1", 2600, "static"),
    )


def test_idn_domains_match_by_a_label() -> None:
    router = Router((Route("xn--bcher-kva.de", "smtp://sink.test"), Route("*", "mx")))
    for spelling in ("bücher.de", "BÜCHER.de", "xn--bcher-kva.de", "mail.bücher.de."):
        resolved = router.route_for(spelling)
        assert resolved.route.domain == "xn--bcher-kva.de"
        assert resolved.domain.endswith("xn--bcher-kva.de")


def test_without_a_star_route_an_unmatched_domain_is_a_lookup_error() -> None:
    router = Router((Route("example.com", "mx"),))
    assert router.route_for("a.example.com").route.domain == "example.com"
    with pytest.raises(LookupError, match="no route"):
        router.route_for("gmail.com")


def test_a_malformed_domain_still_gets_the_star_route(router: Router) -> None:
    resolved = router.route_for("bad..domain")
    assert resolved.route.domain == "*"
    assert resolved.domain == "bad..domain"
    assert router.route_for("[192.0.2.1]").route.domain == "*"


def test_the_routes_of_a_parsed_config() -> None:
    config = parse_config(
        {"delivery": {"routes": {"Example.Test": "smtp://127.0.0.1:2600"}}}
    )  # "*" = "mx" is added by the config
    router = Router(config.delivery.routes)
    assert router.route_for("x.example.test").static_hop == NextHop("127.0.0.1", 2600, "static")
    resolved = router.route_for("gmail.com")
    assert resolved.route.is_mx
    assert resolved.static_hop is None


# -- hops -----------------------------------------------------------------------------------------


def test_mx_route_has_no_static_hop(router: Router) -> None:
    resolved = router.route_for("gmail.com")
    assert resolved.route == Route("*", "mx")
    assert resolved.static_hop is None


def test_smtp_route_is_a_static_hop_without_tls(router: Router) -> None:
    assert router.route_for("example.com").static_hop == NextHop(
        host="127.0.0.1", port=2600, kind="static", implicit_tls=False, require_tls=False
    )


def test_smtp_route_default_port_is_25() -> None:
    hop = Router((Route("*", "smtp://sink.test"),)).route_for("x.test").static_hop
    assert hop == NextHop("sink.test", 25, "static")


def test_starttls_route_is_a_smarthost_requiring_tls_with_credentials(router: Router) -> None:
    assert router.route_for("partner.test").static_hop == NextHop(
        host="relay.partner.test",
        port=587,
        kind="smarthost",
        implicit_tls=False,
        require_tls=True,
        username="user",
        password="p@ss",  # percent-decoded
    )


def test_smtps_route_is_a_smarthost_with_implicit_tls(router: Router) -> None:
    assert router.route_for("secure.test").static_hop == NextHop(
        host="relay.secure.test", port=4465, kind="smarthost", implicit_tls=True
    )
    default_port = Router((Route("*", "smtps://relay.test"),)).route_for("x.test").static_hop
    assert default_port is not None
    assert default_port.port == 465


def test_the_hop_repr_hides_the_password(router: Router) -> None:
    hop = router.route_for("partner.test").static_hop
    assert hop is not None
    assert "p@ss" not in repr(hop)
    assert "'***'" in repr(hop)
    assert "password=None" in repr(NextHop("h", 25, "mx"))


# -- destination keys -----------------------------------------------------------------------------


def test_mx_destinations_are_keyed_by_domain(router: Router) -> None:
    assert router.destination_key(router.route_for("Gmail.COM.")) == "gmail.com"
    assert router.destination_key(router.route_for("x.mail.example.com")) == "x.mail.example.com"


def test_static_destinations_are_keyed_by_host_and_port(router: Router) -> None:
    assert router.destination_key(router.route_for("a.example.com")) == "smtp://127.0.0.1:2600"
    assert (
        router.destination_key(router.route_for("secure.test")) == "smtp://relay.secure.test:4465"
    )


def test_all_domains_sent_to_one_smarthost_share_one_key(router: Router) -> None:
    # Different routes, same host and port: one queue.
    keys = {router.destination_key(router.route_for(d)) for d in ("partner.test", "other.test")}
    assert keys == {"smtp://relay.partner.test:587"}
    smarthost = Router((Route("*", "smtp+starttls://u:p@Relay.Example.NET:587"),))
    keys = {
        smarthost.destination_key(smarthost.route_for(d))
        for d in ("gmail.com", "yahoo.com", "example.org")
    }
    assert keys == {"smtp://relay.example.net:587"}


def test_ipv6_smarthost_key_has_brackets() -> None:
    router = Router((Route("*", "smtp://[2001:db8::25]:2525"),))
    resolved = router.route_for("x.test")
    assert resolved.static_hop == NextHop("2001:db8::25", 2525, "static")
    assert router.destination_key(resolved) == "smtp://[2001:db8::25]:2525"


# -- domain normalization -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "normalized"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" example.com ", "example.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("XN--BCHER-KVA.DE", "xn--bcher-kva.de"),
        ("_dmarc.example.com", "_dmarc.example.com"),
    ],
)
def test_normalize_domain(domain: str, normalized: str) -> None:
    assert normalize_domain(domain) == normalized
    assert domain_key(domain) == normalized


@pytest.mark.parametrize(
    "domain", ["", ".", "a..b", "-a.test", "a-.test", "a b.test", "a/b.test", "x" * 64 + ".test"]
)
def test_normalize_domain_rejects_non_domains(domain: str) -> None:
    with pytest.raises(ValueError, match="invalid domain"):
        normalize_domain(domain)
