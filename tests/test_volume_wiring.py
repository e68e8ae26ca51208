"""The relay builds its volume watch from ``[smtp] on_volume_alert`` (main process, with a
submission listener) and hands it to the submission backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartrelay.relay import RelayService
from smartrelay.smtp.backends import SubmissionBackend
from smartrelay.smtp.volume_watch import VolumeWatch
from tests.conftest import real_reactor
from tests.support.relay import relay_config


@pytest.mark.parametrize("action", ["warn", "hold", "off"])
def test_watch_follows_the_config(tmp_path: Path, action: str) -> None:
    config = relay_config(
        tmp_path,
        f"sqlite:{tmp_path / 'db'}",
        1,
        2,
        3,
        smtp={"on_volume_alert": action, "volume_alert_window": "2m", "volume_alert_minimum": 7},
    )
    relay = RelayService(config, real_reactor())
    assert relay.submission is not None
    backend = relay.submission.backend
    assert isinstance(backend, SubmissionBackend)
    if action == "off":
        assert relay.volume is None and backend.volume is None
        return
    assert isinstance(relay.volume, VolumeWatch) and backend.volume is relay.volume
    assert relay.volume.settings.action == action
    assert relay.volume.settings.window == 120.0 and relay.volume.settings.minimum == 7
    services = list(relay)
    # Started before the SMTP listeners, so stopped after them (its last save needs storage).
    assert services.index(relay.storage) < services.index(relay.volume)
    assert services.index(relay.volume) < min(services.index(s) for s in relay.listeners)
    delivery_only = RelayService(config, real_reactor(), role="delivery")
    assert delivery_only.volume is None
