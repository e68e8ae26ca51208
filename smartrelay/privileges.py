"""``smartrelay-ctl`` run as root acts as the user who owns the relay's data directory.

The Debian package runs the relay as ``smartrelay``; an admin runs ``sudo smartrelay-ctl``.
Had the command stayed root, the files it creates (the SQLite journal next to the database,
a DKIM key, the secret file) would be root's, and the service could no longer open them.
"""

from __future__ import annotations

import os
import pwd


def act_as_data_dir_owner(data_dir: str) -> str | None:
    """As root, switch this process for good to the owner of ``data_dir`` (its primary group
    and supplementary groups too) and return that user's name; otherwise, or when
    ``data_dir`` is root's or missing, change nothing and return None."""
    if os.geteuid() != 0:
        return None
    try:
        uid = os.stat(data_dir).st_uid
    except OSError:
        return None
    if uid == 0:
        return None
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # A data directory owned by a uid without a name: that uid, with its own gid.
        gid = os.stat(data_dir).st_gid
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        _private_umask()
        return str(uid)
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(uid)
    _private_umask()
    return entry.pw_name


def _private_umask() -> None:
    os.umask(os.umask(0) | 0o027)
