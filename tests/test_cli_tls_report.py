"""`smartrelay-ctl tls-report`: a day's MTA-STS TLS results, run as the real console script
(both engines)."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from twisted.internet.threads import deferToThread

from smartrelay.storage.mta_sts import TlsResult
from smartrelay.storage.store import Store
from tests.support.run import Result, ctl


async def run(config: Path, *args: str) -> Result:
    result: Result = await deferToThread(ctl, config, *args)
    return result


@pytest_twisted.ensureDeferred
async def test_tls_report_lists_a_days_results(
    store: Store, database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    ok = TlsResult("2026-12-05", "a.test", "20261205", "enforce", "success", "mx1.a.test")
    bad = TlsResult(
        "2026-12-05",
        "a.test",
        "20261205",
        "enforce",
        "certificate-host-mismatch",
        "mx2.a.test",
        "certificate not valid for mx2.a.test (it names evil\x1b.test)",
    )
    fetch = TlsResult("2026-12-06", "b.test", "7", "", "sts-policy-fetch-error", "", "HTTP 500")
    await store.add_tls_results([ok, ok, bad])
    await store.add_tls_results([ok, fetch])

    listed = await run(config, "tls-report", "--day", "2026-12-05")
    assert listed.returncode == 0, listed.describe()
    assert listed.stdout.splitlines() == [
        "2026-12-05\ta.test\tpolicy=20261205\tmode=enforce\tcertificate-host-mismatch"
        "\tmx=mx2.a.test\tsessions=1"
        "\tcertificate not valid for mx2.a.test (it names evil\\x1b.test)",
        "2026-12-05\ta.test\tpolicy=20261205\tmode=enforce\tsuccess\tmx=mx1.a.test\tsessions=3",
    ]
    other = await run(config, "tls-report", "--day", "2026-12-06", "--domain", "B.test")
    assert other.stdout.splitlines() == [
        "2026-12-06\tb.test\tpolicy=7\tmode=-\tsts-policy-fetch-error\tmx=-\tsessions=1\tHTTP 500"
    ]
    none = await run(config, "tls-report", "--day", "2026-12-06", "--domain", "a.test")
    assert none.returncode == 0 and none.stdout == "no TLS results for 2026-12-06 and a.test\n"
    bad_day = await run(config, "tls-report", "--day", "yesterday")
    assert bad_day.returncode == 1
    assert bad_day.stderr == (
        "smartrelay-ctl: error: --day 'yesterday' is not a date (use e.g. 2026-12-05)\n"
    )
