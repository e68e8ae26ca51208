"""A delivery process: ``python -m smartrelay.delivery_process --config PATH --index N``.

Started by the main process when ``[delivery] processes`` is set (see
:mod:`smartrelay.delivery.processes`), never by hand. It runs the storage and one delivery
manager (node id: the main node id plus ``-dN``), wakes up when a byte arrives on standard
input, and re-reads its DKIM keys on SIGHUP; the rest is :mod:`smartrelay.child_main`.
"""

from __future__ import annotations

from collections.abc import Sequence

from smartrelay.child_main import MetricsReporter, WakePipe, run

__all__ = ["MetricsReporter", "WakePipe", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    run("delivery", argv)


if __name__ == "__main__":
    main()
