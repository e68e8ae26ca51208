"""``[delivery] mta_sts`` (SPEC section 2): on by default, a boolean, and the relay builds its
MTA-STS policy cache only when it is on."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from smartrelay.config import ConfigError, parse_config
from smartrelay.delivery.mta_sts import MtaSts
from smartrelay.relay import RelayService
from tests.conftest import real_reactor
from tests.support.relay import relay_config


def test_mta_sts_is_on_by_default() -> None:
    assert parse_config({}).delivery.mta_sts is True
    assert parse_config({"delivery": {"mta_sts": False}}).delivery.mta_sts is False


def test_mta_sts_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"delivery": {"mta_sts": "yes"}}, "etc/x.toml")
    assert str(info.value) == (
        "etc/x.toml: delivery.mta_sts: expected a boolean (true or false), got string 'yes'"
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_the_relay_builds_the_policy_cache_only_when_on(tmp_path: Path, enabled: bool) -> None:
    config = relay_config(tmp_path, f"sqlite:{tmp_path / 'db'}", 1, 2, 3)
    config = attrs.evolve(config, delivery=attrs.evolve(config.delivery, mta_sts=enabled))
    relay = RelayService(config, real_reactor())
    assert relay.delivery is not None
    assert isinstance(relay.delivery._sts, MtaSts) is enabled
