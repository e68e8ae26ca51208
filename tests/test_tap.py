"""``twistd smartrelay``: the plugin's options and service, then the real twistd process.

The process tests run ``twistd -n --pidfile= smartrelay --config CFG`` as an operator would,
read its log as it comes (no fixed sleeps) and stop it with a signal.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from twisted.application.service import IService, IServiceCollection, MultiService

from smartrelay.config import load_config
from smartrelay.relay import RelayService
from smartrelay.storage.migrations import latest_version
from smartrelay.tap import Options, makeService
from smartrelay.threads import GIL_SWITCH_INTERVAL
from tests.conftest import service_missing
from tests.support.relay import free_ports
from tests.support.run import (
    TWISTD,
    assert_cli_error,
    assert_ok,
    ctl,
    query,
    run_twistd,
    running_twistd,
    schema_versions,
    write_config,
    write_relay_config,
)

#: (extra TOML, the dotted key the one-line error must name, a word of the problem)
BAD_CONFIGS = [
    pytest.param("[smtp]\nmax_conections = 5\n", "smtp.max_conections", "unknown key", id="typo"),
    pytest.param(
        '[delivery]\nmax_age = "5 days"\n', "delivery.max_age", "invalid duration", id="duration"
    ),
    pytest.param(
        '[smtp]\nallowed_networks = ["127.0.0.0/8", "10.0.0.300/8"]\n',
        "smtp.allowed_networks[1]",
        "invalid network",
        id="cidr",
    ),
]
#: What the first start on an empty database applies: every schema delta.
ALL_VERSIONS = ", ".join(str(version) for version in range(1, latest_version() + 1))
SIGNALS = [
    pytest.param(signal.SIGTERM, id="SIGTERM"),
    pytest.param(signal.SIGINT, id="SIGINT"),
]


def options(*args: str) -> Options:
    parsed = Options()  # type: ignore[no-untyped-call]  # twisted.python.usage is untyped
    parsed.parseOptions(list(args))  # type: ignore[no-untyped-call]
    return parsed


def clean_exit(returncode: int, signum: signal.Signals) -> bool:
    # A clean stop on SIGINT or SIGTERM exits 0 (twistd alone would kill itself with the
    # signal: status -signum).
    return returncode == 0


# -- unit level -------------------------------------------------------------------------------
def test_options_parse_config() -> None:
    assert options("--config", "etc/relay.toml")["config"] == "etc/relay.toml"
    assert options("-c", "/etc/smartrelay/x.toml")["config"] == "/etc/smartrelay/x.toml"
    assert options()["config"] is None


def test_make_service_builds_the_relay_without_starting_it(tmp_path: Path) -> None:
    config = write_relay_config(tmp_path, f"sqlite:{tmp_path / 'var' / 'relay.db'}")
    service = makeService(options("--config", str(config)))
    assert IService.providedBy(service) and isinstance(service, RelayService)
    assert service.config.path == str(config)
    assert service.config.database.url == f"sqlite:{tmp_path / 'var' / 'relay.db'}"
    assert not service.running
    assert IServiceCollection(service).getServiceNamed("storage") is service.storage
    # Building the tree writes no file: no data dir (database, spool, self-signed
    # certificate), no secret key; and binds nothing (privilegedStartService does).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smartrelay.toml"]
    assert len(service.listeners) == 3
    assert all(listener.port is None for listener in service.listeners)


def test_listeners_bind_in_privileged_start_and_files_are_written_in_start(
    tmp_path: Path,
) -> None:
    """twistd calls privilegedStartService as root, drops to --uid/--gid, then calls
    startService: the ports are bound in the first, the relay's files written in the second."""
    config = write_relay_config(tmp_path, f"sqlite:{tmp_path / 'var' / 'relay.db'}")
    service = makeService(options("--config", str(config)))
    assert isinstance(service, RelayService)
    try:
        # RelayService.privilegedStartService also installs the process's signal handlers;
        # the MultiService part is what binds.
        MultiService.privilegedStartService(service)
        assert all(listener.port is not None for listener in service.listeners)
        assert not service.running and not (tmp_path / "var").exists()
        ports = [listener.port for listener in service.listeners]
        for listener in service.listeners:
            listener.startService()  # what startService does next: listen no second time
        assert [listener.port for listener in service.listeners] == ports
    finally:
        for listener in service.listeners:
            listener.stopService()


def free_privileged_port() -> int:
    """A port below 1024 free on 127.0.0.1 (binding it needs root)."""
    for port in range(1023, 900, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


def connect_when_listening(
    port: int, process: subprocess.Popen[str], timeout: float
) -> socket.socket:
    """A connection to 127.0.0.1:``port`` once ``process`` listens on it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except ConnectionRefusedError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        client.settimeout(timeout)
        return client


def test_twistd_as_root_binds_a_low_port_and_runs_as_another_user(tmp_path: Path) -> None:
    """``twistd --uid nobody --gid nogroup`` started as root (as the Debian package does):
    the SMTP port below 1024 is bound before twistd drops privileges, and every file the
    relay writes (database, secret key, self-signed certificate) belongs to that user."""
    if os.geteuid() != 0:
        service_missing("binding a port below 1024 needs root (CI runs as root)")
    nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    home = Path(tempfile.mkdtemp(prefix="smartrelay-uid-"))  # tmp_path is root's, mode 0700
    try:
        os.chown(home, nobody, nogroup)
        home.chmod(0o755)
        port = free_privileged_port()
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        config = write_relay_config(home, f"sqlite:{home / 'var' / 'relay.db'}", "", endpoint)
        # This machine's Python lives in root's home (mode 0700): what the relay imports
        # lazily after dropping privileges is imported before (a packaged Python in /usr
        # needs none of this).
        preload = (
            "import importlib.readers, encodings.unicode_escape, sys;"
            " from twisted.scripts.twistd import run; run()"
        )
        command = [
            sys.executable,
            "-c",
            preload,
            "-n",
            "--pidfile=",
            "--uid=nobody",
            "--gid=nogroup",
            "smartrelay",
            "--config",
            str(config),
        ]
        with subprocess.Popen(
            command,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as process:
            try:
                with connect_when_listening(port, process, timeout=60) as client:
                    assert client.recv(1024).startswith(b"220 relay.test ESMTP")
                with open(f"/proc/{process.pid}/status") as status:
                    uids = next(line for line in status if line.startswith("Uid:"))
                assert uids.split()[1:] == [str(nobody)] * 4, uids
                deadline = time.monotonic() + 60
                while not (home / "var" / "relay.db").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                process.send_signal(signal.SIGTERM)
                output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert f"smtp: listening on {endpoint}" in output, output
        assert "Traceback" not in output and "fatal" not in output, output
        var = home / "var"
        written = [var, var / "relay.db", var / "secret.key", var / "tls", var / "spool"]
        assert {path.name: path.stat().st_uid for path in written} == {
            path.name: nobody for path in written
        }
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize(("extra", "key", "problem"), BAD_CONFIGS)
def test_make_service_with_a_bad_config_exits_with_one_line(
    tmp_path: Path, extra: str, key: str, problem: str
) -> None:
    config = write_config(tmp_path, f"sqlite:{tmp_path / 'relay.db'}", extra)
    with pytest.raises(SystemExit) as raised:
        makeService(options("--config", str(config)))
    message = raised.value.code
    assert isinstance(message, str)
    assert "\n" not in message
    assert message.startswith(f"smartrelay: {config}: {key}: ")
    assert problem in message


def test_make_service_with_a_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(SystemExit) as raised:
        makeService(options("--config", str(missing)))
    message = raised.value.code
    assert isinstance(message, str)
    assert message.startswith(f"smartrelay: {missing}: cannot read file")
    assert "\n" not in message


def test_database_url_is_redacted_for_logs(tmp_path: Path) -> None:
    url = "postgresql://relay:s3cret-pw@db.example.net:5432/mail"
    database = load_config(write_config(tmp_path, url)).database
    assert database.url == url
    assert database.redacted_url == "postgresql://relay:***@db.example.net:5432/mail"


# -- the twistd process -----------------------------------------------------------------------
@pytest.mark.parametrize("signum", SIGNALS)
def test_twistd_starts_and_stops_on_a_signal(
    tmp_path: Path, database_url: str, signum: signal.Signals
) -> None:
    config = write_relay_config(tmp_path, database_url)
    with running_twistd(config, tmp_path) as server:
        ready = server.wait_for("database ready")
        start = server.wait_for("SmartRelay")
        assert f"config={config}" in start
        assert f"database={database_url}" in start
        assert database_url in ready
        assert ready.endswith(f"schema version {latest_version()} (applied {ALL_VERSIONS})")
        returncode = server.stop(signum, timeout=10)
        output = server.output
    assert clean_exit(returncode, signum), output
    assert f"Received {signum.name}" in output
    assert "database closed" in output.split(f"Received {signum.name}")[1]
    assert "start-up objects frozen for the garbage collector: " in output  # gc_freeze.py
    assert "Traceback" not in output and "Unhandled" not in output and "fatal" not in output


def test_second_start_reuses_the_database(tmp_path: Path, database_url: str) -> None:
    config = write_relay_config(tmp_path, database_url)
    with running_twistd(config, tmp_path) as first:
        assert f"(applied {ALL_VERSIONS})" in first.wait_for("database ready")
        assert clean_exit(first.stop(signal.SIGTERM), signal.SIGTERM), first.output

    kept = ctl(config, "suppression", "add", "kept@example.com", "--note", "between runs")
    assert assert_ok(kept).stdout == "kept@example.com suppressed (manual)\n"

    with running_twistd(config, tmp_path) as second:
        ready = second.wait_for("database ready")
        assert ready.endswith(f"schema version {latest_version()}"), ready
        assert "applied" not in ready
        rows = query(database_url, "SELECT address, note FROM suppressions")
        assert rows == [("kept@example.com", "between runs")]
        assert clean_exit(second.stop(signal.SIGTERM), signal.SIGTERM), second.output
        assert "Traceback" not in second.output
    assert schema_versions(database_url) == list(range(1, latest_version() + 1))


def test_unreachable_database_is_fatal_and_the_password_stays_hidden(tmp_path: Path) -> None:
    config = write_relay_config(tmp_path, "postgresql://relay:s3cret-pw@127.0.0.1:1/nodb")
    result = run_twistd(config, tmp_path)
    assert result.returncode == 1, result.describe()
    fatal = [line for line in result.lines if "fatal:" in line]
    assert len(fatal) == 1, result.describe()
    assert "cannot open database postgresql://relay:***@127.0.0.1:1/nodb" in fatal[0]
    assert "database=postgresql://relay:***@127.0.0.1:1/nodb" in result.stdout
    assert "s3cret-pw" not in result.stdout
    assert "Traceback" not in result.stdout


def test_unopenable_sqlite_database_is_fatal(tmp_path: Path) -> None:
    not_a_database = tmp_path / "garbage.db"
    not_a_database.write_bytes(b"this is not an SQLite database, just some text\n" * 100)
    result = run_twistd(write_relay_config(tmp_path, f"sqlite:{not_a_database}"), tmp_path)
    assert result.returncode == 1, result.describe()
    fatal = [line for line in result.lines if "fatal:" in line]
    assert len(fatal) == 1, result.describe()
    assert f"cannot open database sqlite:{not_a_database}" in fatal[0]
    assert "Traceback" not in result.stdout


def test_listen_address_in_use_is_fatal(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        config = write_relay_config(
            tmp_path, f"sqlite:{tmp_path / 'relay.db'}", smtp_listen=endpoint
        )
        result = run_twistd(config, tmp_path)
    assert result.returncode == 1, result.describe()
    # Bound in makeService, before twistd starts logging: just the one line.
    assert len(result.lines) == 1, result.describe()
    assert result.lines[0].startswith(f"smartrelay: smtp: cannot listen on {endpoint}: ")
    assert "Address already in use" in result.lines[0]


@pytest.mark.parametrize(("extra", "key", "problem"), BAD_CONFIGS)
def test_twistd_with_a_bad_config_prints_one_line(
    tmp_path: Path, extra: str, key: str, problem: str
) -> None:
    config = write_config(tmp_path, f"sqlite:{tmp_path / 'relay.db'}", extra)
    result = run_twistd(config, tmp_path)  # stdout and stderr together
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stdout
    assert len(result.lines) == 1, result.describe()
    assert result.lines[0].startswith(f"smartrelay: {config}: {key}: "), result.describe()
    assert problem in result.lines[0]
    assert not (tmp_path / "relay.db").exists()


# -- start and stop rough edges (issue 11, item 15) ------------------------------------------
def test_ctrl_c_with_delivery_processes_exits_0_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole process group: twistd and its delivery
    process. The child then got SIGTERM from its parent too, and stopping its reactor twice
    logged a critical ReactorNotRunning traceback."""
    config = write_relay_config(
        tmp_path, f"sqlite:{tmp_path / 'relay.db'}", "[delivery]\nprocesses = 1\n"
    )
    with running_twistd(config, tmp_path, new_session=True) as server:
        server.wait_for("delivery[0] delivery: node", timeout=60)
        os.killpg(server.process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        returncode = server.wait(timeout=60)
        output = server.output
    assert returncode == 0, output
    assert "delivery[0] Received SIGINT" in output
    assert "Received SIGINT, shutting down." in output
    for bad in ("Traceback", "ReactorNotRunning", "critical", "Unhandled"):
        assert bad not in output, output
    assert output.count("database closed") == 2  # the child's and the main process's


def twistd_daemon(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``twistd`` without ``-n``: forks, and the parent exits once the child has started."""
    return subprocess.run(
        [
            str(TWISTD),
            f"--pidfile={cwd / 'twistd.pid'}",
            f"--logfile={cwd / 'twistd.log'}",
            "smartrelay",
            "--config",
            str(config),
        ],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_daemon_with_the_smtp_port_taken_exits_1_and_leaves_no_pidfile(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        config = write_relay_config(
            tmp_path, f"sqlite:{tmp_path / 'relay.db'}", smtp_listen=endpoint
        )
        result = twistd_daemon(config, tmp_path)
    assert result.returncode == 1, result
    output = (result.stdout + result.stderr).splitlines()
    assert len(output) == 1, result
    assert output[0].startswith(f"smartrelay: smtp: cannot listen on {endpoint}: "), result
    assert not (tmp_path / "twistd.pid").exists()


def test_daemon_serves_on_listeners_bound_before_it_forked(tmp_path: Path) -> None:
    """The listeners are bound in makeService, before twistd forks: the daemon serves them,
    and stops on SIGTERM with its pid file removed."""
    (smtp_port,) = free_ports(1)
    endpoint = f"tcp:{smtp_port}:interface=127.0.0.1"
    config = write_relay_config(tmp_path, f"sqlite:{tmp_path / 'relay.db'}", smtp_listen=endpoint)
    result = twistd_daemon(config, tmp_path)
    assert result.returncode == 0 and result.stdout == result.stderr == "", result
    pidfile = tmp_path / "twistd.pid"
    pid = int(pidfile.read_text())
    try:
        with socket.create_connection(("127.0.0.1", smtp_port), timeout=15) as client:
            client.settimeout(15)
            assert client.recv(1024).startswith(b"220 relay.test ESMTP")
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pidfile.exists()
    log = (tmp_path / "twistd.log").read_text()
    assert "Received SIGTERM, shutting down." in log and "Traceback" not in log


def test_daemon_that_fails_after_starting_removes_its_pidfile(tmp_path: Path) -> None:
    """The database is opened after twistd has daemonised (the parent has exited 0): the
    child logs the one-line fatal error, exits 1 and removes its pid file."""
    config = write_relay_config(tmp_path, "postgresql://relay:pw@127.0.0.1:1/nodb")
    result = twistd_daemon(config, tmp_path)
    assert result.returncode == 0, result
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    deadline = time.monotonic() + 30
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pidfile.exists(), logfile.read_text()
    log = logfile.read_text()
    fatal = [line for line in log.splitlines() if "fatal:" in line]
    assert len(fatal) == 1 and "cannot open database" in fatal[0], log
    assert "Traceback" not in log


def test_sqlite_file_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir"
    config = write_relay_config(tmp_path, f"sqlite:{missing / 'x.db'}")
    result = run_twistd(config, tmp_path)
    assert result.returncode == 1, result.describe()
    fatal = [line for line in result.lines if "fatal:" in line]
    assert len(fatal) == 1, result.describe()
    assert fatal[0].endswith(
        f"cannot open database sqlite:{missing / 'x.db'}: directory {missing} does not exist"
    )
    assert not (tmp_path / "nonexistent").exists()  # nothing created on the way
    error = assert_cli_error(ctl(config, "migrate"), f"directory {missing} does not exist")
    assert error.startswith(f"smartrelay-ctl: error: cannot open database sqlite:{missing}")
    assert not (tmp_path / "nonexistent").exists()


def test_sqlite_file_in_the_data_dir_creates_it(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "var"
    database = f"sqlite:{data_dir / 'relay.db'}"
    config = write_config(
        tmp_path,
        database,
        f"[server]\ndata_dir = {json.dumps(str(data_dir))}\n"
        "[smtp]\nlisten = []\n[inbound]\nlisten = []\n"
        '[web]\nlisten = "tcp:0:interface=127.0.0.1"\n'
        f"[rewrap]\nsecret_file = {json.dumps(str(tmp_path / 'secret.key'))}\n",
    )
    assert_ok(ctl(config, "migrate"))  # the CLI may create it too
    assert (data_dir / "relay.db").is_file()
    (data_dir / "relay.db").unlink()
    data_dir.rmdir()
    with running_twistd(config, tmp_path) as server:
        server.wait_for("database ready", timeout=60)
        assert (data_dir / "relay.db").is_file()
        assert server.stop(signal.SIGTERM) == 0, server.output


def test_a_dead_feedback_mailbox_is_one_line_and_retried_while_the_relay_runs(
    tmp_path: Path,
) -> None:
    """[[feedback.mailboxes]] is accepted (issue 14): a mailbox whose server is down is one
    log line per try, without its password, and the relay runs on and stops cleanly."""
    (port,) = free_ports(1)  # nothing listens there
    config = write_relay_config(
        tmp_path,
        f"sqlite:{tmp_path / 'relay.db'}",
        f'[[feedback.mailboxes]]\nurl = "pop3s://u:hunter2@127.0.0.1:{port}"\n',
    )
    with running_twistd(config, tmp_path) as server:
        line = server.wait_for(f"mailbox pop3s://u@127.0.0.1:{port}: Conn", timeout=60)
        assert "ConnectionRefusedError: Connection refused; trying again in 10 s" in line
        assert server.stop(signal.SIGTERM) == 0, server.output
    assert "hunter2" not in server.output
    assert "Traceback" not in server.output


def test_a_secret_file_that_cannot_be_created_at_start_is_one_fatal_line(tmp_path: Path) -> None:
    """The secret key file is created when the relay starts (as the user it runs as), no
    longer while twistd builds the service tree: a problem with it is one fatal log line and
    exit status 1, as a database that cannot be opened is."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the secret's folder should be\n")
    config = write_relay_config(
        tmp_path,
        f"sqlite:{tmp_path / 'relay.db'}",
        f"[rewrap]\nsecret_file = {json.dumps(str(blocked / 'secret.key'))}\n",
    )
    # write_relay_config has its own [rewrap]: the extra table replaces it.
    text = config.read_text().replace(
        f"[rewrap]\nsecret_file = {json.dumps(str(tmp_path / 'var' / 'secret.key'))}\n", "", 1
    )
    config.write_text(text)
    result = run_twistd(config, tmp_path)
    assert result.returncode == 1, result.describe()
    fatal = [line for line in result.lines if "fatal:" in line]
    assert len(fatal) == 1, result.describe()
    assert str(blocked) in fatal[0], result.describe()
    assert "Traceback" not in result.stdout, result.describe()
    assert not (tmp_path / "relay.db").exists()  # nothing started


def test_the_relay_process_waits_less_for_the_gil(tmp_path: Path) -> None:
    """The reactor thread gets the GIL back within GIL_SWITCH_INTERVAL of a C call that let
    it go, not Python's default 5 ms (docs/performance.md, "The GIL")."""
    config = write_relay_config(tmp_path, f"sqlite:{tmp_path / 'var' / 'relay.db'}")
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        makeService(options("--config", str(config)))
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL)
        assert GIL_SWITCH_INTERVAL < 0.005
    finally:
        sys.setswitchinterval(before)
