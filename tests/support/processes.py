"""A relay's child processes as /proc shows them (delivery and accepting processes)."""

from __future__ import annotations

import os
import signal

from tests.support.run import Twistd
from tests.support.traffic import wait_until


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_and_see_the_children_leave(relay: Twistd) -> None:
    """SIGKILL the relay's main process; orphaned, each child sees its pipe from the main
    process close and stops by itself (within 30 s)."""
    children = children_of(relay.process.pid)
    relay.process.send_signal(signal.SIGKILL)
    assert relay.wait(10) == -signal.SIGKILL
    wait_until(
        lambda: True if not any(alive(child) for child in children) else None,
        "the children to stop after the main process was killed",
        timeout=30,
    )


def stop_and_see_the_children_leave(relay: Twistd) -> None:
    """SIGTERM the relay: it shuts down cleanly and its children are gone when it has."""
    children = children_of(relay.process.pid)
    # twistd re-raises the signal that stopped it after a clean shutdown.
    assert relay.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    assert "Server Shut Down." in relay.output
    assert not any(alive(child) for child in children)


def kill_one_child(relay: Twistd, count: int) -> int:
    """SIGKILL one of the relay's ``count`` children; its pid."""
    children = children_of(relay.process.pid)
    assert len(children) == count, children
    victim = min(children)
    os.kill(victim, signal.SIGKILL)
    return victim


def see_it_started_again(relay: Twistd, victim: int, count: int, timeout: float) -> None:
    """The relay says it restarts the killed child, and has ``count`` children again."""
    relay.wait_for("starting it again in 1 s")
    wait_until(
        lambda: True if len(children_of(relay.process.pid) - {victim}) == count else None,
        "the child started again",
        timeout=timeout,
    )
