"""A simulated credential leak against a real ``twistd smartrelay`` (docs/smtp.md, "Volume
alerts"): a steady baseline over smtplib with STARTTLS and AUTH, then a burst 20 times it.
Exactly one ``alert`` event; with ``hold`` the credential's next MAIL FROM gets 451 4.7.1
while another credential's mail is accepted; ``smartrelay-ctl smtp-credential release``
lets its mail in again. A 2-second window keeps the test short; margins are generous (a
window with one message more or less changes nothing)."""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from pathlib import Path

from smartrelay.smtp.volume import LEARNING_WINDOWS
from tests.support.relay import HOST, free_ports
from tests.support.run import Twistd, assert_ok, ctl, query, write_config
from tests.support.traffic import wait_until

WINDOW = 2.0
STEADY = 2  # messages per window while learning
SENDER = "app@sender.test"


def relay_config(tmp_path: Path, url: str, smtp_port: int, closed_port: int) -> Path:
    var = tmp_path / "var"
    any_port = json.dumps(f"tcp:0:interface={HOST}")
    return write_config(
        tmp_path,
        url,
        f'[server]\nhostname = "relay.test"\ndata_dir = {json.dumps(str(var))}\n'
        f'[smtp]\nlisten = ["tcp:{smtp_port}:interface={HOST}"]\n'
        f'on_volume_alert = "hold"\nvolume_alert_window = "{WINDOW:g}s"\n'
        "volume_alert_factor = 10\nvolume_alert_minimum = 10\n"
        f"[inbound]\nlisten = [{any_port}]\n"
        f"[rewrap]\nsecret_file = {json.dumps(str(var / 'secret.key'))}\n"
        f"[web]\nlisten = {any_port}\n"
        f'[delivery.routes]\n"*" = "smtp://{HOST}:{closed_port}"\n',
    )


def add_credential(config: Path, name: str) -> str:
    added = assert_ok(ctl(config, "smtp-credential", "add", name))
    return added.lines[1]


def session(port: int, name: str, password: str) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=60)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.starttls(context=context)
    client.login(name, password)
    return client


def message(n: int) -> bytes:
    return f"From: {SENDER}\r\nTo: r{n}@example.test\r\nSubject: {n}\r\n\r\nHello {n}.\r\n".encode()


def send(client: smtplib.SMTP, n: int) -> tuple[int, str]:
    """One transaction: (250, ...) when queued, else the refusal at MAIL FROM."""
    try:
        client.sendmail(SENDER, [f"r{n}@example.test"], message(n))
    except smtplib.SMTPSenderRefused as refused:
        return refused.smtp_code, refused.smtp_error.decode()
    return 250, "queued"


def alerts(url: str) -> list[dict[str, object]]:
    return [
        {"queue_id": q, "recipient": r, **json.loads(d)}
        for q, r, d in query(
            url, "SELECT queue_id, recipient, data FROM events WHERE type = ?", ("alert",)
        )
    ]


def test_burst_alerts_once_and_holds_until_released(tmp_path: Path) -> None:
    smtp_port, closed_port = free_ports(2)
    url = f"sqlite:{tmp_path / 'relay.db'}"
    config = relay_config(tmp_path, url, smtp_port, closed_port)
    leaky = add_credential(config, "leaky")
    other = add_credential(config, "other")
    server = Twistd(config, tmp_path)
    try:
        server.wait_for("smtp: listening on", timeout=60)
        app = session(smtp_port, "leaky", leaky)
        neighbour = session(smtp_port, "other", other)
        n = 0
        # The steady phase: STEADY messages a window for the first (partial, not learned)
        # window, the learning windows and two more.
        end = time.monotonic() + WINDOW * (LEARNING_WINDOWS + 3)
        while time.monotonic() < end:
            for client in (app, neighbour):
                n += 1
                assert send(client, n)[0] == 250
            time.sleep(WINDOW / STEADY)
        assert alerts(url) == []
        # The leak: 20 times the baseline, as fast as the relay takes it. The alert fires
        # once the window holds more than 10x the baseline; the next MAIL FROM is refused.
        replies = []
        for _ in range(STEADY * 20):
            n += 1
            replies.append(send(app, n))
            if replies[-1][0] != 250:
                break
        code, text = replies[-1]
        assert code == 451 and text.startswith("4.7.1 "), replies[-3:]
        assert "volume alert" in text and "release" in text and leaky not in text
        accepted = len(replies) - 1
        # (The window also holds the last steady messages: the burst needs a few less.)
        assert 5 * STEADY < accepted < STEADY * 20, replies
        # Held: a new session too; the other credential's mail is accepted.
        held_again = session(smtp_port, "leaky", leaky)
        assert send(held_again, n + 1)[0] == 451
        assert send(neighbour, n + 2)[0] == 250
        [alert] = wait_until(lambda: alerts(url) or None, "the alert event", 30)
        assert alert["kind"] == "credential-volume" and alert["credential"] == "leaky"
        assert alert["action"] == "hold" and alert["queue_id"] is None
        rate, baseline = int(str(alert["rate"])), float(str(alert["baseline"]))
        assert 0.5 * STEADY <= baseline <= 2 * STEADY
        assert rate > 10 * baseline and rate >= 10 and rate <= accepted + 3 * STEADY
        server.wait_for("volume alert: SMTP credential 'leaky'", timeout=30)
        [(held_at, reason)] = query(
            url, "SELECT held_at, hold_reason FROM credential_volume WHERE credential = 'leaky'"
        )
        assert held_at is not None and str(reason).startswith("volume alert: ")

        # Released from the CLI: the relay reads the held set again within seconds.
        assert "released" in assert_ok(ctl(config, "smtp-credential", "release", "leaky")).stdout

        def accepted_again() -> bool | None:
            return True if send(held_again, n + 3)[0] == 250 else None

        wait_until(accepted_again, "leaky's mail accepted again", 60)
        assert len(alerts(url)) == 1  # exactly one alert for the episode
        for client in (app, neighbour, held_again):
            client.close()
    finally:
        server.kill()
