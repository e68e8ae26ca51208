"""The SmartRelay config file: TOML, parsed once at start-up into frozen attrs classes.

The file format is the contract of SPEC section 2 and is documented for users in
docs/configuration.md. Every section and key is optional; the defaults are the class
defaults below. Anything wrong raises :class:`ConfigError`, whose ``str()`` is a single
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
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, cast
from urllib.parse import SplitResult, unquote, urlsplit

from attrs import field, frozen
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor

from smartrelay import units
from smartrelay.events import EVENT_TYPES  # webhooks' [webhook] events

__all__ = [
    "EVENT_TYPES",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DeliveryConfig",
    "DkimKey",
    "FeedbackMailbox",
    "InboundConfig",
    "RewrapConfig",
    "Route",
    "ServerConfig",
    "SmtpConfig",
    "SoftBouncePolicy",
    "SuppressionConfig",
    "Throttle",
    "WebConfig",
    "Webhook",
    "load_config",
    "parse_config",
    "refuse_unimplemented",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DatabaseEngine = Literal["sqlite", "postgresql"]
DeliveryTls = Literal["opportunistic", "required"]
DkimAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]


_ROUTE_DEFAULT_PORTS: dict[str, int] = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}
_MAILBOX_DEFAULT_PORTS: dict[str, int] = {"imap": 143, "imaps": 993, "pop3": 110, "pop3s": 995}


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


# --------------------------------------------------------------------------------------
# The config classes. Defaults are those of SPEC section 2.


@frozen
class ServerConfig:
    #: Banner, HELO/EHLO name, Message-ID domain.
    hostname: str = "relay.example.com"
    #: Keys, generated dev certificate, SQLite file (relative to the working directory).
    data_dir: str = "var"


@frozen
class DatabaseConfig:
    #: ``sqlite:PATH``, ``sqlite:///ABSOLUTE/PATH``, ``sqlite::memory:`` or
    #: ``postgresql://user:pass@host:port/dbname`` (also ``postgres://``).
    url: str = "sqlite:var/smartrelay.db"

    @property
    def engine(self) -> DatabaseEngine:
        return "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    @property
    def sqlite_path(self) -> str:
        """The SQLite file as written (relative to the working directory) or ``:memory:``.

        Raises ValueError for a PostgreSQL URL.
        """
        if self.engine != "sqlite":
            raise ValueError(f"not a SQLite database URL: {self.redacted_url}")
        rest = self.url[len("sqlite:") :]
        if rest.startswith("//"):
            # URL form: sqlite:///abs/path (empty authority).
            rest = rest[2:]
        return rest

    @property
    def redacted_url(self) -> str:
        """The URL with any password replaced by ``***``, for logs."""
        return _redact_url(self.url)


@frozen
class SmtpConfig:
    """The submission listener: applications send here."""

    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    #: PEM files; both empty means a self-signed certificate generated in data_dir.
    tls_certificate: str = ""
    tls_key: str = ""
    require_tls: bool = False
    require_auth: bool = False
    allowed_networks: tuple[IPNetwork, ...] = (
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
    )
    max_connections: int = 200
    max_connections_per_client: int = 50
    #: Bytes.
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    #: Seconds without a command before 421 and close, in any state (TLS included).
    idle_timeout: float = 300.0
    #: Seconds for a STARTTLS or implicit-TLS handshake to complete; then the connection is cut.
    tls_handshake_timeout: float = 30.0
    #: Seconds for the whole DATA phase of one message.
    data_timeout: float = 600.0


@frozen
class InboundConfig:
    """The MX for the return-path domain: bounces and FBL reports arrive here."""

    listen: tuple[str, ...] = ("tcp:2526:interface=127.0.0.1",)
    #: Lower-cased.
    return_path_domain: str = "bounces.example.com"


@frozen
class RewrapConfig:
    secret_file: str = "var/secret.key"
    track_opens: bool = True
    track_clicks: bool = True
    list_unsubscribe: bool = True
    unsubscribe_mailto: bool = True


@frozen
class WebConfig:
    listen: str = "tcp:8080:interface=127.0.0.1"
    #: http(s) URL without a trailing slash, query or fragment.
    base_url: str = "http://127.0.0.1:8080"
    #: Open HTTP connections at most; past it new ones are closed at once (addition to SPEC).
    max_connections: int = 500
    #: Seconds without a byte from the client before its connection is closed (addition).
    idle_timeout: float = 60.0


@frozen
class Route:
    """One ``[delivery.routes]`` entry: ``domain`` (``*`` or a lower-cased domain) to a target.

    ``target`` is ``mx`` or ``smtp://``, ``smtp+starttls://``, ``smtps://`` with optional
    ``user:pass@`` and ``:port`` (default ports 25, 587, 465).
    """

    domain: str
    target: str

    @property
    def is_mx(self) -> bool:
        return self.target == "mx"

    @property
    def scheme(self) -> str:
        """``mx``, ``smtp``, ``smtp+starttls`` or ``smtps``."""
        return "mx" if self.is_mx else urlsplit(self.target).scheme.lower()

    @property
    def host(self) -> str:
        """The smarthost (empty for ``mx``)."""
        return "" if self.is_mx else urlsplit(self.target).hostname or ""

    @property
    def port(self) -> int:
        """The smarthost port, defaulted per scheme (0 for ``mx``)."""
        if self.is_mx:
            return 0
        parts = urlsplit(self.target)
        return parts.port or _ROUTE_DEFAULT_PORTS[parts.scheme.lower()]

    @property
    def username(self) -> str | None:
        """Percent-decoded AUTH user name, or None."""
        user = None if self.is_mx else urlsplit(self.target).username
        return None if user is None else unquote(user)

    @property
    def password(self) -> str | None:
        """Percent-decoded AUTH password, or None."""
        password = None if self.is_mx else urlsplit(self.target).password
        return None if password is None else unquote(password)

    @property
    def redacted_target(self) -> str:
        return _redact_url(self.target)

    def __repr__(self) -> str:  # never show a smarthost password in logs or tracebacks
        return f"Route(domain={self.domain!r}, target={self.redacted_target!r})"


@frozen
class Throttle:
    """One ``[[delivery.throttle]]`` entry.

    ``match`` is ``*``, a recipient domain, or ``mx:`` followed by an MX host suffix
    (``mx:.google.com``); lower-cased.
    """

    match: str = "*"
    max_connections: int = 20
    max_messages_per_connection: int = 100
    #: Messages per second (``"1000/min"`` is 16.67).
    max_rate_per_second: float = 1000 / 60


def _default_routes() -> tuple[Route, ...]:
    return (Route("*", "mx"),)


def _default_throttles() -> tuple[Throttle, ...]:
    return (Throttle(),)


@frozen
class DeliveryConfig:
    max_connections: int = 200
    #: Seconds between attempts; after the last step, retry every last step.
    retry_schedule: tuple[float, ...] = (
        60.0,
        300.0,
        900.0,
        1800.0,
        3600.0,
        7200.0,
        14400.0,
        28800.0,
    )
    #: Seconds; then bounce with category "expired".
    max_age: float = 5 * 86400.0
    connect_timeout: float = 30.0
    tls: DeliveryTls = "opportunistic"
    #: Separate delivery processes (0: the main process delivers). Re-wrapping and delivery
    #: then run on other cores than the listener; they share the database.
    processes: int = 0
    #: In file order; always contains a ``*`` route (``mx`` unless configured).
    routes: tuple[Route, ...] = field(factory=_default_routes)
    #: In file order; always contains a ``*`` throttle (the defaults unless configured).
    throttles: tuple[Throttle, ...] = field(factory=_default_throttles)


@frozen
class DkimKey:
    #: Signs mail whose From domain is this domain or a subdomain; lower-cased.
    domain: str
    selector: str
    #: PEM file path as written.
    private_key: str
    algorithm: DkimAlgorithm = "rsa-sha256"


@frozen
class FeedbackMailbox:
    """A POP3/IMAP mailbox holding bounces, FBL reports, replies."""

    #: ``imap``, ``imaps``, ``pop3`` or ``pop3s`` URL with a host.
    url: str
    #: Seconds between polls.
    interval: float = 60.0
    delete_after_processing: bool = True

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """The port, defaulted per scheme (143, 993, 110, 995)."""
        parts = urlsplit(self.url)
        return parts.port or _MAILBOX_DEFAULT_PORTS[parts.scheme.lower()]

    @property
    def username(self) -> str | None:
        user = urlsplit(self.url).username
        return None if user is None else unquote(user)

    @property
    def password(self) -> str | None:
        password = urlsplit(self.url).password
        return None if password is None else unquote(password)

    @property
    def mailbox(self) -> str:
        """The IMAP folder from the URL path (``INBOX`` if none); meaningless for POP3."""
        return unquote(urlsplit(self.url).path.strip("/")) or "INBOX"

    @property
    def redacted_url(self) -> str:
        return _redact_url(self.url)


@frozen
class SoftBouncePolicy:
    """Suppress after ``count`` soft bounces within ``within`` seconds, for ``suppress_for``."""

    count: int = 3
    within: float = 7 * 86400.0
    #: Seconds, or None for forever.
    suppress_for: float | None = 30 * 86400.0


@frozen
class SuppressionConfig:
    """How long each kind of suppression lasts: seconds, or None for ``"forever"``."""

    hard_bounce: float | None = None
    soft_bounce: SoftBouncePolicy = field(factory=SoftBouncePolicy)
    complaint: float | None = None
    unsubscribe: float | None = None


@frozen
class Webhook:
    url: str
    #: Event types of SPEC section 5 (all of them if not configured).
    events: tuple[str, ...] = EVENT_TYPES
    secret: str = ""


@frozen
class Config:
    #: The config file path as given (``<config>`` for :func:`parse_config` without a path).
    path: str = "<config>"
    server: ServerConfig = field(factory=ServerConfig)
    database: DatabaseConfig = field(factory=DatabaseConfig)
    smtp: SmtpConfig = field(factory=SmtpConfig)
    inbound: InboundConfig = field(factory=InboundConfig)
    rewrap: RewrapConfig = field(factory=RewrapConfig)
    web: WebConfig = field(factory=WebConfig)
    delivery: DeliveryConfig = field(factory=DeliveryConfig)
    dkim_keys: tuple[DkimKey, ...] = ()
    feedback_mailboxes: tuple[FeedbackMailbox, ...] = ()
    suppression: SuppressionConfig = field(factory=SuppressionConfig)
    webhooks: tuple[Webhook, ...] = ()


# --------------------------------------------------------------------------------------
# Entry points


CHECKOUT_CONFIG = "etc/smartrelay.toml"
INSTALLED_CONFIG = "/etc/smartrelay/smartrelay.toml"


def default_config_path() -> str:
    """``etc/smartrelay.toml`` when run from a checkout, else the installed location."""
    return CHECKOUT_CONFIG if os.path.exists(CHECKOUT_CONFIG) else INSTALLED_CONFIG


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``; refuse what is not implemented yet
    (:func:`refuse_unimplemented`). Raises :class:`ConfigError`."""
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
    config = parse_config(data, name)
    refuse_unimplemented(config)
    return config


def refuse_unimplemented(config: Config) -> None:
    """Raise :class:`ConfigError` for a section that parses but whose feature is not built
    yet (``[[webhooks]]``, ``[[feedback.mailboxes]]``): accepting it would promise events
    and bounces that never come. :func:`parse_config` still validates them for later."""
    unimplemented = (
        ("feedback.mailboxes", config.feedback_mailboxes),
        ("webhooks", config.webhooks),
    )
    for key, entries in unimplemented:
        if entries:
            raise ConfigError(
                config.path,
                key,
                f"not implemented yet in this version (remove the [[{key}]] tables)",
            )


def parse_config(data: Mapping[str, Any], path: str = "<config>") -> Config:
    """Validate an already parsed TOML document. Raises :class:`ConfigError`."""
    if not isinstance(data, Mapping):
        raise ConfigError(path, "", f"expected a table, got {_describe(data)}")
    root = _Table(path, "", data, _TOP_LEVEL_KEYS)
    return Config(
        path=path,
        server=_parse_server(root.table("server", ("hostname", "data_dir"))),
        database=_parse_database(root.table("database", ("url",))),
        smtp=_parse_smtp(root.table("smtp", _SMTP_KEYS)),
        inbound=_parse_inbound(root.table("inbound", ("listen", "return_path_domain"))),
        rewrap=_parse_rewrap(root.table("rewrap", _REWRAP_KEYS)),
        web=_parse_web(root.table("web", _WEB_KEYS)),
        delivery=_parse_delivery(root.table("delivery", _DELIVERY_KEYS)),
        dkim_keys=_parse_dkim(root.table("dkim", ("keys",))),
        feedback_mailboxes=_parse_feedback(root.table("feedback", ("mailboxes",))),
        suppression=_parse_suppression(root.table("suppression", _SUPPRESSION_KEYS)),
        webhooks=_parse_webhooks(root),
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
    "webhooks",
)
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
)
_WEB_KEYS = ("listen", "base_url", "max_connections", "idle_timeout")
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
    "processes",
    "routes",
    "throttle",
)
_THROTTLE_KEYS = ("match", "max_connections", "max_messages_per_connection", "max_rate")
_SUPPRESSION_KEYS = ("hard_bounce", "soft_bounce", "complaint", "unsubscribe")


# --------------------------------------------------------------------------------------
# Sections


def _parse_server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    hostname = t.string("hostname", d.hostname)
    if not _is_domain(hostname):
        raise t.error("hostname", f"invalid hostname {hostname!r} (letters, digits, '-' and '.')")
    return ServerConfig(hostname=hostname, data_dir=t.string("data_dir", d.data_dir, empty=False))


def _parse_database(t: _Table) -> DatabaseConfig:
    url = t.string("url", DatabaseConfig().url)
    problem = _database_url_problem(url)
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
    )


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
    if not _is_domain(domain):
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
    problem = _endpoint_problem(listen)
    if problem is not None:
        raise t.error("listen", problem)
    base_url = t.string("base_url", d.base_url)
    parts, problem = _split_url(base_url, ("http", "https"))
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
    )


def _parse_delivery(t: _Table) -> DeliveryConfig:
    d = DeliveryConfig()
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
        processes=t.integer_in("processes", d.processes, 0, MAX_DELIVERY_PROCESSES),
        routes=_parse_routes(t),
        throttles=_parse_throttles(t),
    )


MAX_DELIVERY_PROCESSES = 64


def _parse_routes(delivery: _Table) -> tuple[Route, ...]:
    if delivery.get("routes") is _MISSING:
        return _default_routes()
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
        elif _is_domain(name):
            domain = name.lower()
        else:
            raise t.error(name, f"invalid route domain {name!r} (use '*' or a domain)")
        if domain in seen:
            raise t.error(name, f"duplicate route for {domain!r} (also {seen[domain]})")
        seen[domain] = t.key_of(name)
        if target.lower() == "mx":
            target = "mx"
        else:
            problem = _route_target_problem(target)
            if problem is not None:
                raise t.error(name, problem)
        routes.append(Route(domain=domain, target=target))
    if "*" not in seen:
        routes.extend(_default_routes())
    return tuple(routes)


def _route_target_problem(target: str) -> str | None:
    parts, problem = _split_url(target, tuple(_ROUTE_DEFAULT_PORTS), "route target")
    if problem is not None:
        return (
            f"{problem} (use 'mx' or e.g. 'smtp://host:25', 'smtp+starttls://user:pass@host:587')"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"invalid route target {_redact_url(target)!r}: must not have a path or query"
    if parts.password is not None and not parts.username:
        return f"invalid route target {_redact_url(target)!r}: password without a user name"
    return None


def _parse_throttles(delivery: _Table) -> tuple[Throttle, ...]:
    entries = delivery.table_array("throttle", _THROTTLE_KEYS)
    if entries is None:
        return _default_throttles()
    d = Throttle()
    throttles: list[Throttle] = []
    seen: dict[str, str] = {}
    for t in entries:
        match = t.string("match", d.match).lower()
        if match != "*" and not (
            _is_domain(match)
            or (match.startswith("mx:") and _is_domain(match[3:].removeprefix(".")))
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
            )
        )
    if "*" not in seen:
        throttles.extend(_default_throttles())
    return tuple(throttles)


def _parse_dkim(dkim: _Table) -> tuple[DkimKey, ...]:
    entries = dkim.table_array("keys", ("domain", "selector", "private_key", "algorithm"))
    keys: list[DkimKey] = []
    seen: dict[tuple[str, str], str] = {}
    for t in entries or ():
        domain = t.required_string("domain")
        if not _is_domain(domain):
            raise t.error("domain", f"invalid domain {domain!r}")
        selector = t.required_string("selector")
        if not _is_domain(selector):
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
    entries = feedback.table_array("mailboxes", ("url", "interval", "delete_after_processing"))
    d_interval = 60.0
    mailboxes: list[FeedbackMailbox] = []
    for t in entries or ():
        url = t.required_string("url")
        _parts, problem = _split_url(url, tuple(_MAILBOX_DEFAULT_PORTS))
        if problem is not None:
            raise t.error("url", problem)
        mailboxes.append(
            FeedbackMailbox(
                url=url,
                interval=t.duration("interval", d_interval),
                delete_after_processing=t.boolean("delete_after_processing", True),
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


def _parse_webhooks(root: _Table) -> tuple[Webhook, ...]:
    entries = root.table_array("webhooks", ("url", "events", "secret"))
    webhooks: list[Webhook] = []
    for t in entries or ():
        url = t.required_string("url")
        _parts, problem = _split_url(url, ("http", "https"))
        if problem is not None:
            raise t.error("url", problem)
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
        webhooks.append(Webhook(url=url, events=events, secret=secret))
    return tuple(webhooks)


def _parse_listen_array(t: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    items = t.array(name, str)
    if items is None:
        return default
    for key, description in items:
        problem = _endpoint_problem(description)
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


_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _is_domain(text: str) -> bool:
    """Letters, digits and hyphens in dot-separated labels (no leading/trailing dot)."""
    return len(text) <= 253 and _DOMAIN.fullmatch(text) is not None


def _split_url(
    url: str, schemes: tuple[str, ...], what: str = "URL"
) -> tuple[SplitResult, str | None]:
    """Split ``url`` and check scheme, host and port. Returns (parts, problem or None)."""
    shown = _redact_url(url)
    wanted = ", ".join(f"{s}://" for s in schemes)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        return urlsplit(""), f"invalid {what} {shown!r}: {e}"
    if any(c.isspace() for c in url):
        return parts, f"invalid {what} {shown!r}: contains white space"
    if parts.scheme.lower() not in schemes:
        return parts, f"invalid {what} {shown!r}: scheme must be {wanted}"
    if not parts.hostname:
        return parts, f"invalid {what} {shown!r}: no host"
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return parts, f"invalid {what} {shown!r}: invalid port"
    if parts.netloc.endswith(":"):
        return parts, f"invalid {what} {shown!r}: empty port"
    return parts, None


def _redact_url(url: str) -> str:
    """Replace the password of a URL's user info with ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc_end = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if i != -1:
            netloc_end = min(netloc_end, i)
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostport}{tail}"


def _database_url_problem(url: str) -> str | None:
    hint = "use 'sqlite:PATH' or 'postgresql://user:pass@host:5432/dbname'"
    if url.startswith("sqlite:"):
        rest = url[len("sqlite:") :]
        if rest.startswith("//"):
            if not rest.startswith("///"):
                return (
                    f"invalid SQLite URL {url!r}: a host is not allowed"
                    " (use 'sqlite:relative/path' or 'sqlite:///absolute/path')"
                )
            rest = rest[2:]
        if not rest:
            return f"invalid SQLite URL {url!r}: no file path ({hint})"
        return None
    shown = _redact_url(url)
    scheme = url.partition(":")[0].lower()
    if scheme not in ("postgresql", "postgres") or not url[len(scheme) :].startswith("://"):
        return f"invalid database URL {shown!r} ({hint})"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"invalid database URL {shown!r}: invalid port"
    if not parts.hostname:
        return f"invalid database URL {shown!r}: no host ({hint})"
    if not parts.path.strip("/"):
        return f"invalid database URL {shown!r}: no database name ({hint})"
    return None


def _endpoint_problem(description: str) -> str | None:
    """Check a Twisted server endpoint string by constructing (not listening on) it."""
    if not description.strip():
        return "invalid endpoint '': must not be empty (e.g. 'tcp:2525:interface=127.0.0.1')"
    # serverFromString and MemoryReactor are untyped in Twisted; give them types here.
    parse: Callable[[object, str], object] = endpoints.serverFromString
    dummy_reactor: Callable[[], object] = MemoryReactor
    try:
        endpoint = parse(dummy_reactor(), description)
    except OSError as e:
        # ssl: endpoints read their certificate and key files while parsing.
        reason = f"{e.strerror or e}: {e.filename!r}" if e.filename else str(e)
        return f"invalid endpoint {description!r}: {reason}"
    except Exception as e:
        return f"invalid endpoint {description!r}: {_endpoint_reason(description, e)}"
    problem = _endpoint_address_problem(endpoint)
    if problem is not None:
        return f"invalid endpoint {description!r}: {problem}"
    return None


def _endpoint_reason(description: str, error: Exception) -> str:
    text = str(error)
    match = re.search(r"unexpected keyword argument '(\w+)'", text)
    if match:
        return f"unknown option {match.group(1)!r}"
    match = re.search(r"invalid literal for int\(\) with base 10: ('.*')", text)
    if match:
        return f"not a number: {match.group(1)}"
    if "got multiple values for argument" in text:
        return "too many ':'-separated fields (write a ':' inside a value as '\\:')"
    if isinstance(error, IndexError) and description.startswith("systemd:"):
        return "no such inherited socket (not started by systemd socket activation?)"
    if type(error).__module__.startswith("OpenSSL"):
        return f"cannot load TLS certificate or key: {text}"
    return text or type(error).__name__


def _endpoint_address_problem(endpoint: object) -> str | None:
    """Checks Twisted leaves to listen time: port range, interface address, socket path."""
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"port {port} out of range"
    interface = getattr(endpoint, "_interface", None)
    if isinstance(interface, str) and interface:
        ipv6 = isinstance(endpoint, endpoints.TCP6ServerEndpoint)
        try:
            version = ipaddress.ip_address(interface).version
        except ValueError:
            return f"interface {interface!r} is not an IP address"
        if ipv6 and version != 6:
            return f"interface {interface!r} is not an IPv6 address"
        if not ipv6 and version != 4:
            return f"interface {interface!r} is not an IPv4 address (use tcp6: for IPv6)"
    if isinstance(endpoint, endpoints.UNIXServerEndpoint) and not getattr(endpoint, "_address", ""):
        return "no socket path"
    return None
