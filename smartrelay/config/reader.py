"""The config reader: the TOML file to the typed objects of :mod:`smartrelay.config.model`.

The file format is the contract of SPEC section 2 and is documented for users in
docs/configuration.md. Every section and key is optional; the defaults are the class
defaults of the model. Anything wrong raises :class:`ConfigError`, whose ``str()`` is a single
line naming the file, the dotted key path and the problem, e.g.::

    etc/x.toml: smtp.allowed_networks[0]: invalid network '10.0.0.300/8'

Relative paths (data_dir, secret_file, the SQLite file, certificates, DKIM keys) are
kept as written, i.e. relative to the working directory of the process.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from smartrelay import units
from smartrelay.config.checks import (
    MAILBOX_DEFAULT_PORTS,
    database_url_problem,
    endpoint_problem,
    is_domain,
    redact_url,
    route_target_problem,
    split_url,
)
from smartrelay.config.model import (
    ApiConfig,
    Config,
    DatabaseConfig,
    DeliveryConfig,
    DeliveryTls,
    DkimAlgorithm,
    DkimKey,
    FeedbackMailbox,
    FeedbackRule,
    InboundConfig,
    IPNetwork,
    Pool,
    PoolSelection,
    RetentionConfig,
    RewrapConfig,
    Route,
    ServerConfig,
    SmtpConfig,
    SoftBouncePolicy,
    SourceAddress,
    SuppressionConfig,
    Throttle,
    WebConfig,
    Webhook,
    default_routes,
    default_throttles,
)
from smartrelay.events import EVENT_TYPES  # what [[webhooks]] events accepts
from smartrelay.feedback.smtp_replies import BOUNCE_CATEGORIES, HARD_CATEGORIES

__all__ = [
    "CHECKOUT_CONFIG",
    "INSTALLED_CONFIG",
    "MAX_DELIVERY_PROCESSES",
    "ConfigError",
    "default_config_path",
    "load_config",
    "parse_config",
    "parse_config_file",
]


# --------------------------------------------------------------------------------------
# The error


class ConfigError(Exception):
    """A problem with the config file. ``str()`` is one line: ``"{path}: {key}: {problem}"``.

    ``key`` is a dotted key path (``smtp.allowed_networks[1]``,
    ``delivery.routes."example.test"``), or ``""`` when the problem concerns the whole file
    (unreadable, invalid TOML); then ``str()`` is ``"{path}: {problem}"``.
    """

    path: str
    key: str
    problem: str

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(path, key, problem)

    def __str__(self) -> str:
        parts = [self.path, self.key, self.problem] if self.key else [self.path, self.problem]
        return _one_line(": ".join(parts))


def _one_line(text: str) -> str:
    return " ".join(text.split()) if ("\n" in text or "\r" in text) else text


CHECKOUT_CONFIG = "etc/smartrelay.toml"
INSTALLED_CONFIG = "/etc/smartrelay/smartrelay.toml"


def default_config_path() -> str:
    """``etc/smartrelay.toml`` when run from a checkout (the working directory holds it and
    ``setup.cfg``: from ``/``, ``etc/smartrelay.toml`` would be a stray ``/etc`` file), else
    the installed location."""
    in_checkout = os.path.isfile(CHECKOUT_CONFIG) and os.path.isfile("setup.cfg")
    return CHECKOUT_CONFIG if in_checkout else INSTALLED_CONFIG


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``. Raises :class:`ConfigError`."""
    return parse_config_file(path)


def parse_config_file(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path`` (the same as :func:`load_config`).
    Raises :class:`ConfigError`."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(name, "", f"cannot read file: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(name, "", f"not valid UTF-8 (at byte {e.start})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "", f"invalid TOML: {e}") from e
    return parse_config(data, name)


def parse_config(data: Mapping[str, Any], path: str = "<config>") -> Config:
    """Validate an already parsed TOML document. Raises :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError(path, "", f"expected a table, got {_describe(data)}")
    root = _Table(path, "", data, _TOP_LEVEL_KEYS)
    feedback = root.table("feedback", ("mailboxes", "rules"))
    smtp = _parse_smtp(root.table("smtp", _SMTP_KEYS))
    return Config(
        path=path,
        server=_parse_server(root.table("server", ("hostname", "data_dir"))),
        database=_parse_database(root.table("database", ("url",))),
        smtp=smtp,
        inbound=_parse_inbound(root.table("inbound", ("listen", "return_path_domain"))),
        rewrap=_parse_rewrap(root.table("rewrap", _REWRAP_KEYS)),
        web=_parse_web(root.table("web", _WEB_KEYS)),
        delivery=_parse_delivery(root.table("delivery", _DELIVERY_KEYS), smtp),
        dkim_keys=_parse_dkim(root.table("dkim", ("keys",))),
        feedback_mailboxes=_parse_feedback(feedback),
        feedback_rules=_parse_feedback_rules(feedback),
        suppression=_parse_suppression(root.table("suppression", _SUPPRESSION_KEYS)),
        retention=_parse_retention(root.table("retention", _RETENTION_KEYS)),
        webhooks=_parse_webhooks(root),
        api=_parse_api(root.table("api", ("metrics", "metrics_networks"))),
    )


_TOP_LEVEL_KEYS = (
    "server",
    "database",
    "smtp",
    "inbound",
    "rewrap",
    "web",
    "delivery",
    "dkim",
    "feedback",
    "suppression",
    "retention",
    "webhooks",
    "api",
)
_RETENTION_KEYS = ("message_bodies", "events", "feedback_reports")
_SMTP_KEYS = (
    "listen",
    "tls_certificate",
    "tls_key",
    "require_tls",
    "require_auth",
    "allowed_networks",
    "max_connections",
    "max_connections_per_client",
    "max_message_size",
    "max_recipients",
    "idle_timeout",
    "tls_handshake_timeout",
    "data_timeout",
    "on_volume_alert",
    "volume_alert_factor",
    "volume_alert_minimum",
    "volume_alert_window",
    "processes",
)
_WEB_KEYS = ("listen", "base_url", "max_connections", "idle_timeout", "trusted_proxies")
_REWRAP_KEYS = (
    "secret_file",
    "track_opens",
    "track_clicks",
    "list_unsubscribe",
    "unsubscribe_mailto",
)
_DELIVERY_KEYS = (
    "max_connections",
    "retry_schedule",
    "max_age",
    "connect_timeout",
    "tls",
    "mta_sts",
    "processes",
    "spare_processes",
    "nice",
    "routes",
    "throttle",
    "pools",
    "sandbox_route",
)
_POOL_KEYS = ("name", "source_addresses", "senders", "tags", "credentials", "selection")
_THROTTLE_KEYS = (
    "match",
    "max_connections",
    "max_messages_per_connection",
    "max_rate",
    "adaptive",
)
_SUPPRESSION_KEYS = ("hard_bounce", "soft_bounce", "complaint", "unsubscribe")


# --------------------------------------------------------------------------------------
# Sections


def _parse_server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    hostname = t.string("hostname", d.hostname)
    if not is_domain(hostname):
        raise t.error("hostname", f"invalid hostname {hostname!r} (letters, digits, '-' and '.')")
    return ServerConfig(hostname=hostname, data_dir=t.string("data_dir", d.data_dir, empty=False))


def _parse_database(t: _Table) -> DatabaseConfig:
    url = t.string("url", DatabaseConfig().url)
    problem = database_url_problem(url)
    if problem is not None:
        raise t.error("url", problem)
    return DatabaseConfig(url=url)


def _parse_smtp(t: _Table) -> SmtpConfig:
    d = SmtpConfig()
    listen = _parse_listen_array(t, "listen", d.listen)
    cert = t.string("tls_certificate", d.tls_certificate)
    key = t.string("tls_key", d.tls_key)
    if cert and not key:
        raise t.error("tls_key", f"must be set when {t.key_of('tls_certificate')} is set")
    if key and not cert:
        raise t.error("tls_certificate", f"must be set when {t.key_of('tls_key')} is set")
    for name, value in (("tls_certificate", cert), ("tls_key", key)):
        if value:
            t.check_file(name, value)
    networks_raw = t.array("allowed_networks", str)
    if networks_raw is None:
        networks = d.allowed_networks
    else:
        networks = tuple(_parse_network(t, k, v) for k, v in networks_raw)
    return SmtpConfig(
        listen=listen,
        tls_certificate=cert,
        tls_key=key,
        require_tls=t.boolean("require_tls", d.require_tls),
        require_auth=t.boolean("require_auth", d.require_auth),
        allowed_networks=networks,
        max_connections=t.count("max_connections", d.max_connections),
        max_connections_per_client=t.count(
            "max_connections_per_client", d.max_connections_per_client
        ),
        max_message_size=t.size("max_message_size", d.max_message_size),
        max_recipients=t.count("max_recipients", d.max_recipients),
        idle_timeout=t.duration("idle_timeout", d.idle_timeout),
        tls_handshake_timeout=t.duration("tls_handshake_timeout", d.tls_handshake_timeout),
        data_timeout=t.duration("data_timeout", d.data_timeout),
        on_volume_alert=t.choice("on_volume_alert", ("warn", "hold", "off"), d.on_volume_alert),
        volume_alert_factor=_factor(t, "volume_alert_factor", d.volume_alert_factor),
        volume_alert_minimum=t.count("volume_alert_minimum", d.volume_alert_minimum),
        volume_alert_window=t.duration("volume_alert_window", d.volume_alert_window),
        processes=t.integer_in("processes", d.processes, 0, MAX_LISTENER_PROCESSES),
    )


def _factor(t: _Table, name: str, default: float) -> float:
    """A number above 1 (integer or float)."""
    value = t.get(name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise t.error(name, f"expected a number above 1, got {_describe(value)}")
    if not 1 < value <= 1_000_000:
        raise t.error(name, f"expected a number above 1 (and at most 1000000), got {value}")
    return float(value)


def _parse_network(t: _Table, key: str, text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise t.error_at(key, f"invalid network {text!r}") from e
        raise t.error_at(
            key, f"invalid network {text!r}: host bits set (did you mean '{loose}'?)"
        ) from e


def _parse_inbound(t: _Table) -> InboundConfig:
    d = InboundConfig()
    listen = _parse_listen_array(t, "listen", d.listen)
    domain = t.string("return_path_domain", d.return_path_domain)
    if not is_domain(domain):
        raise t.error("return_path_domain", f"invalid domain {domain!r}")
    return InboundConfig(listen=listen, return_path_domain=domain.lower())


def _parse_rewrap(t: _Table) -> RewrapConfig:
    d = RewrapConfig()
    return RewrapConfig(
        secret_file=t.string("secret_file", d.secret_file, empty=False),
        track_opens=t.boolean("track_opens", d.track_opens),
        track_clicks=t.boolean("track_clicks", d.track_clicks),
        list_unsubscribe=t.boolean("list_unsubscribe", d.list_unsubscribe),
        unsubscribe_mailto=t.boolean("unsubscribe_mailto", d.unsubscribe_mailto),
    )


def _parse_web(t: _Table) -> WebConfig:
    d = WebConfig()
    listen = t.string("listen", d.listen)
    problem = endpoint_problem(listen)
    if problem is not None:
        raise t.error("listen", problem)
    base_url = t.string("base_url", d.base_url)
    parts, problem = split_url(base_url, ("http", "https"))
    if problem is None and (parts.query or base_url.endswith("?")):
        problem = f"invalid URL {base_url!r}: must not have a query"
    if problem is None and (parts.fragment or base_url.endswith("#")):
        problem = f"invalid URL {base_url!r}: must not have a fragment"
    if problem is not None:
        raise t.error("base_url", problem)
    return WebConfig(
        listen=listen,
        base_url=base_url.rstrip("/"),
        max_connections=t.count("max_connections", d.max_connections),
        idle_timeout=t.duration("idle_timeout", d.idle_timeout),
        trusted_proxies=tuple(
            _parse_network(t, k, v) for k, v in t.array("trusted_proxies", str) or ()
        ),
    )


def _parse_delivery(t: _Table, smtp: SmtpConfig) -> DeliveryConfig:
    d = DeliveryConfig()
    processes = _parse_processes(t, d.processes)
    schedule_raw = t.array("retry_schedule", str)
    if schedule_raw is None:
        schedule = d.retry_schedule
    elif not schedule_raw:
        raise t.error("retry_schedule", "must not be empty")
    else:
        schedule = tuple(_positive_duration(t, k, v) for k, v in schedule_raw)
    tls = cast(DeliveryTls, t.choice("tls", ("opportunistic", "required"), d.tls))
    return DeliveryConfig(
        max_connections=t.count("max_connections", d.max_connections),
        retry_schedule=schedule,
        max_age=t.duration("max_age", d.max_age),
        connect_timeout=t.duration("connect_timeout", d.connect_timeout),
        tls=tls,
        mta_sts=t.boolean("mta_sts", d.mta_sts),
        processes=processes,
        spare_processes=_parse_spare_processes(t, d.spare_processes, processes, smtp),
        nice=t.integer_in("nice", d.nice, 0, 19),
        routes=_parse_routes(t),
        throttles=_parse_throttles(t),
        pools=_parse_pools(t),
        sandbox_route=_parse_sandbox_route(t),
    )


def _parse_sandbox_route(t: _Table) -> str | None:
    """``sandbox_route``: an ``smtp://host:port`` next hop (a catcher such as Mailpit), where
    the copies go re-wrapped, as to any receiving server."""
    if t.get("sandbox_route") is _MISSING:
        return None
    target = t.string("sandbox_route", "", empty=False)
    problem = route_target_problem(target)
    if problem is None and urlsplit(target).scheme.lower() != "smtp":
        problem = f"must be an smtp://host:port URL (a local catcher), not {redact_url(target)!r}"
    if problem is not None:
        raise t.error("sandbox_route", problem)
    return target


MAX_DELIVERY_PROCESSES = 64
MAX_LISTENER_PROCESSES = 64


def auto_delivery_processes(cpus: int) -> int:
    """``processes = "auto"``: one delivery process per core this process may run on, less
    the one the listener (and the database server, on one box) need, and at least one
    (docs/delivery.md, "Which setting")."""
    return max(1, min(MAX_DELIVERY_PROCESSES, cpus - 1))


def _parse_processes(t: _Table, default: int) -> int:
    value = t.get("processes")
    if value == "auto":
        return auto_delivery_processes(len(os.sched_getaffinity(0)))
    if isinstance(value, str):
        raise t.error("processes", f'expected an integer or "auto", got {_describe(value)}')
    return t.integer_in("processes", default, 0, MAX_DELIVERY_PROCESSES)


def _parse_spare_processes(t: _Table, default: int, processes: int, smtp: SmtpConfig) -> int:
    """``spare_processes``: "auto" is 1 where it can work (delivery processes, and the main
    process accepting: it alone hears the listener's clients), else 0."""
    value = t.get("spare_processes")
    workable = processes > 0 and smtp.processes == 0
    if value == "auto":
        return 1 if workable else 0
    if isinstance(value, str):
        raise t.error("spare_processes", f'expected an integer or "auto", got {_describe(value)}')
    spare = t.integer_in("spare_processes", default, 0, MAX_DELIVERY_PROCESSES)
    if spare and processes == 0:
        raise t.error("spare_processes", 'needs processes of 1 or more (or "auto")')
    if spare and smtp.processes:
        raise t.error("spare_processes", "needs [smtp] processes = 0 (the main process accepting)")
    return spare


def _parse_routes(delivery: _Table) -> tuple[Route, ...]:
    if delivery.get("routes") is _MISSING:
        return default_routes()
    t = delivery.table("routes", None)
    routes: list[Route] = []
    seen: dict[str, str] = {}
    for name, value in t.data.items():
        if isinstance(value, Mapping):
            raise t.error(
                name,
                "expected a string, got a table (quote domain names that contain dots,"
                ' e.g. "example.test" = "mx")',
            )
        target = t.string(name, "")
        if name == "*":
            domain = "*"
        elif is_domain(name):
            domain = name.lower()
        else:
            raise t.error(name, f"invalid route domain {name!r} (use '*' or a domain)")
        if domain in seen:
            raise t.error(name, f"duplicate route for {domain!r} (also {seen[domain]})")
        seen[domain] = t.key_of(name)
        if target.lower() == "mx":
            target = "mx"
        else:
            problem = route_target_problem(target)
            if problem is not None:
                raise t.error(name, problem)
        routes.append(Route(domain=domain, target=target))
    if "*" not in seen:
        routes.extend(default_routes())
    return tuple(routes)


def _parse_throttles(delivery: _Table) -> tuple[Throttle, ...]:
    entries = delivery.table_array("throttle", _THROTTLE_KEYS)
    if entries is None:
        return default_throttles()
    d = Throttle()
    throttles: list[Throttle] = []
    seen: dict[str, str] = {}
    for t in entries:
        match = t.string("match", d.match).lower()
        if match != "*" and not (
            is_domain(match) or (match.startswith("mx:") and is_domain(match[3:].removeprefix(".")))
        ):
            raise t.error(
                "match",
                f"invalid match {match!r} (use '*', a domain, or 'mx:' and a host suffix"
                " like 'mx:.google.com')",
            )
        if match in seen:
            raise t.error("match", f"duplicate match {match!r} (also in {seen[match]})")
        seen[match] = t.key
        rate = t.rate("max_rate", d.max_rate_per_second)
        throttles.append(
            Throttle(
                match=match,
                max_connections=t.count("max_connections", d.max_connections),
                max_messages_per_connection=t.count(
                    "max_messages_per_connection", d.max_messages_per_connection
                ),
                max_rate_per_second=rate,
                adaptive=t.boolean("adaptive", d.adaptive),
            )
        )
    if "*" not in seen:
        throttles.extend(default_throttles())
    return tuple(throttles)


def _parse_pools(delivery: _Table) -> tuple[Pool, ...]:
    """``[[delivery.pools]]`` (docs/configuration.md): unique names, at least one source
    address (IPv4 or IPv6, each once in all pools) with a HELO name, and at least one of
    ``senders``/``tags``/``credentials``. Whether an address can be bound is checked at
    start-up (:func:`smartrelay.delivery.pools.check_source_addresses`)."""
    pools: list[Pool] = []
    names: dict[str, str] = {}
    addresses: dict[str, str] = {}
    for t in delivery.table_array("pools", _POOL_KEYS) or ():
        name = t.required_string("name")
        if not name or not name.isprintable() or len(name) > 100 or name != name.strip():
            raise t.error("name", f"invalid pool name {name!r} (1 to 100 printable characters)")
        if name in names:
            raise t.error("name", f"duplicate pool name {name!r} (also {names[name]})")
        names[name] = t.key
        sources: list[SourceAddress] = []
        entries = t.table_array("source_addresses", ("address", "helo"))
        if not entries:
            raise t.error("source_addresses", "at least one { address = ..., helo = ... }")
        for entry in entries:
            text = entry.required_string("address")
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                raise entry.error(
                    "address", f"invalid IP address {text!r} (an IPv4 or IPv6 address)"
                ) from None
            if ip.is_unspecified or ip.is_multicast:
                raise entry.error("address", f"{text!r} cannot be a source address")
            address = str(ip)
            if address in addresses:
                raise entry.error(
                    "address", f"duplicate source address {address!r} (also {addresses[address]})"
                )
            addresses[address] = entry.key
            helo = entry.required_string("helo").lower().removesuffix(".")
            if not is_domain(helo) or "." not in helo:
                raise entry.error(
                    "helo", f"invalid HELO name {helo!r} (a fully qualified host name)"
                )
            sources.append(SourceAddress(address=address, helo=helo))
        senders: list[str] = []
        for key, sender in t.array("senders", str) or ():
            domain = sender.lower().removeprefix("@").removesuffix(".")
            if not is_domain(domain):
                raise t.error_at(key, f"invalid sender domain {sender!r}")
            senders.append(domain)
        tags = tuple(_pool_names(t, "tags", "tag"))
        credentials = tuple(_pool_names(t, "credentials", "credential name"))
        if not (senders or tags or credentials):
            raise t.error_at(
                t.key, f"pool {name!r} matches no mail: give senders, tags or credentials"
            )
        selection = cast(PoolSelection, t.choice("selection", ("hash", "round-robin"), "hash"))
        pools.append(
            Pool(
                name=name,
                source_addresses=tuple(sources),
                senders=tuple(senders),
                tags=tags,
                credentials=credentials,
                selection=selection,
            )
        )
    return tuple(pools)


def _pool_names(t: _Table, name: str, what: str) -> list[str]:
    values: list[str] = []
    for key, value in t.array(name, str) or ():
        if not value or not value.isprintable() or len(value) > 100:
            raise t.error_at(key, f"invalid {what} {value!r} (1 to 100 printable characters)")
        values.append(value)
    return values


def _parse_dkim(dkim: _Table) -> tuple[DkimKey, ...]:
    entries = dkim.table_array("keys", ("domain", "selector", "private_key", "algorithm"))
    keys: list[DkimKey] = []
    seen: dict[tuple[str, str], str] = {}
    for t in entries or ():
        domain = t.required_string("domain")
        if not is_domain(domain):
            raise t.error("domain", f"invalid domain {domain!r}")
        selector = t.required_string("selector")
        if not is_domain(selector):
            raise t.error("selector", f"invalid selector {selector!r} (letters, digits, '-', '.')")
        ident = (domain.lower(), selector.lower())
        if ident in seen:
            raise t.error(
                "selector",
                f"duplicate key for selector {selector!r} of {domain!r} (also {seen[ident]})",
            )
        seen[ident] = t.key
        private_key = t.required_string("private_key")
        t.check_file("private_key", private_key)
        algorithm = t.choice("algorithm", ("rsa-sha256", "ed25519-sha256"), "rsa-sha256")
        keys.append(
            DkimKey(
                domain=domain.lower(),
                selector=selector,
                private_key=private_key,
                algorithm=cast(DkimAlgorithm, algorithm),
            )
        )
    return tuple(keys)


def _parse_feedback(feedback: _Table) -> tuple[FeedbackMailbox, ...]:
    entries = feedback.table_array(
        "mailboxes", ("url", "interval", "delete_after_processing", "ca_file")
    )
    d_interval = 60.0
    mailboxes: list[FeedbackMailbox] = []
    for t in entries or ():
        url = t.required_string("url")
        _parts, problem = split_url(url, tuple(MAILBOX_DEFAULT_PORTS))
        if problem is not None:
            raise t.error("url", problem)
        ca_file = t.string("ca_file", "")
        if ca_file:
            t.check_file("ca_file", ca_file)
        mailboxes.append(
            FeedbackMailbox(
                url=url,
                interval=t.duration("interval", d_interval),
                delete_after_processing=t.boolean("delete_after_processing", True),
                ca_file=ca_file,
            )
        )
    return tuple(mailboxes)


def _parse_suppression(t: _Table) -> SuppressionConfig:
    d = SuppressionConfig()
    hard_bounce = t.duration_or_forever("hard_bounce", d.hard_bounce)
    soft = t.table("soft_bounce", ("count", "within", "suppress_for"))
    ds = d.soft_bounce
    soft_bounce = SoftBouncePolicy(
        count=soft.count("count", ds.count),
        within=soft.duration("within", ds.within),
        suppress_for=soft.duration_or_forever("suppress_for", ds.suppress_for),
    )
    return SuppressionConfig(
        hard_bounce=hard_bounce,
        soft_bounce=soft_bounce,
        complaint=t.duration_or_forever("complaint", d.complaint),
        unsubscribe=t.duration_or_forever("unsubscribe", d.unsubscribe),
    )


def _parse_retention(t: _Table) -> RetentionConfig:
    d = RetentionConfig()
    return RetentionConfig(
        message_bodies=t.duration("message_bodies", d.message_bodies),
        events=t.duration("events", d.events),
        feedback_reports=t.duration("feedback_reports", d.feedback_reports),
    )


def _parse_webhooks(root: _Table) -> tuple[Webhook, ...]:
    entries = root.table_array(
        "webhooks",
        ("url", "events", "secret", "batch_size", "batch_wait", "timeout", "retry_for"),
    )
    webhooks: list[Webhook] = []
    seen: set[str] = set()
    for t in entries or ():
        url = t.required_string("url")
        _parts, problem = split_url(url, ("http", "https"))
        if problem is None and url in seen:
            problem = "the same url twice: an endpoint's progress is kept per url"
        if problem is not None:
            raise t.error("url", problem)
        seen.add(url)
        events_raw = t.array("events", str)
        if events_raw is None:
            events = EVENT_TYPES
        elif not events_raw:
            raise t.error("events", "must list at least one event type (or leave it out for all)")
        else:
            for key, event in events_raw:
                if event not in EVENT_TYPES:
                    raise t.error_at(
                        key,
                        f"unknown event type {event!r} (expected one of: {', '.join(EVENT_TYPES)})",
                    )
            events = tuple(dict.fromkeys(event for _key, event in events_raw))
        secret = t.required_string("secret")
        if not secret:
            raise t.error("secret", "must not be empty")
        d = Webhook(url=url)
        webhooks.append(
            Webhook(
                url=url,
                events=events,
                secret=secret,
                batch_size=t.integer_in("batch_size", d.batch_size, 1, 1000),
                batch_wait=t.duration("batch_wait", d.batch_wait),
                timeout=t.duration("timeout", d.timeout),
                retry_for=t.duration("retry_for", d.retry_for),
            )
        )
    return tuple(webhooks)


def _parse_api(t: _Table) -> ApiConfig:
    d = ApiConfig()
    networks_raw = t.array("metrics_networks", str)
    networks = (
        d.metrics_networks
        if networks_raw is None
        else tuple(_parse_network(t, k, v) for k, v in networks_raw)
    )
    return ApiConfig(metrics=t.boolean("metrics", d.metrics), metrics_networks=networks)


def _parse_listen_array(t: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    items = t.array(name, str)
    if items is None:
        return default
    for key, description in items:
        problem = endpoint_problem(description)
        if problem is not None:
            raise t.error_at(key, problem)
    return tuple(description for _key, description in items)


def _positive_duration(t: _Table, key: str, value: str) -> float:
    try:
        seconds = units.parse_duration(value)
    except ValueError as e:
        raise t.error_at(key, str(e)) from e
    if seconds <= 0:
        raise t.error_at(key, f"invalid duration {value!r}: must be more than zero")
    return seconds


# --------------------------------------------------------------------------------------
#: Longest accepted ``[[feedback.rules]]`` ``match`` pattern, in characters.
MAX_RULE_PATTERN = 1000
_RULE_KEYS = ("match", "status", "domain", "category", "hard")
_STATUS_PREFIX = re.compile(r"[245](?:\.\d{1,3}(?:\.\d{1,3})?)?")


def _parse_feedback_rules(feedback: _Table) -> tuple[FeedbackRule, ...]:
    rules: list[FeedbackRule] = []
    for t in feedback.table_array("rules", _RULE_KEYS) or ():
        source = t.required_string("match")
        if not source:
            raise t.error("match", "must not be empty (it would match every diagnostic)")
        if len(source) > MAX_RULE_PATTERN:
            raise t.error(
                "match", f"regex too long ({len(source)} characters, at most {MAX_RULE_PATTERN})"
            )
        try:
            pattern = re.compile(source)
        except (re.error, RecursionError, OverflowError, ValueError) as e:
            raise t.error("match", f"invalid regex {source!r}: {e}") from e
        status = t.string("status", "").strip()
        if status and not _STATUS_PREFIX.fullmatch(status):
            raise t.error(
                "status",
                f'invalid status prefix {status!r} (expected e.g. "5", "5.2" or "5.2.1")',
            )
        domain = t.string("domain", "").strip().lower().rstrip(".")
        if domain and not is_domain(domain):
            raise t.error("domain", f"invalid domain {domain!r}")
        if t.get("category") is _MISSING:
            raise t.error("category", "required key is missing")
        category = t.choice("category", BOUNCE_CATEGORIES, "")
        rules.append(
            FeedbackRule(
                match=pattern,
                category=category,
                hard=t.boolean("hard", category in HARD_CATEGORIES),
                status=status,
                domain=domain,
            )
        )
    return tuple(rules)


# Reading TOML tables with precise key paths


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join_key(parent: str, name: str) -> str:
    quoted = name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)
    return f"{parent}.{quoted}" if parent else quoted


def _describe(value: object) -> str:
    """A TOML-ish description of a value for 'expected X, got Y' messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"string {shown!r}"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, datetime.date | datetime.time):
        return f"date/time {value.isoformat()}"
    return f"a {type(value).__name__}"


class _Table:
    """One TOML table being read: checks unknown keys and knows its own key path."""

    def __init__(
        self, path: str, key: str, data: Mapping[str, Any], allowed: Collection[str] | None
    ) -> None:
        self.path = path
        self.key = key
        self.data = data
        if allowed is not None:
            for name in data:
                if name not in allowed:
                    problem = "unknown key"
                    close = difflib.get_close_matches(name, list(allowed), n=1)
                    if close:
                        problem += f" (did you mean {close[0]!r}?)"
                    raise self.error(name, problem)

    # -- key paths and errors

    def key_of(self, name: str) -> str:
        return _join_key(self.key, name)

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key_of(name), problem)

    def error_at(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    # -- raw access

    def get(self, name: str) -> Any:
        return self.data.get(name, _MISSING)

    def _typed(self, name: str, kind: type[Any], what: str) -> Any:
        value = self.get(name)
        if value is _MISSING:
            return value
        if not _is_kind(value, kind):
            raise self.error(name, f"expected {what}, got {_describe(value)}")
        return value

    # -- scalars

    def string(self, name: str, default: str, *, empty: bool = True) -> str:
        value = self._typed(name, str, "a string")
        if value is _MISSING:
            return default
        if not empty and not value:
            raise self.error(name, "must not be empty")
        return cast(str, value)

    def required_string(self, name: str) -> str:
        if self.get(name) is _MISSING:
            raise self.error(name, "required key is missing")
        return self.string(name, "")

    def boolean(self, name: str, default: bool) -> bool:
        value = self._typed(name, bool, "a boolean (true or false)")
        return default if value is _MISSING else cast(bool, value)

    def count(self, name: str, default: int) -> int:
        """A positive integer."""
        value = self._typed(name, int, "a positive integer")
        if value is _MISSING:
            return default
        if value <= 0:
            raise self.error(name, f"expected a positive integer, got {value}")
        return cast(int, value)

    def integer_in(self, name: str, default: int, low: int, high: int) -> int:
        """An integer from ``low`` to ``high``."""
        value = self._typed(name, int, "an integer")
        if value is _MISSING:
            return default
        if not low <= value <= high:
            raise self.error(name, f"expected an integer from {low} to {high}, got {value}")
        return cast(int, value)

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.string(name, default)
        if value not in options:
            wanted = " or ".join(repr(o) for o in options)
            raise self.error(name, f"invalid value {value!r} (expected {wanted})")
        return value

    def duration(self, name: str, default: float) -> float:
        """A positive duration string, in seconds."""
        value = self.get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            if _is_kind(value, int) or _is_kind(value, float):
                raise self.error(
                    name, f"invalid duration {value!r}: add a unit ({units.DURATION_HINT})"
                )
            raise self.error(name, f"expected a duration string, got {_describe(value)}")
        return _positive_duration(self, self.key_of(name), value)

    def duration_or_forever(self, name: str, default: float | None) -> float | None:
        """A positive duration in seconds, or None for "forever"."""
        value = self.get(name)
        if value is _MISSING:
            return default
        if value == "forever":
            return None
        if isinstance(value, str):
            try:
                units.parse_duration(value)
            except ValueError as e:
                raise self.error(
                    name, f'invalid duration {value!r} (use "forever" or e.g. "30d", "12h")'
                ) from e
        return self.duration(name, 0.0)

    def size(self, name: str, default: int) -> int:
        """A positive size: int bytes or a string like "25MB"."""
        value = self.get(name)
        if value is _MISSING:
            return default
        if not (isinstance(value, str) or _is_kind(value, int)):
            raise self.error(name, f"expected a size, got {_describe(value)} ({units.SIZE_HINT})")
        try:
            size = units.parse_size(value)
        except ValueError as e:
            raise self.error(name, str(e)) from e
        if size <= 0:
            raise self.error(name, f"invalid size {value!r}: must be more than zero")
        return size

    def rate(self, name: str, default: float) -> float:
        """A positive rate string like "1000/min", per second."""
        value = self.get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"invalid rate {value!r} ({units.RATE_HINT})")
        try:
            rate = units.parse_rate(value)
        except ValueError as e:
            raise self.error(name, str(e)) from e
        if rate <= 0:
            raise self.error(name, f"invalid rate {value!r}: must be more than zero")
        return rate

    def check_file(self, name: str, file: str) -> None:
        if not os.path.exists(file):
            raise self.error(name, f"file not found: {file!r}")
        if not os.path.isfile(file):
            raise self.error(name, f"not a regular file: {file!r}")
        if not os.access(file, os.R_OK):
            raise self.error(name, f"file not readable: {file!r}")

    # -- containers

    def array(self, name: str, kind: type[Any]) -> list[tuple[str, Any]] | None:
        """An array whose items are all of ``kind``: [(item key, item)], or None if missing."""
        value = self.get(name)
        if value is _MISSING:
            return None
        one, many = {str: ("a string", "strings"), int: ("an integer", "integers")}.get(
            kind, (kind.__name__, kind.__name__)
        )
        if not isinstance(value, list | tuple):
            raise self.error(name, f"expected an array of {many}, got {_describe(value)}")
        items: list[tuple[str, Any]] = []
        for i, item in enumerate(value):
            key = f"{self.key_of(name)}[{i}]"
            if not _is_kind(item, kind):
                raise self.error_at(key, f"expected {one}, got {_describe(item)}")
            items.append((key, item))
        return items

    def table(self, name: str, allowed: Collection[str] | None) -> _Table:
        """A sub-table (empty if missing). ``allowed=None`` allows any key."""
        value = self.get(name)
        if value is _MISSING:
            value = {}
        elif not isinstance(value, Mapping):
            raise self.error(name, f"expected a table, got {_describe(value)}")
        return _Table(self.path, self.key_of(name), value, allowed)

    def table_array(self, name: str, allowed: Collection[str]) -> list[_Table] | None:
        """An array of tables (``[[name]]``), or None if missing."""
        value = self.get(name)
        if value is _MISSING:
            return None
        if not isinstance(value, list | tuple):
            raise self.error(
                name,
                f"expected an array of tables (write [[{self.key_of(name)}]]),"
                f" got {_describe(value)}",
            )
        tables: list[_Table] = []
        for i, item in enumerate(value):
            key = f"{self.key_of(name)}[{i}]"
            if not isinstance(item, Mapping):
                raise self.error_at(key, f"expected a table, got {_describe(item)}")
            tables.append(_Table(self.path, key, item, allowed))
        return tables


def _is_kind(value: object, kind: type[Any]) -> bool:
    # bool is a subclass of int: ``max_connections = true`` must not pass as an integer.
    if kind is not bool and isinstance(value, bool):
        return False
    return isinstance(value, kind)


# --------------------------------------------------------------------------------------
# Value checks
