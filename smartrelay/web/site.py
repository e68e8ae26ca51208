"""The root resource of the ``[web] listen`` site: one Klein app that mounts the web apps.

=====================  ==========================================================
path                   app
=====================  ==========================================================
``/o/``, ``/c/``,      :class:`~smartrelay.web.tracking.Tracking` (SPEC section 4), also
``/u/``, anything      the answer to every path no other app claims: its own 404 page,
else                   never a traceback
``/ui/``               :class:`~smartrelay.web.ui.app.ReportsUI` (login, dashboard, ...)
``/api/``              :class:`~smartrelay.web.api.EventApi` (``GET /api/events``,
                       docs/api.md)
``/metrics``           :class:`~smartrelay.web.metrics.MetricsEndpoint` (docs/metrics.md;
                       with ``[api] metrics = false``, tracking's 404)
=====================  ==========================================================

Tracking's routes carry their whole paths (``/o/<token>.gif``), so it is mounted on the
branch ``/`` (Klein passes the path on untouched). An app mounted later gets a branch route of
its own, more specific than ``/`` so it wins, and sees the path below its mount point (Klein
moves the mount's segments to ``request.prepath``)::

    @app.route("/ui/", branch=True)
    def reports(self, request: IRequest) -> IResource:
        return self._reports.app.resource()   # its routes are "/", "/messages", ...

The site itself (no ``Server`` header, no tracebacks, the access log, connection limits) is
:mod:`smartrelay.web.service`.
"""

from __future__ import annotations

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from smartrelay.web.api import EventApi
from smartrelay.web.metrics import MetricsEndpoint
from smartrelay.web.tracking import Tracking
from smartrelay.web.ui.app import ReportsUI

__all__ = ["WebRoot"]


class WebRoot:
    """The apps served on ``[web] listen``; :meth:`resource` is the site's root resource."""

    app = Klein()

    def __init__(
        self,
        tracking: Tracking,
        reports: ReportsUI | None = None,
        metrics: MetricsEndpoint | None = None,
        api: EventApi | None = None,
    ) -> None:
        self._tracking = tracking.app.resource()
        self._reports = None if reports is None else reports.app.resource()
        self._metrics = metrics
        self._api = None if api is None else api.app.resource()

    def resource(self) -> IResource:
        return self.app.resource()

    @app.route("/", branch=True)
    def tracking(self, request: IRequest) -> IResource:
        """``/o/``, ``/c/``, ``/u/`` and every path no other app claims."""
        return self._tracking

    @app.route("/ui/", branch=True)
    def reports(self, request: IRequest) -> IResource:
        """The reports UI (``/ui`` without its slash is redirected here by Klein)."""
        return self._tracking if self._reports is None else self._reports

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> IResource | Deferred[bytes]:
        """Prometheus metrics (``[api] metrics``; else tracking's 404)."""
        if self._metrics is None:
            return self._tracking
        return self._metrics.serve(request)

    @app.route("/api/", branch=True)
    def api(self, request: IRequest) -> IResource:
        """The event export (docs/api.md)."""
        return self._tracking if self._api is None else self._api
