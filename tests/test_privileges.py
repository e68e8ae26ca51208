"""``act_as_data_dir_owner``: ``smartrelay-ctl`` run as root acts as the data directory's owner.

Each case runs in a forked child, which switches user for good and then creates a file the way
the CLI would (SQLite journal, DKIM key); the parent checks who owns it. The whole command, as
the Debian package installs it, is run as root by tests/deb/ (``make deb-check``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smartrelay.privileges import act_as_data_dir_owner

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="smartrelay-privileges-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def create_file_as_owner(data_dir: Path) -> tuple[str, int, int]:
    """In a child: switch, create ``data_dir/created``, report the name returned and the
    child's uid and gid through the file's content; returns what the parent reads."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            name = act_as_data_dir_owner(str(data_dir))
            fd = os.open(data_dir / "created", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.write(fd, f"{name}\n{os.getuid()}\n{os.getgid()}\n".encode())
            os.close(fd)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    name, uid, gid = (data_dir / "created").read_text().splitlines()
    return name, int(uid), int(gid)


@needs_root
def test_root_becomes_the_owner_of_the_data_dir(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    data_dir = shared_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, nobody.pw_uid, nobody.pw_gid)
    name, uid, gid = create_file_as_owner(data_dir)
    assert (name, uid, gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)
    created = (data_dir / "created").stat()
    assert (created.st_uid, created.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert created.st_mode & 0o777 == 0o640  # 0666 asked, the service's umask 027 applied


@needs_root
def test_a_nameless_owner_is_taken_by_number(shared_dir: Path) -> None:
    uid = next(u for u in range(64000, 65000) if not _has_user(u))
    data_dir = shared_dir / "data"
    data_dir.mkdir(mode=0o700)
    os.chown(data_dir, uid, uid)
    assert create_file_as_owner(data_dir) == (str(uid), uid, uid)


@needs_root
def test_root_stays_root_for_a_root_or_missing_data_dir(shared_dir: Path) -> None:
    data_dir = shared_dir / "data"
    data_dir.mkdir()
    assert create_file_as_owner(data_dir) == ("None", 0, 0)
    assert act_as_data_dir_owner(str(shared_dir / "missing")) is None
    assert os.geteuid() == 0


def _has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
