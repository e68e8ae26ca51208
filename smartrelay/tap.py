"""``twistd smartrelay``: the plugin's options and its service (as ``twisted.mail.tap`` is).

``makeService`` is the composition root: the only place that takes the global reactor. It
reads the config, raises the open files limit and builds :class:`~smartrelay.relay.RelayService`,
which writes no files; a bad config or a port in use is one line and exit status 1, before
twistd daemonises. The listeners bind in ``privilegedStartService``: ``twistd --uid --gid``
binds ports below 1024 as root and then runs the relay as that user.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.application.service import IService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from smartrelay.config import (
    CHECKOUT_CONFIG,
    INSTALLED_CONFIG,
    ConfigError,
    default_config_path,
    load_config,
)
from smartrelay.delivery.pools import SourceAddressError
from smartrelay.gc_freeze import freeze_startup_objects
from smartrelay.listening import ListenError
from smartrelay.logs import twistd_log_observer
from smartrelay.reactor import as_relay_reactor
from smartrelay.relay import RelayService, raise_open_files_limit
from smartrelay.rewrap.dkim import DkimError
from smartrelay.smtp.tls import TlsError
from smartrelay.threads import shorten_gil_switch_interval


class Options(usage.Options):
    optParameters = [
        [
            "config",
            "c",
            None,
            f"config file (default: {CHECKOUT_CONFIG} in a checkout, else {INSTALLED_CONFIG})",
        ],
    ]


class TwistdRelay(RelayService):
    """The relay as twistd runs it: it gives twistd's application its log observer
    (:mod:`smartrelay.logs`), which twistd then logs to instead of its own."""

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        observer = self.log_observer
        if (
            observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None  # type: ignore[no-untyped-call]
        ):
            parent.setComponent(ILogObserver, observer)  # type: ignore[no-untyped-call]
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]


def makeService(options: Options) -> IService:
    from twisted.internet import reactor  # the composition root takes the global reactor

    path = options["config"] or default_config_path()
    try:
        config = load_config(path)
        raise_open_files_limit()
        shorten_gil_switch_interval()
        relay_reactor = as_relay_reactor(reactor)
        relay = TwistdRelay(config, relay_reactor)
        relay.check_listeners()
        # Start-up's objects out of the full collections' way (p99; gc_freeze.py).
        relay_reactor.callWhenRunning(freeze_startup_objects)
        # twistd's options (``options.parent``): where twistd would log, and how.
        relay.log_observer = twistd_log_observer(
            getattr(options, "parent", None), relay_reactor.callFromThread
        )
    except (ConfigError, TlsError, DkimError, ListenError, SourceAddressError) as error:
        raise SystemExit(f"smartrelay: {error}") from None
    except OSError as error:
        raise SystemExit(f"smartrelay: {error.strerror or error}: {error.filename}") from None
    return cast(IService, relay)
