"""The config model: one frozen attrs class per section of SPEC section 2.

Defaults are those of SPEC section 2 (and docs/configuration.md). The classes hold parsed,
validated values only; :mod:`smartrelay.config.reader` builds them from the TOML file.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import unquote, urlsplit

from attrs import field, frozen

from smartrelay.config.checks import MAILBOX_DEFAULT_PORTS, ROUTE_DEFAULT_PORTS, redact_url
from smartrelay.events import EVENT_TYPES  # webhooks' [webhook] events

__all__ = [
    "ApiConfig",
    "Config",
    "DatabaseConfig",
    "DatabaseEngine",
    "DeliveryConfig",
    "DeliveryTls",
    "DkimAlgorithm",
    "DkimKey",
    "FeedbackMailbox",
    "FeedbackRule",
    "IPNetwork",
    "InboundConfig",
    "Pool",
    "PoolSelection",
    "RetentionConfig",
    "RewrapConfig",
    "Route",
    "ServerConfig",
    "SmtpConfig",
    "SoftBouncePolicy",
    "SourceAddress",
    "SuppressionConfig",
    "Throttle",
    "WebConfig",
    "Webhook",
    "default_routes",
    "default_throttles",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DatabaseEngine = Literal["sqlite", "postgresql"]
DeliveryTls = Literal["opportunistic", "required"]
DkimAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]


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
        return redact_url(self.url)


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
    #: What a credential's volume alert does (docs/smtp.md, "Volume alerts"): ``warn`` (an
    #: ``alert`` event), ``hold`` (also 451 4.7.1 to its new mail until released), ``off``
    #: (addition: no baseline kept, no alert).
    on_volume_alert: str = "warn"
    #: Additions: the alert fires when a credential's messages in the last
    #: ``volume_alert_window`` exceed ``volume_alert_factor`` times its baseline (messages
    #: per window, exponentially weighted) and at least ``volume_alert_minimum``.
    volume_alert_factor: float = 10.0
    volume_alert_minimum: int = 100
    volume_alert_window: float = 600.0
    #: Addition: accepting processes besides the main one (0: the main process accepts).
    #: They share the listening sockets of ``listen`` (docs/smtp.md, "Accepting processes").
    processes: int = 0


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
    #: Reverse proxies whose ``X-Forwarded-For`` is believed (addition): the reports UI's
    #: login throttle counts failures per client address, not per proxy.
    trusted_proxies: tuple[IPNetwork, ...] = ()


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
        return parts.port or ROUTE_DEFAULT_PORTS[parts.scheme.lower()]

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
        return redact_url(self.target)

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
    #: Cut the limits on rate-limit replies, raise them back step by step (AIMD; the limits
    #: above are the ceiling): smartrelay/delivery/adaptive.py.
    adaptive: bool = False


@frozen
class SourceAddress:
    """One source address of a ``[[delivery.pools]]`` entry and the HELO name said from it."""

    #: An IPv4 or IPv6 address, in its canonical form (``ipaddress``).
    address: str
    helo: str

    @property
    def version(self) -> int:
        """4 or 6."""
        return 6 if ":" in self.address else 4


PoolSelection = Literal["hash", "round-robin"]


@frozen
class Pool:
    """One ``[[delivery.pools]]`` entry (docs/delivery.md, "Source-address pools").

    Mail belongs to the first pool, in file order, whose ``senders`` (envelope sender domain,
    or a parent of it), ``tags`` or ``credentials`` match it.
    """

    name: str
    source_addresses: tuple[SourceAddress, ...]
    #: Sender domains, lower-cased.
    senders: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    credentials: tuple[str, ...] = ()
    #: Which address a connection leaves from: by a hash of the destination (a provider keeps
    #: seeing the same address), or in turn. An addition to SPEC section 2.
    selection: PoolSelection = "hash"


def default_routes() -> tuple[Route, ...]:
    return (Route("*", "mx"),)


def default_throttles() -> tuple[Throttle, ...]:
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
    #: Honour recipient domains' MTA-STS policies (RFC 8461) on ``mx`` routes.
    mta_sts: bool = True
    #: Separate delivery processes (0: the main process delivers). Re-wrapping and delivery
    #: then run on other cores than the listener; they share the database.
    processes: int = 0
    #: Addition: delivery processes besides ``processes`` that claim work only while no SMTP
    #: client of the listener is sending (docs/delivery.md, "Spare delivery processes").
    spare_processes: int = 0
    #: Addition: added to the delivery processes' nice value (0 to 19), so that on a busy
    #: machine the listener, whose clients wait for each reply, gets the CPU first; delivery
    #: takes what is left (docs/delivery.md, "Delivery processes").
    nice: int = 10
    #: In file order; always contains a ``*`` route (``mx`` unless configured).
    routes: tuple[Route, ...] = field(factory=default_routes)
    #: In file order; always contains a ``*`` throttle (the defaults unless configured).
    throttles: tuple[Throttle, ...] = field(factory=default_throttles)
    #: ``[[delivery.pools]]`` in file order (the first that matches a message wins).
    pools: tuple[Pool, ...] = ()
    #: ``smtp://host:port`` where sandbox credentials' mail goes (a local catcher); None:
    #: it is kept in the relay (docs/smtp.md, "Sandbox credentials"; an addition).
    sandbox_route: str | None = None


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
    #: Seconds between polls (for IMAP with IDLE: the longest wait between two looks).
    interval: float = 60.0
    delete_after_processing: bool = True
    #: A PEM file of the CA certificates (or the self-signed certificate) to trust instead of
    #: the system's store for this mailbox's TLS; "" for the system's store.
    ca_file: str = ""

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
        return parts.port or MAILBOX_DEFAULT_PORTS[parts.scheme.lower()]

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
        return redact_url(self.url)


@frozen
class FeedbackRule:
    """An operator's bounce rule (``[[feedback.rules]]``), tried before the built-in tables.

    It applies to a failed recipient whose diagnostic text ``match`` finds (a search, not a
    full match), whose enhanced status starts with ``status`` (component-wise: ``"5.2"``
    matches ``5.2.1``, not ``5.21.0``) and whose address is in ``domain``, when they are set.
    """

    #: The compiled ``match`` regex (Python syntax; ``(?i)`` for case-insensitive).
    match: re.Pattern[str]
    #: A bounce category of SPEC section 5.
    category: str
    hard: bool
    #: Enhanced status prefix (``"5"``, ``"5.2"``, ``"5.2.1"``), "" for any.
    status: str = ""
    #: Recipient domain, lower-cased; "" for any.
    domain: str = ""


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
class RetentionConfig:
    """How long data is kept, in seconds (SPEC section 2, ``[retention]``).

    ``message_bodies`` counts from the moment the message's last recipient reached a final
    state; ``events`` from each event's time (a message's row and its recipients' rows go
    once the message is finished for that long); ``feedback_reports`` from their arrival.
    Suppressions have their own expiry and are never purged by retention.
    """

    message_bodies: float = 7 * 86400.0
    events: float = 90 * 86400.0
    feedback_reports: float = 30 * 86400.0


@frozen
class Webhook:
    url: str
    #: Event types of SPEC section 5 (all of them if not configured).
    events: tuple[str, ...] = EVENT_TYPES
    secret: str = ""
    #: Additions (docs/webhooks.md): events per POST at most; how long a partial batch waits
    #: for more; one POST's time limit; how long a failing batch is retried before it goes
    #: to the dead-letter list.
    batch_size: int = 100
    batch_wait: float = 2.0
    timeout: float = 10.0
    retry_for: float = 86400.0


@frozen
class ApiConfig:
    """``[api]``: the HTTP event export and the metrics, on the ``[web] listen`` listener."""

    #: ``GET /metrics`` (Prometheus text format).
    metrics: bool = True
    #: Addition (docs/metrics.md): clients that may read ``/metrics`` without an API token
    #: (after ``[web] trusted_proxies``); with a token (``Authorization: Bearer``) from anywhere.
    metrics_networks: tuple[IPNetwork, ...] = (
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
    )


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
    #: In file order.
    feedback_rules: tuple[FeedbackRule, ...] = ()
    suppression: SuppressionConfig = field(factory=SuppressionConfig)
    retention: RetentionConfig = field(factory=RetentionConfig)
    webhooks: tuple[Webhook, ...] = ()
    api: ApiConfig = field(factory=ApiConfig)


# --------------------------------------------------------------------------------------
# Entry points
