"""The reports UI (``{base_url}/ui/``): see :mod:`smartrelay.web.ui.app` and docs/web-ui.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from smartrelay.config import Config
from smartrelay.feedback.processor import FeedbackProcessor
from smartrelay.reactor import IRelayReactor
from smartrelay.storage.store import Store
from smartrelay.web.templating import Templates
from smartrelay.web.ui.app import ReportsUI, Section
from smartrelay.web.ui.auth import Authenticator
from smartrelay.web.ui.context import UiContext
from smartrelay.web.ui.dashboard import Dashboard
from smartrelay.web.ui.feedback import Feedback
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
) -> ReportsUI:
    """The reports UI of this config; its templates are compiled now (a broken one raises
    :class:`~smartrelay.web.templating.TemplateError`). ``feedback_processor`` (the relay's)
    lets the feedback page reprocess a report."""

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
        },
    )

    sections: dict[str, Section] = {
        "": Dashboard(ui),
        "suppressions": Suppressions(ui),
        "queue": Queue(ui),
        "feedback": Feedback(ui),
    }
    return ReportsUI(ui, Authenticator(ui, in_thread), sections)
