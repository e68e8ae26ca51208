"""The reports UI (``{base_url}/ui/``): see :mod:`smartrelay.web.ui.app` and docs/web-ui.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from smartrelay.config import Config
from smartrelay.deliverability import DeliverabilitySettings, DnsChecker
from smartrelay.delivery.mx import make_system_resolver
from smartrelay.feedback.processor import FeedbackProcessor
from smartrelay.metrics import AdaptiveGauges
from smartrelay.reactor import IRelayReactor
from smartrelay.rewrap.dkim import LoadedKey, load_key
from smartrelay.smtp.volume_watch import VolumeWatch
from smartrelay.storage.store import Store
from smartrelay.web.templating import Templates
from smartrelay.web.ui.alerts import Alerts
from smartrelay.web.ui.app import ReportsUI, Section
from smartrelay.web.ui.auth import Authenticator
from smartrelay.web.ui.context import UiContext
from smartrelay.web.ui.dashboard import Dashboard
from smartrelay.web.ui.deliverability import Deliverability
from smartrelay.web.ui.feedback import Feedback
from smartrelay.web.ui.messages import Messages
from smartrelay.web.ui.queue import Queue
from smartrelay.web.ui.suppressions import Suppressions

__all__ = ["build_reports_ui"]

T = TypeVar("T")


def build_reports_ui(
    store_ready: Callable[[], Deferred[Store]],
    reactor: IRelayReactor,
    config: Config,
    templates: Templates | None = None,
    feedback_processor: FeedbackProcessor | None = None,
    dkim_keys: Sequence[LoadedKey] | None = None,
    volume: VolumeWatch | None = None,
    throttle_limits: AdaptiveGauges | None = None,
) -> ReportsUI:
    """The reports UI of this config; its templates are compiled now (a broken one raises
    :class:`~smartrelay.web.templating.TemplateError`). ``feedback_processor`` (the relay's)
    lets the feedback page reprocess a report; ``dkim_keys``, the relay's signer's keys
    (loaded once; read from the config's files when not given); ``volume``, the relay's
    volume watch (a release from the UI takes effect on this node at once);
    ``throttle_limits``, the adaptive throttles' current limits (the queue page shows them)."""

    def in_thread(work: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    ui = UiContext(
        store_ready,
        Templates.load() if templates is None else templates,
        reactor,
        config.web.base_url,
        config.web.trusted_proxies,
        extra={
            "config": config,
            "feedback_processor": feedback_processor,
            "in_thread": in_thread,
            "throttle_limits": throttle_limits,
        },
    )

    # The deliverability page reads the DKIM keys (their public halves) and asks the
    # system's DNS, as delivery does, its resolver made at the first lookup (this runs after
    # twistd dropped privileges: nothing more is imported now). A key that cannot be read
    # stops the relay earlier.
    keys = [load_key(spec) for spec in config.dkim_keys] if dkim_keys is None else dkim_keys
    deliverability = Deliverability(
        ui,
        DeliverabilitySettings.of(config, list(keys)),
        DnsChecker(lambda: make_system_resolver(reactor), reactor),
    )
    sections: dict[str, Section] = {
        "": Dashboard(ui),
        "messages": Messages(ui),
        "deliverability": deliverability,
        "suppressions": Suppressions(ui),
        "queue": Queue(ui),
        "feedback": Feedback(ui),
        "alerts": Alerts(ui, volume),
    }
    return ReportsUI(ui, Authenticator(ui, in_thread), sections)
