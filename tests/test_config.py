"""Tests for smartrelay.config (SPEC section 2) and smartrelay.units."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from smartrelay import units
from smartrelay.config import (
    EVENT_TYPES,
    Config,
    ConfigError,
    DatabaseConfig,
    DkimKey,
    FeedbackMailbox,
    RetentionConfig,
    Route,
    SoftBouncePolicy,
    Throttle,
    WebConfig,
    Webhook,
    load_config,
    parse_config,
)
from smartrelay.smtp.tls import ensure_certificate

REPO = Path(__file__).parent.parent


def error_of(data: dict[str, Any], path: str = "etc/x.toml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, path)
    return info.value


def write(tmp_path: Path, text: str, name: str = "smartrelay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def pem(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_text("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n")
    return str(path)


# --------------------------------------------------------------------------------------
# ConfigError


def test_config_error_str_with_key() -> None:
    err = ConfigError("etc/x.toml", "smtp.max_conections", "unknown key")
    assert str(err) == "etc/x.toml: smtp.max_conections: unknown key"
    assert (err.path, err.key, err.problem) == ("etc/x.toml", "smtp.max_conections", "unknown key")


def test_config_error_str_without_key() -> None:
    assert str(ConfigError("etc/x.toml", "", "cannot read file")) == "etc/x.toml: cannot read file"


def test_config_error_str_is_one_line() -> None:
    err = ConfigError("etc/x.toml", "a", "line one\nline two")
    assert "\n" not in str(err)
    assert str(err) == "etc/x.toml: a: line one line two"


# --------------------------------------------------------------------------------------
# Loading files


def test_empty_file_gives_full_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    config = load_config(path)
    assert config == Config(path=str(path))
    assert config.path == str(path)
    assert config.server.hostname == "relay.example.com"
    assert config.server.data_dir == "var"
    assert config.database.url == "sqlite:var/smartrelay.db"
    assert config.database.engine == "sqlite"
    assert config.database.sqlite_path == "var/smartrelay.db"
    smtp = config.smtp
    assert smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert (smtp.tls_certificate, smtp.tls_key) == ("", "")
    assert (smtp.require_tls, smtp.require_auth) == (False, False)
    assert smtp.allowed_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert smtp.max_connections == 200
    assert smtp.max_connections_per_client == 50
    assert smtp.max_message_size == 25 * 1024 * 1024
    assert smtp.max_recipients == 100
    assert config.inbound.listen == ("tcp:2526:interface=127.0.0.1",)
    assert config.inbound.return_path_domain == "bounces.example.com"
    rewrap = config.rewrap
    assert rewrap.secret_file == "var/secret.key"
    assert rewrap.track_opens and rewrap.track_clicks
    assert rewrap.list_unsubscribe and rewrap.unsubscribe_mailto
    assert config.web.listen == "tcp:8080:interface=127.0.0.1"
    assert config.web.base_url == "http://127.0.0.1:8080"
    delivery = config.delivery
    assert delivery.max_connections == 200
    assert delivery.retry_schedule == (60, 300, 900, 1800, 3600, 7200, 14400, 28800)
    assert delivery.max_age == 5 * 86400
    assert delivery.connect_timeout == 30
    assert delivery.tls == "opportunistic"
    assert delivery.processes == 0
    assert delivery.nice == 10
    assert delivery.routes == (Route("*", "mx"),)
    assert delivery.throttles == (Throttle("*", 20, 100, 1000 / 60),)
    assert config.dkim_keys == ()
    assert config.feedback_mailboxes == ()
    assert config.suppression.hard_bounce is None
    assert config.suppression.soft_bounce == SoftBouncePolicy(3, 7 * 86400, 30 * 86400)
    assert config.suppression.complaint is None
    assert config.suppression.unsubscribe is None
    assert config.webhooks == ()


def test_parse_config_empty_dict_equals_defaults() -> None:
    assert parse_config({}) == Config()
    assert parse_config({}).path == "<config>"


def test_empty_sections_give_defaults() -> None:
    data: dict[str, Any] = {
        name: {} for name in ("server", "database", "smtp", "inbound", "rewrap", "web", "delivery")
    }
    data.update(dkim={}, feedback={}, suppression={"soft_bounce": {}})
    assert parse_config(data) == Config()


FULL_EXAMPLE = """
[server]
hostname = "relay.example.com"      # banner, HELO/EHLO name, Message-ID domain
data_dir = "var"

[database]
url = "postgresql://user:pa%40ss@db.example.com:5432/dbname"

[smtp]
listen = ["tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\\\:\\\\:1"]
tls_certificate = "{cert}"
tls_key = "{key}"
require_tls = true
require_auth = true
allowed_networks = ["127.0.0.0/8", "::1/128", "10.1.0.0/16"]
max_connections = 300
max_connections_per_client = 40
max_message_size = "10MB"
max_recipients = 50

[inbound]
listen = ["tcp:2526:interface=127.0.0.1"]
return_path_domain = "Bounces.Example.com"

[rewrap]
secret_file = "var/other.key"
track_opens = false
track_clicks = true
list_unsubscribe = false
unsubscribe_mailto = true

[web]
listen = "tcp:8080:interface=127.0.0.1"
base_url = "https://relay.example.com/"

[delivery]
max_connections = 100
retry_schedule = ["1m", "5m", "15m", "30m", "1h", "2h", "4h", "8h"]
max_age = "5d"
connect_timeout = "30s"
tls = "required"
processes = 2
nice = 0

[delivery.routes]
"*" = "mx"
"example.test" = "smtp://127.0.0.1:2600"
"corp.example" = "smtp+starttls://user:pass@relay.example.net:587"

[[delivery.throttle]]
match = "*"
max_connections = 20
max_messages_per_connection = 100
max_rate = "1000/min"

[[delivery.throttle]]
match = "mx:.google.com"
max_connections = 10
max_messages_per_connection = 50
max_rate = "10/s"

[[dkim.keys]]
domain = "example.com"
selector = "s1"
private_key = "{dkim}"
algorithm = "rsa-sha256"

[[dkim.keys]]
domain = "example.com"
selector = "s2"
private_key = "{dkim}"
algorithm = "ed25519-sha256"

[[feedback.mailboxes]]
url = "imaps://user:pass@imap.example.com:993/INBOX"
interval = "60s"
delete_after_processing = true

[[feedback.mailboxes]]
url = "pop3://bounces@pop.example.com"
interval = "5m"
delete_after_processing = false

[suppression]
hard_bounce = "forever"
soft_bounce = {{ count = 3, within = "7d", suppress_for = "30d" }}
complaint = "forever"
unsubscribe = "365d"

[[webhooks]]
url = "https://crm.example.com/hooks/smartrelay"
events = ["delivered", "bounced", "complained", "opened", "clicked", "unsubscribed"]
secret = "s3cret"

[[webhooks]]
url = "http://127.0.0.1:9000/all"
secret = "other"
"""


def test_full_example(tmp_path: Path) -> None:
    cert = pem(tmp_path, "cert.pem")
    key = pem(tmp_path, "key.pem")
    dkim = pem(tmp_path, "dkim.pem")
    path = write(tmp_path, FULL_EXAMPLE.format(cert=cert, key=key, dkim=dkim))
    # parse_config: load_config refuses [[webhooks]] for now.
    config = parse_config(tomllib.loads(path.read_text(encoding="utf-8")), str(path))

    assert config.path == str(path)
    assert config.database.engine == "postgresql"
    assert config.database.redacted_url == "postgresql://user:***@db.example.com:5432/dbname"
    smtp = config.smtp
    assert smtp.listen == ("tcp:2525:interface=127.0.0.1", "tcp6:2525:interface=\\:\\:1")
    assert (smtp.tls_certificate, smtp.tls_key) == (cert, key)
    assert smtp.require_tls and smtp.require_auth
    assert smtp.allowed_networks[2] == ipaddress.IPv4Network("10.1.0.0/16")
    assert (smtp.max_connections, smtp.max_connections_per_client) == (300, 40)
    assert smtp.max_message_size == 10 * 1024 * 1024
    assert smtp.max_recipients == 50
    assert config.inbound.return_path_domain == "bounces.example.com"
    assert config.rewrap.secret_file == "var/other.key"
    assert not config.rewrap.track_opens
    assert not config.rewrap.list_unsubscribe
    assert config.web.base_url == "https://relay.example.com"

    delivery = config.delivery
    assert delivery.max_connections == 100
    assert delivery.retry_schedule == (60, 300, 900, 1800, 3600, 7200, 14400, 28800)
    assert delivery.tls == "required"
    assert delivery.processes == 2
    assert delivery.nice == 0
    assert delivery.routes == (
        Route("*", "mx"),
        Route("example.test", "smtp://127.0.0.1:2600"),
        Route("corp.example", "smtp+starttls://user:pass@relay.example.net:587"),
    )
    assert delivery.throttles == (
        Throttle("*", 20, 100, 1000 / 60),
        Throttle("mx:.google.com", 10, 50, 10.0),
    )
    assert config.dkim_keys == (
        DkimKey("example.com", "s1", dkim, "rsa-sha256"),
        DkimKey("example.com", "s2", dkim, "ed25519-sha256"),
    )
    assert config.feedback_mailboxes == (
        FeedbackMailbox("imaps://user:pass@imap.example.com:993/INBOX", 60.0, True),
        FeedbackMailbox("pop3://bounces@pop.example.com", 300.0, False),
    )
    assert config.suppression.hard_bounce is None
    assert config.suppression.soft_bounce == SoftBouncePolicy(3, 7 * 86400, 30 * 86400)
    assert config.suppression.complaint is None
    assert config.suppression.unsubscribe == 365 * 86400
    assert config.webhooks == (
        Webhook(
            "https://crm.example.com/hooks/smartrelay",
            ("delivered", "bounced", "complained", "opened", "clicked", "unsubscribed"),
            "s3cret",
        ),
        Webhook("http://127.0.0.1:9000/all", EVENT_TYPES, "other"),
    )


def test_full_example_loads(tmp_path: Path) -> None:
    cert, key, dkim = pem(tmp_path, "c.pem"), pem(tmp_path, "k.pem"), pem(tmp_path, "d.pem")
    path = write(tmp_path, FULL_EXAMPLE.format(cert=cert, key=key, dkim=dkim))
    assert len(load_config(path).webhooks) == 2


def test_feedback_mailboxes_are_accepted(tmp_path: Path) -> None:
    ca = pem(tmp_path, "ca.pem")
    path = write(
        tmp_path,
        "[[feedback.mailboxes]]\n"
        'url = "imaps://u:p%40ss@imap.example.com/Bounces"\n'
        f'ca_file = "{ca}"\n'
        "[[feedback.mailboxes]]\n"
        'url = "pop3s://u:p@pop.example.com"\n'
        'interval = "5m"\n'
        "delete_after_processing = false\n",
    )
    config = load_config(path)
    imap, pop = config.feedback_mailboxes
    assert imap == FeedbackMailbox("imaps://u:p%40ss@imap.example.com/Bounces", 60.0, True, ca)
    assert (imap.password, imap.mailbox, imap.port) == ("p@ss", "Bounces", 993)
    assert pop == FeedbackMailbox("pop3s://u:p@pop.example.com", 300.0, False, "")


@pytest.mark.parametrize(
    ("ca_file", "problem"),
    [
        ("/nonexistent/ca.pem", "file not found: '/nonexistent/ca.pem'"),
        (".", "not a regular file: '.'"),
    ],
)
def test_feedback_mailbox_ca_file_must_be_a_file(ca_file: str, problem: str) -> None:
    err = error_of({"feedback": {"mailboxes": [{"url": "imaps://h", "ca_file": ca_file}]}})
    assert err.key == "feedback.mailboxes[0].ca_file"
    assert err.problem == problem


def test_repo_dev_config_loads() -> None:
    config = load_config(REPO / "etc/smartrelay.toml")
    assert config.server.hostname == "localhost"
    assert config.server.data_dir == "var"
    assert config.database.sqlite_path == "var/smartrelay.db"
    assert config.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.inbound.listen == ("tcp:2526:interface=127.0.0.1",)
    assert config.inbound.return_path_domain == "bounces.localhost"
    assert config.web.listen == "tcp:8080:interface=127.0.0.1"
    assert config.web.base_url == "http://127.0.0.1:8080"
    assert config.delivery.routes == (Route("*", "smtp://127.0.0.1:2600"),)
    assert len(config.delivery.throttles) == 1
    assert config.delivery.processes == 1
    assert config.delivery.spare_processes == 1
    assert config.suppression == Config().suppression
    assert (config.dkim_keys, config.feedback_mailboxes, config.webhooks) == ((), (), ())


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert info.value.key == ""
    assert "cannot read file" in info.value.problem
    assert str(info.value) == f"{path}: cannot read file: No such file or directory"


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[smtp]\nmax_connections = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == ""
    assert err.problem.startswith("invalid TOML: ")
    assert "line 2" in err.problem
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}: invalid TOML: ")


def test_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[smtp]\nmax_connections = 1\nmax_connections = 2\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_bytes(b'[server]\nhostname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == ""
    assert "UTF-8" in info.value.problem


def test_error_from_file_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery]\nmax_age = "5 days"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f'{path}: delivery.max_age: invalid duration \'5 days\' (use e.g. "90s", "15m", "2h", "5d")'
    )


def test_path_like_accepted(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).path == str(tmp_path / "smartrelay.toml")


# --------------------------------------------------------------------------------------
# Bad values: (data, key path, part of the problem)

BAD: list[tuple[dict[str, Any], str, str]] = [
    # unknown keys, everywhere
    ({"smtpp": {}}, "smtpp", "unknown key (did you mean 'smtp'?)"),
    ({"smtp": {"max_conections": 1}}, "smtp.max_conections", "unknown key"),
    ({"server": {"name": "x"}}, "server.name", "unknown key"),
    ({"database": {"dsn": "x"}}, "database.dsn", "unknown key"),
    ({"inbound": {"domain": "x"}}, "inbound.domain", "unknown key"),
    ({"rewrap": {"track": True}}, "rewrap.track", "unknown key"),
    ({"web": {"port": 80}}, "web.port", "unknown key"),
    ({"delivery": {"retries": []}}, "delivery.retries", "unknown key"),
    ({"delivery": {"throttle": [{"match": "*", "rate": "1/s"}]}}, "delivery.throttle[0].rate", ""),
    ({"dkim": {"key": []}}, "dkim.key", "unknown key (did you mean 'keys'?)"),
    ({"dkim": {"keys": [{"domain": "a.b", "x y": 1}]}}, 'dkim.keys[0]."x y"', "unknown key"),
    ({"feedback": {"mailbox": []}}, "feedback.mailbox", "unknown key"),
    (
        {"feedback": {"mailboxes": [{"url": "imap://h", "port": 1}]}},
        "feedback.mailboxes[0].port",
        "",
    ),
    ({"suppression": {"bounce": "1d"}}, "suppression.bounce", "unknown key"),
    ({"suppression": {"soft_bounce": {"max": 3}}}, "suppression.soft_bounce.max", "unknown key"),
    ({"webhooks": [{"url": "https://h", "secret": "s", "x": 1}]}, "webhooks[0].x", "unknown key"),
    # wrong types
    ({"smtp": 5}, "smtp", "expected a table, got integer 5"),
    ({"smtp": {"max_connections": True}}, "smtp.max_connections", "got boolean true"),
    ({"smtp": {"max_connections": "200"}}, "smtp.max_connections", "got string '200'"),
    ({"smtp": {"max_recipients": 1.5}}, "smtp.max_recipients", "got float 1.5"),
    ({"smtp": {"require_tls": "yes"}}, "smtp.require_tls", "expected a boolean"),
    ({"rewrap": {"track_opens": 1}}, "rewrap.track_opens", "expected a boolean"),
    ({"smtp": {"listen": "tcp:2525"}}, "smtp.listen", "expected an array of strings"),
    ({"smtp": {"listen": [2525]}}, "smtp.listen[0]", "expected a string, got integer 2525"),
    ({"server": {"hostname": 5}}, "server.hostname", "expected a string"),
    ({"web": {"listen": ["tcp:80"]}}, "web.listen", "expected a string, got an array"),
    ({"delivery": {"routes": {"*": 5}}}, 'delivery.routes."*"', "expected a string"),
    ({"delivery": {"routes": ["mx"]}}, "delivery.routes", "expected a table"),
    ({"delivery": {"throttle": {"match": "*"}}}, "delivery.throttle", "array of tables"),
    ({"delivery": {"throttle": [5]}}, "delivery.throttle[0]", "expected a table"),
    ({"dkim": {"keys": {"domain": "a"}}}, "dkim.keys", "write [[dkim.keys]]"),
    ({"webhooks": {"url": "x"}}, "webhooks", "write [[webhooks]]"),
    ({"suppression": {"soft_bounce": "3"}}, "suppression.soft_bounce", "expected a table"),
    ({"delivery": {"tls": True}}, "delivery.tls", "expected a string"),
    # positive integers
    ({"smtp": {"max_connections": 0}}, "smtp.max_connections", "positive integer, got 0"),
    ({"smtp": {"max_connections_per_client": -1}}, "smtp.max_connections_per_client", "got -1"),
    ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients", "positive integer"),
    ({"delivery": {"max_connections": 0}}, "delivery.max_connections", "positive integer"),
    (
        {"delivery": {"throttle": [{"max_connections": 0}]}},
        "delivery.throttle[0].max_connections",
        "positive integer",
    ),
    (
        {"delivery": {"throttle": [{"max_messages_per_connection": -3}]}},
        "delivery.throttle[0].max_messages_per_connection",
        "positive integer",
    ),
    ({"suppression": {"soft_bounce": {"count": 0}}}, "suppression.soft_bounce.count", "positive"),
    # sizes
    ({"smtp": {"max_message_size": "25 parsecs"}}, "smtp.max_message_size", "invalid size"),
    ({"smtp": {"max_message_size": "25"}}, "smtp.max_message_size", "invalid size '25'"),
    ({"smtp": {"max_message_size": 0}}, "smtp.max_message_size", "more than zero"),
    ({"smtp": {"max_message_size": "0MB"}}, "smtp.max_message_size", "more than zero"),
    ({"smtp": {"max_message_size": -5}}, "smtp.max_message_size", "negative"),
    ({"smtp": {"max_message_size": True}}, "smtp.max_message_size", "expected a size"),
    ({"smtp": {"max_message_size": 1.5}}, "smtp.max_message_size", "expected a size"),
    # durations
    ({"delivery": {"max_age": "5 days"}}, "delivery.max_age", "invalid duration '5 days'"),
    ({"delivery": {"max_age": 5}}, "delivery.max_age", "add a unit"),
    ({"delivery": {"max_age": 5.0}}, "delivery.max_age", "add a unit"),
    ({"delivery": {"max_age": "5"}}, "delivery.max_age", 'use e.g. "90s"'),
    ({"delivery": {"max_age": "1y"}}, "delivery.max_age", "invalid duration '1y'"),
    ({"delivery": {"max_age": "-1h"}}, "delivery.max_age", "invalid duration"),
    ({"delivery": {"max_age": "0s"}}, "delivery.max_age", "more than zero"),
    ({"delivery": {"max_age": ""}}, "delivery.max_age", "invalid duration ''"),
    ({"delivery": {"max_age": ["5d"]}}, "delivery.max_age", "expected a duration string"),
    ({"delivery": {"connect_timeout": "30"}}, "delivery.connect_timeout", "invalid duration"),
    ({"delivery": {"retry_schedule": []}}, "delivery.retry_schedule", "must not be empty"),
    ({"delivery": {"processes": -1}}, "delivery.processes", "from 0 to 64, got -1"),
    ({"delivery": {"processes": 65}}, "delivery.processes", "from 0 to 64, got 65"),
    ({"delivery": {"processes": "2"}}, "delivery.processes", "expected an integer"),
    ({"delivery": {"processes": True}}, "delivery.processes", "expected an integer"),
    ({"delivery": {"nice": -1}}, "delivery.nice", "from 0 to 19, got -1"),
    ({"delivery": {"nice": 20}}, "delivery.nice", "from 0 to 19, got 20"),
    ({"delivery": {"nice": "10"}}, "delivery.nice", "expected an integer"),
    ({"delivery": {"retry_schedule": "1m"}}, "delivery.retry_schedule", "array of strings"),
    (
        {"delivery": {"retry_schedule": ["1m", "5 m"]}},
        "delivery.retry_schedule[1]",
        "invalid duration '5 m'",
    ),
    ({"delivery": {"retry_schedule": ["1m", 300]}}, "delivery.retry_schedule[1]", "got integer"),
    (
        {"feedback": {"mailboxes": [{"url": "imap://h", "interval": 60}]}},
        "feedback.mailboxes[0].interval",
        "add a unit",
    ),
    ({"suppression": {"hard_bounce": "never"}}, "suppression.hard_bounce", '"forever"'),
    ({"suppression": {"complaint": 0}}, "suppression.complaint", "add a unit"),
    ({"suppression": {"unsubscribe": "Forever"}}, "suppression.unsubscribe", "invalid duration"),
    (
        {"suppression": {"soft_bounce": {"within": "week"}}},
        "suppression.soft_bounce.within",
        "invalid duration 'week'",
    ),
    (
        {"suppression": {"soft_bounce": {"suppress_for": "0d"}}},
        "suppression.soft_bounce.suppress_for",
        "more than zero",
    ),
    # rates
    (
        {"delivery": {"throttle": [{"max_rate": "10/fortnight"}]}},
        "delivery.throttle[0].max_rate",
        "invalid rate '10/fortnight' (use e.g.",
    ),
    ({"delivery": {"throttle": [{"max_rate": "1000"}]}}, "delivery.throttle[0].max_rate", "rate"),
    ({"delivery": {"throttle": [{"max_rate": 1000}]}}, "delivery.throttle[0].max_rate", "rate"),
    ({"delivery": {"throttle": [{"max_rate": "0/s"}]}}, "delivery.throttle[0].max_rate", "zero"),
    # choices
    ({"delivery": {"tls": "always"}}, "delivery.tls", "'opportunistic' or 'required'"),
    # endpoints
    ({"smtp": {"listen": ["tcp:notaport"]}}, "smtp.listen[0]", "invalid endpoint 'tcp:notaport'"),
    ({"smtp": {"listen": ["nonsense:1"]}}, "smtp.listen[0]", "invalid endpoint 'nonsense:1'"),
    (
        {"smtp": {"listen": ["tcp:2525", "tcp:25:foo=1"]}},
        "smtp.listen[1]",
        "invalid endpoint 'tcp:25:foo=1': unknown option 'foo'",
    ),
    ({"smtp": {"listen": [""]}}, "smtp.listen[0]", "must not be empty"),
    ({"smtp": {"listen": ["tcp:99999"]}}, "smtp.listen[0]", "port 99999 out of range"),
    (
        {"smtp": {"listen": ["tcp:25:interface=localhost"]}},
        "smtp.listen[0]",
        "interface 'localhost' is not an IP address",
    ),
    (
        {"smtp": {"listen": ["tcp6:25:interface=127.0.0.1"]}},
        "smtp.listen[0]",
        "not an IPv6 address",
    ),
    ({"smtp": {"listen": ["tcp:25:interface=::1"]}}, "smtp.listen[0]", "'\\:'"),
    ({"smtp": {"listen": ["unix:"]}}, "smtp.listen[0]", "no socket path"),
    (
        {"smtp": {"listen": ["ssl:4465:privateKey=/nonexistent/key.pem"]}},
        "smtp.listen[0]",
        "No such file or directory: '/nonexistent/key.pem'",
    ),
    ({"inbound": {"listen": ["tcp:x"]}}, "inbound.listen[0]", "not a number: 'x'"),
    ({"web": {"listen": "bogus:8080"}}, "web.listen", "invalid endpoint 'bogus:8080'"),
    ({"web": {"listen": ""}}, "web.listen", "must not be empty"),
    # networks
    (
        {"smtp": {"allowed_networks": ["10.0.0.300/8"]}},
        "smtp.allowed_networks[0]",
        "invalid network '10.0.0.300/8'",
    ),
    (
        {"smtp": {"allowed_networks": ["127.0.0.0/8", "10.0.0.1/8"]}},
        "smtp.allowed_networks[1]",
        "invalid network '10.0.0.1/8': host bits set (did you mean '10.0.0.0/8'?)",
    ),
    ({"smtp": {"allowed_networks": ["anywhere"]}}, "smtp.allowed_networks[0]", "invalid network"),
    ({"smtp": {"allowed_networks": "::1/128"}}, "smtp.allowed_networks", "array of strings"),
    # hostnames and domains
    ({"server": {"hostname": "bad_host"}}, "server.hostname", "invalid hostname 'bad_host'"),
    ({"server": {"hostname": "-x.example"}}, "server.hostname", "invalid hostname"),
    ({"server": {"hostname": "a..b"}}, "server.hostname", "invalid hostname"),
    ({"server": {"hostname": ""}}, "server.hostname", "invalid hostname"),
    ({"server": {"hostname": "x" * 64 + ".com"}}, "server.hostname", "invalid hostname"),
    ({"server": {"data_dir": ""}}, "server.data_dir", "must not be empty"),
    (
        {"inbound": {"return_path_domain": "bounces example.com"}},
        "inbound.return_path_domain",
        "invalid domain 'bounces example.com'",
    ),
    ({"inbound": {"return_path_domain": ""}}, "inbound.return_path_domain", "invalid domain"),
    ({"rewrap": {"secret_file": ""}}, "rewrap.secret_file", "must not be empty"),
    # web.base_url
    ({"web": {"base_url": "ftp://x.example"}}, "web.base_url", "scheme must be http://, https://"),
    ({"web": {"base_url": "127.0.0.1:8080"}}, "web.base_url", "scheme must be"),
    ({"web": {"base_url": "http://"}}, "web.base_url", "no host"),
    ({"web": {"base_url": "http://x.example/?a=1"}}, "web.base_url", "must not have a query"),
    ({"web": {"base_url": "http://x.example/#top"}}, "web.base_url", "must not have a fragment"),
    ({"web": {"base_url": "http://x.example:port"}}, "web.base_url", "invalid port"),
    ({"web": {"base_url": "http://x.example/a b"}}, "web.base_url", "white space"),
    # database.url
    ({"database": {"url": "mysql://u:p@h/db"}}, "database.url", "invalid database URL"),
    ({"database": {"url": "var/smartrelay.db"}}, "database.url", "use 'sqlite:PATH'"),
    ({"database": {"url": ""}}, "database.url", "invalid database URL"),
    ({"database": {"url": "sqlite:"}}, "database.url", "no file path"),
    ({"database": {"url": "sqlite://host/x.db"}}, "database.url", "a host is not allowed"),
    ({"database": {"url": "postgresql://u:p@/db"}}, "database.url", "no host"),
    ({"database": {"url": "postgresql://u:p@db.example/"}}, "database.url", "no database name"),
    ({"database": {"url": "postgresql://db.example:x/db"}}, "database.url", "invalid port"),
    ({"database": {"url": "postgresql:db"}}, "database.url", "invalid database URL"),
    # TLS certificate and key
    ({"smtp": {"tls_certificate": "c.pem"}}, "smtp.tls_key", "must be set when"),
    ({"smtp": {"tls_key": "k.pem"}}, "smtp.tls_certificate", "must be set when smtp.tls_key"),
    (
        {"smtp": {"tls_certificate": "/nonexistent/c.pem", "tls_key": "/nonexistent/k.pem"}},
        "smtp.tls_certificate",
        "file not found: '/nonexistent/c.pem'",
    ),
    # routes
    (
        {"delivery": {"routes": {"example.test": "ftp://x"}}},
        'delivery.routes."example.test"',
        "invalid route target 'ftp://x': scheme must be smtp://, smtp+starttls://, smtps://",
    ),
    (
        {"delivery": {"routes": {"*": "relay.example.net:25"}}},
        'delivery.routes."*"',
        "invalid route target",
    ),
    ({"delivery": {"routes": {"*": "smtp://"}}}, 'delivery.routes."*"', "no host"),
    ({"delivery": {"routes": {"*": "smtp://h:99999"}}}, 'delivery.routes."*"', "invalid port"),
    ({"delivery": {"routes": {"*": "smtp://h:x"}}}, 'delivery.routes."*"', "invalid port"),
    ({"delivery": {"routes": {"*": "smtp://h:25/x"}}}, 'delivery.routes."*"', "path"),
    ({"delivery": {"routes": {"*": ""}}}, 'delivery.routes."*"', "invalid route target"),
    (
        {"delivery": {"routes": {"*.example.com": "mx"}}},
        'delivery.routes."*.example.com"',
        "invalid route domain",
    ),
    (
        {"delivery": {"routes": {"example.com": "mx", "Example.COM": "mx"}}},
        'delivery.routes."Example.COM"',
        "duplicate route for 'example.com'",
    ),
    # throttles
    ({"delivery": {"throttle": [{"match": "*.gmail.com"}]}}, "delivery.throttle[0].match", "'*'"),
    ({"delivery": {"throttle": [{"match": "mx:"}]}}, "delivery.throttle[0].match", "invalid"),
    ({"delivery": {"throttle": [{"match": ""}]}}, "delivery.throttle[0].match", "invalid match"),
    (
        {"delivery": {"throttle": [{"match": "gmail.com"}, {"match": "Gmail.com"}]}},
        "delivery.throttle[1].match",
        "duplicate match 'gmail.com' (also in delivery.throttle[0])",
    ),
    # dkim
    ({"dkim": {"keys": [{"selector": "s1"}]}}, "dkim.keys[0].domain", "required key is missing"),
    (
        {"dkim": {"keys": [{"domain": "example.com", "private_key": "k"}]}},
        "dkim.keys[0].selector",
        "required key is missing",
    ),
    (
        {"dkim": {"keys": [{"domain": "example.com", "selector": "s1"}]}},
        "dkim.keys[0].private_key",
        "required key is missing",
    ),
    (
        {"dkim": {"keys": [{"domain": "exa mple.com", "selector": "s1", "private_key": "k"}]}},
        "dkim.keys[0].domain",
        "invalid domain",
    ),
    (
        {"dkim": {"keys": [{"domain": "example.com", "selector": "s_1", "private_key": "k"}]}},
        "dkim.keys[0].selector",
        "invalid selector",
    ),
    (
        {
            "dkim": {
                "keys": [
                    {"domain": "example.com", "selector": "s1", "private_key": "/nonexistent.pem"}
                ]
            }
        },
        "dkim.keys[0].private_key",
        "file not found: '/nonexistent.pem'",
    ),
    # feedback
    ({"feedback": {"mailboxes": [{}]}}, "feedback.mailboxes[0].url", "required key is missing"),
    (
        {"feedback": {"mailboxes": [{"url": "https://imap.example.com"}]}},
        "feedback.mailboxes[0].url",
        "scheme must be imap://, imaps://, pop3://, pop3s://",
    ),
    ({"feedback": {"mailboxes": [{"url": "imaps://"}]}}, "feedback.mailboxes[0].url", "no host"),
    (
        {"feedback": {"mailboxes": [{"url": "imap://h", "delete_after_processing": "no"}]}},
        "feedback.mailboxes[0].delete_after_processing",
        "expected a boolean",
    ),
    # webhooks
    ({"webhooks": [{"secret": "s"}]}, "webhooks[0].url", "required key is missing"),
    ({"webhooks": [{"url": "https://h"}]}, "webhooks[0].secret", "required key is missing"),
    ({"webhooks": [{"url": "https://h", "secret": ""}]}, "webhooks[0].secret", "not be empty"),
    ({"webhooks": [{"url": "mailto:x@y", "secret": "s"}]}, "webhooks[0].url", "scheme must be"),
    (
        {"webhooks": [{"url": "https://h", "secret": "s", "events": ["delivered", "bounce"]}]},
        "webhooks[0].events[1]",
        "unknown event type 'bounce' (expected one of: received, suppressed,",
    ),
    (
        {"webhooks": [{"url": "https://h", "secret": "s", "events": []}]},
        "webhooks[0].events",
        "at least one",
    ),
    (
        {"webhooks": [{"url": "https://h", "secret": "s"}, {"url": "https://h/2"}]},
        "webhooks[1].secret",
        "required",
    ),
    (
        {"webhooks": [{"url": "https://h", "secret": "s"}, {"url": "https://h", "secret": "t"}]},
        "webhooks[1].url",
        "the same url twice",
    ),
    (
        {"webhooks": [{"url": "https://h", "secret": "s", "batch_size": 0}]},
        "webhooks[0].batch_size",
        "from 1 to 1000",
    ),
    (
        {"smtp": {"on_volume_alert": "block"}},
        "smtp.on_volume_alert",
        "invalid value",
    ),
    (
        {"smtp": {"volume_alert_factor": 1}},
        "smtp.volume_alert_factor",
        "above 1",
    ),
    (
        {"api": {"metrics": "yes"}},
        "api.metrics",
        "boolean",
    ),
    (
        {"api": {"metrics_networks": ["10.0.0.1/8"]}},
        "api.metrics_networks[0]",
        "host bits",
    ),
]


@pytest.mark.parametrize(
    ("data", "key", "problem"), BAD, ids=[f"{i}-{key}" for i, (_d, key, _p) in enumerate(BAD)]
)
def test_bad_value(data: dict[str, Any], key: str, problem: str) -> None:
    err = error_of(data)
    assert err.key == key, str(err)
    assert problem in err.problem, str(err)
    assert err.path == "etc/x.toml"
    assert str(err) == f"etc/x.toml: {key}: {err.problem}"
    assert "\n" not in str(err)


def test_unknown_key_problem_without_suggestion() -> None:
    assert error_of({"smtp": {"zzz": 1}}).problem == "unknown key"


def test_secrets_not_in_errors() -> None:
    err = error_of({"database": {"url": "postgresql://user:hunter2@/db"}})
    assert "hunter2" not in str(err)
    assert "user:***@" in str(err)
    err = error_of({"delivery": {"routes": {"*": "ftp://user:hunter2@h"}}})
    assert "hunter2" not in str(err)
    err = error_of({"feedback": {"mailboxes": [{"url": "http://user:hunter2@h"}]}})
    assert "hunter2" not in str(err)


def test_tls_file_is_a_directory(tmp_path: Path) -> None:
    key = pem(tmp_path, "key.pem")
    err = error_of({"smtp": {"tls_certificate": str(tmp_path), "tls_key": key}})
    assert err.key == "smtp.tls_certificate"
    assert "not a regular file" in err.problem


def test_tls_key_file_missing(tmp_path: Path) -> None:
    cert = pem(tmp_path, "cert.pem")
    err = error_of({"smtp": {"tls_certificate": cert, "tls_key": str(tmp_path / "no.pem")}})
    assert err.key == "smtp.tls_key"
    assert "file not found" in err.problem


def test_tls_files_present(tmp_path: Path) -> None:
    cert, key = pem(tmp_path, "cert.pem"), pem(tmp_path, "key.pem")
    smtp = parse_config({"smtp": {"tls_certificate": cert, "tls_key": key}}).smtp
    assert (smtp.tls_certificate, smtp.tls_key) == (cert, key)


def test_ssl_endpoint_with_bad_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage")
    err = error_of({"smtp": {"listen": [f"ssl:4465:privateKey={bad}"]}})
    assert err.key == "smtp.listen[0]"
    assert err.problem.startswith(f"invalid endpoint 'ssl:4465:privateKey={bad}': ")


def test_dkim_duplicate_selector(tmp_path: Path) -> None:
    key = pem(tmp_path, "dkim.pem")
    entry = {"domain": "example.com", "selector": "s1", "private_key": key}
    err = error_of({"dkim": {"keys": [entry, {**entry, "domain": "EXAMPLE.com"}]}})
    assert err.key == "dkim.keys[1].selector"
    assert "duplicate key" in err.problem
    assert "dkim.keys[0]" in err.problem


def test_dkim_bad_algorithm(tmp_path: Path) -> None:
    key = pem(tmp_path, "dkim.pem")
    entry = {"domain": "example.com", "selector": "s1", "private_key": key, "algorithm": "rsa"}
    err = error_of({"dkim": {"keys": [entry]}})
    assert err.key == "dkim.keys[0].algorithm"
    assert "'rsa-sha256' or 'ed25519-sha256'" in err.problem


def test_dkim_defaults_and_lowercase(tmp_path: Path) -> None:
    key = pem(tmp_path, "dkim.pem")
    config = parse_config(
        {"dkim": {"keys": [{"domain": "Example.COM", "selector": "s1", "private_key": key}]}}
    )
    assert config.dkim_keys == (DkimKey("example.com", "s1", key, "rsa-sha256"),)


def test_unquoted_route_domain_hint(tmp_path: Path) -> None:
    path = write(tmp_path, '[delivery.routes]\nexample.test = "mx"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "delivery.routes.example"
    assert "quote domain names" in info.value.problem


def test_key_path_quotes_non_bare_keys() -> None:
    err = error_of({"delivery": {"routes": {"example.test": "mx", "ex ample": "mx"}}})
    assert err.key == 'delivery.routes."ex ample"'


# --------------------------------------------------------------------------------------
# Good values


@pytest.mark.parametrize(
    ("url", "engine", "sqlite_path", "redacted"),
    [
        ("sqlite:var/smartrelay.db", "sqlite", "var/smartrelay.db", "sqlite:var/smartrelay.db"),
        ("sqlite:/var/lib/x.db", "sqlite", "/var/lib/x.db", "sqlite:/var/lib/x.db"),
        ("sqlite:///abs/path.db", "sqlite", "/abs/path.db", "sqlite:///abs/path.db"),
        ("sqlite::memory:", "sqlite", ":memory:", "sqlite::memory:"),
        ("postgresql://u:p@h:5432/db", "postgresql", None, "postgresql://u:***@h:5432/db"),
        ("postgres://h/db", "postgresql", None, "postgres://h/db"),
        ("postgresql://u@h/db?sslmode=require", "postgresql", None, None),
    ],
)
def test_database_urls(
    url: str, engine: str, sqlite_path: str | None, redacted: str | None
) -> None:
    database = parse_config({"database": {"url": url}}).database
    assert database.url == url
    assert database.engine == engine
    assert database.redacted_url == (redacted or url)
    if sqlite_path is None:
        with pytest.raises(ValueError):
            database.sqlite_path  # noqa: B018
    else:
        assert database.sqlite_path == sqlite_path


def test_database_redacted_url_with_at_in_password() -> None:
    database = DatabaseConfig("postgresql://user:p@ss@db.example:5432/x")
    assert database.redacted_url == "postgresql://user:***@db.example:5432/x"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (1000, 1000),
        ("100B", 100),
        ("512KB", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("25MB", 25 * 1024**2),
        ("25mb", 25 * 1024**2),
        ("25 MiB", 25 * 1024**2),
        ("1GB", 1024**3),
        ("1GiB", 1024**3),
        ("1.5KB", 1536),
    ],
)
def test_sizes(size: int | str, expected: int) -> None:
    smtp = parse_config({"smtp": {"max_message_size": size}}).smtp
    assert smtp.max_message_size == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("5d", 432000),
        ("1w", 604800),
        ("1.5h", 5400),
        ("1h30m", 5400),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_config({"delivery": {"connect_timeout": text}}).delivery.connect_timeout == seconds
    assert units.parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("1000/min", 1000 / 60),
        ("10/s", 10),
        ("50000/h", 50000 / 3600),
        ("100000/d", 100000 / 86400),
        ("2/second", 2),
        ("0.5/s", 0.5),
    ],
)
def test_rates(text: str, per_second: float) -> None:
    throttles = parse_config({"delivery": {"throttle": [{"max_rate": text}]}}).delivery.throttles
    assert throttles[0].max_rate_per_second == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["90", "5 days", "1y", "", "m", "1.h", "-5s", "1h 30m"])
def test_units_bad_durations(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        units.parse_duration(bad)


def test_units_size_and_rate_errors() -> None:
    with pytest.raises(ValueError, match="invalid size"):
        units.parse_size("12XB")
    with pytest.raises(ValueError, match="invalid rate"):
        units.parse_rate("5/y")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.5, "500ms"), (90, "90s"), (900, "15m"), (86400, "1d"), (0, "0s")]
)
def test_units_format_duration(seconds: float, text: str) -> None:
    assert units.format_duration(seconds) == text


def test_suppression_durations() -> None:
    suppression = parse_config(
        {
            "suppression": {
                "hard_bounce": "365d",
                "soft_bounce": {"count": 5, "suppress_for": "forever"},
                "complaint": "forever",
                "unsubscribe": "1w",
            }
        }
    ).suppression
    assert suppression.hard_bounce == 365 * 86400
    assert suppression.soft_bounce == SoftBouncePolicy(5, 7 * 86400, None)
    assert suppression.complaint is None
    assert suppression.unsubscribe == 604800


def test_retention_durations() -> None:
    assert parse_config({}).retention == RetentionConfig(7 * 86400, 90 * 86400, 30 * 86400)
    retention = parse_config(
        {"retention": {"message_bodies": "12h", "events": "365d", "feedback_reports": "2w"}}
    ).retention
    assert retention == RetentionConfig(12 * 3600, 365 * 86400, 14 * 86400)
    assert parse_config({"retention": {"events": "30d"}}).retention.message_bodies == 7 * 86400
    for value, problem in [
        ("0s", "invalid duration '0s': must be more than zero"),
        ("forever", "invalid duration 'forever'"),
        (7, "invalid duration 7: add a unit"),
        (True, "expected a duration string"),
    ]:
        message = str(error_of({"retention": {"message_bodies": value}}))
        assert message.startswith("etc/x.toml: retention.message_bodies: " + problem), message
    unknown = str(error_of({"retention": {"bodies": "1d"}}))
    assert unknown.startswith("etc/x.toml: retention.bodies: unknown key"), unknown


def test_networks_single_host_and_ipv6() -> None:
    smtp = parse_config({"smtp": {"allowed_networks": ["192.0.2.7", "2001:db8::/32"]}}).smtp
    assert smtp.allowed_networks == (
        ipaddress.IPv4Network("192.0.2.7/32"),
        ipaddress.IPv6Network("2001:db8::/32"),
    )


def test_empty_listen_and_networks_allowed() -> None:
    config = parse_config({"inbound": {"listen": []}, "smtp": {"allowed_networks": []}})
    assert config.inbound.listen == ()
    assert config.smtp.allowed_networks == ()


def test_listen_endpoints_accepted() -> None:
    endpoints = [
        "tcp:0",
        "tcp:2525",
        "tcp:2525:interface=0.0.0.0",
        "tcp6:2525:interface=\\:\\:1",
        "unix:/tmp/smartrelay.sock",
    ]
    assert parse_config({"smtp": {"listen": endpoints}}).smtp.listen == tuple(endpoints)


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://relay.example.com/", "https://relay.example.com"),
        ("https://example.com/relay/", "https://example.com/relay"),
        ("HTTPS://[::1]:8443", "HTTPS://[::1]:8443"),
    ],
)
def test_base_url(base_url: str, expected: str) -> None:
    assert parse_config({"web": {"base_url": base_url}}).web.base_url == expected


def test_hostnames() -> None:
    assert parse_config({"server": {"hostname": "localhost"}}).server.hostname == "localhost"
    assert parse_config({"server": {"hostname": "Mx-1.Example.com"}}).server.hostname == (
        "Mx-1.Example.com"
    )


def test_routes_parsed() -> None:
    delivery = parse_config(
        {
            "delivery": {
                "routes": {
                    "example.test": "smtp://127.0.0.1:2600",
                    "Corp.Example": "smtp+starttls://us%40er:p%40ss@relay.example.net:587",
                    "tls.example": "smtps://relay.example.net",
                    "mx.example": "MX",
                }
            }
        }
    ).delivery
    routes = {route.domain: route for route in delivery.routes}
    assert list(routes) == ["example.test", "corp.example", "tls.example", "mx.example", "*"]
    assert routes["*"] == Route("*", "mx")
    assert routes["*"].is_mx and routes["*"].scheme == "mx" and routes["*"].port == 0
    sink = routes["example.test"]
    assert (sink.scheme, sink.host, sink.port, sink.username) == ("smtp", "127.0.0.1", 2600, None)
    smarthost = routes["corp.example"]
    assert smarthost.scheme == "smtp+starttls"
    assert (smarthost.host, smarthost.port) == ("relay.example.net", 587)
    assert (smarthost.username, smarthost.password) == ("us@er", "p@ss")
    assert smarthost.redacted_target == "smtp+starttls://us%40er:***@relay.example.net:587"
    assert routes["tls.example"].port == 465
    assert routes["mx.example"].target == "mx"


def test_routes_explicit_star_not_duplicated() -> None:
    routes = parse_config({"delivery": {"routes": {"*": "smtp://127.0.0.1:2600"}}}).delivery.routes
    assert routes == (Route("*", "smtp://127.0.0.1:2600"),)


def test_empty_routes_table_gives_mx() -> None:
    assert parse_config({"delivery": {"routes": {}}}).delivery.routes == (Route("*", "mx"),)


def test_throttles_defaults_and_implicit_star() -> None:
    throttles = parse_config(
        {"delivery": {"throttle": [{"match": "Gmail.com", "max_rate": "10/s"}]}}
    ).delivery.throttles
    assert throttles == (Throttle("gmail.com", 20, 100, 10.0), Throttle())
    throttles = parse_config({"delivery": {"throttle": [{}]}}).delivery.throttles
    assert throttles == (Throttle(),)
    assert parse_config({"delivery": {"throttle": []}}).delivery.throttles == (Throttle(),)


@pytest.mark.parametrize("match", ["*", "gmail.com", "mx:.google.com", "mx:google.com"])
def test_throttle_matches(match: str) -> None:
    throttles = parse_config({"delivery": {"throttle": [{"match": match}]}}).delivery.throttles
    assert throttles[0].match == match


def test_feedback_mailbox_properties() -> None:
    mailboxes = parse_config(
        {
            "feedback": {
                "mailboxes": [
                    {"url": "imaps://user:p%3Ass@imap.example.com/Bounces"},
                    {"url": "pop3s://user@pop.example.com:1995", "interval": "2m"},
                ]
            }
        }
    ).feedback_mailboxes
    imap, pop = mailboxes
    assert (imap.interval, imap.delete_after_processing) == (60.0, True)
    assert (imap.scheme, imap.host, imap.port) == ("imaps", "imap.example.com", 993)
    assert (imap.username, imap.password, imap.mailbox) == ("user", "p:ss", "Bounces")
    assert imap.redacted_url == "imaps://user:***@imap.example.com/Bounces"
    assert (pop.scheme, pop.port, pop.password, pop.interval) == ("pop3s", 1995, None, 120.0)
    assert pop.mailbox == "INBOX"


def test_webhook_events_default_and_dedup() -> None:
    webhooks = parse_config(
        {
            "webhooks": [
                {"url": "https://h/a", "secret": "s"},
                {"url": "https://h/b", "secret": "s", "events": ["opened", "clicked", "opened"]},
            ]
        }
    ).webhooks
    assert webhooks[0].events == EVENT_TYPES
    assert webhooks[1].events == ("opened", "clicked")
    assert len(EVENT_TYPES) == 11


def test_config_is_frozen() -> None:
    config = Config()
    name = "server"
    with pytest.raises(AttributeError):
        setattr(config, name, config.server)


def test_web_connection_limits() -> None:
    assert (WebConfig().max_connections, WebConfig().idle_timeout) == (500, 60.0)
    web = parse_config({"web": {"max_connections": 20, "idle_timeout": "2m"}}).web
    assert (web.max_connections, web.idle_timeout) == (20, 120.0)
    assert error_of({"web": {"max_connections": 0}}).key == "web.max_connections"
    bad = error_of({"web": {"idle_timeout": 30}})
    assert bad.key == "web.idle_timeout" and "add a unit" in bad.problem


# --------------------------------------------------------------------------------------
# The package: its names, its imports, endpoint checks that bind nothing


def test_every_name_imported_from_smartrelay_config_is_still_there() -> None:
    import smartrelay.config

    names = {
        "CHECKOUT_CONFIG", "INSTALLED_CONFIG", "MAX_DELIVERY_PROCESSES", "EVENT_TYPES",
        "Config", "ConfigError", "DatabaseConfig", "DeliveryConfig", "DkimAlgorithm", "DkimKey",
        "FeedbackMailbox", "InboundConfig", "RewrapConfig", "Route", "ServerConfig",
        "SmtpConfig", "SoftBouncePolicy", "SuppressionConfig", "Throttle", "WebConfig",
        "Webhook", "default_config_path", "load_config", "parse_config", "ApiConfig",
    }  # fmt: skip
    assert names <= set(smartrelay.config.__all__)
    for name in names:
        assert getattr(smartrelay.config, name) is not None


def test_the_config_package_imports_no_test_helpers() -> None:
    """Production code must not load twisted.internet.testing (it once did, to check
    endpoint strings against a MemoryReactor)."""
    code = (
        "import sys, smartrelay.config\n"
        "smartrelay.config.parse_config({'smtp': {'listen': ['tcp:2525', 'unix:/x/s.sock']}})\n"
        "print(sorted(m for m in sys.modules if m.startswith('twisted.internet.testing')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_checking_endpoints_binds_and_creates_nothing(tmp_path: Path) -> None:
    sock = tmp_path / "relay.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listen = [f"tcp:{port}:interface=127.0.0.1", f"unix:{sock}:lockfile=1"]
    assert parse_config({"smtp": {"listen": listen}}).smtp.listen == tuple(listen)
    assert list(tmp_path.iterdir()) == []
    with socket.socket() as again:  # the port was not kept by the check
        again.bind(("127.0.0.1", port))


def test_ssl_endpoints_have_their_port_and_interface_checked(tmp_path: Path) -> None:
    tls = ensure_certificate("", "", str(tmp_path / "data"), "relay.example.com")
    files = f"privateKey={tls.key_path}:certKey={tls.certificate_path}"
    good = f"ssl:4465:{files}:interface=127.0.0.1"
    assert parse_config({"smtp": {"listen": [good]}}).smtp.listen == (good,)
    assert (
        "port 99999 out of range" in error_of({"smtp": {"listen": [f"ssl:99999:{files}"]}}).problem
    )
    bad_interface = error_of({"smtp": {"listen": [f"ssl:4465:{files}:interface=localhost"]}})
    assert bad_interface.problem.endswith("interface 'localhost' is not an IP address")
