"""An accepting process: ``python -m smartrelay.listener_process --config PATH --index N``.

Started by the main process when ``[smtp] processes`` is set (see
:mod:`smartrelay.smtp.processes`), never by hand: the listening sockets of ``[smtp] listen``
are its file descriptors 3, 4, ... It runs the storage and the submission listener on them,
and re-reads its TLS certificates on SIGHUP; the rest is :mod:`smartrelay.child_main`.
"""

from __future__ import annotations

from collections.abc import Sequence

from smartrelay.child_main import run

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    run("listener", argv)


if __name__ == "__main__":
    main()
