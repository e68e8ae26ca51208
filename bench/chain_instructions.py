"""Instructions the re-wrap chain executes per copy, counted by valgrind (callgrind).

Time per copy moves by 10-20% from run to run on a shared VM; the count of instructions does
not (the same code on the same messages gives the same count to within 0.1%), so a change
worth 2% shows. The chain is built as `bench/rewrap_chain.py` builds it, with the content
checks on, and the RSA operation left out: in the relay it runs on another thread, in C.

The script runs itself twice under ``valgrind --tool=callgrind`` (``PYTHONHASHSEED=0``): both
runs import the same modules, load the same key and generate the same ``--to`` load
messages, then re-wrap the first ``--from`` or the first ``--to`` of them, one recipient each.
The difference of the two counts over ``--to`` minus ``--from`` copies is the chain's
instructions per copy, start-up and the load's generation cancelled out.

    .venv/bin/python bench/chain_instructions.py [--shape transactional|newsletter]
        [--from 20] [--to 60]          # ~40 s (newsletter: --from 5 --to 25, ~70 s)

Needs valgrind (``apt-get install valgrind``). Instructions are not time: a regex or a
``bytes.replace`` does more per instruction than the interpreter's loop, and cache misses and
GIL hand-overs in the relay are not counted; `make bench` says what the relay does end to end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.defer import Deferred

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load import LOADS
from rewrap_chain import bench_chain, jobs

from smartrelay.config import DkimKey
from smartrelay.events import WarningEvent
from smartrelay.rewrap import dkim
from smartrelay.rewrap.chain import RewrapResult
from smartrelay.tokens import TokenCodec, load_keyring

_COLLECTED = re.compile(r"Collected : (\d+)")


def run_chain(directory: str, shape: str, generated: int, wrapped: int) -> None:
    """Generate ``generated`` load messages and re-wrap the first ``wrapped`` of them."""
    key_path = os.path.join(directory, "example.com.bench.pem")
    signer = dkim.DkimSigner([DkimKey("example.com", "bench", key_path)])
    setattr(dkim.LoadedKey, "sign_digest", lambda self, digest: bytes(256))  # noqa: B010
    codec = TokenCodec(load_keyring(os.path.join(directory, "secret.key")))

    async def record_warnings(queue_id: str, event: WarningEvent) -> bool:
        return True

    chain = bench_chain(signer, codec, record_warnings)
    work = jobs(generated, 1, 1, False, 1, shape)[:wrapped]
    results: list[RewrapResult] = []
    for message, recipients in work:
        Deferred.fromCoroutine(chain.run(message, recipients)).addCallback(results.append)
    assert sum(len(r.copies) for r in results) == wrapped


def count(directory: str, shape: str, generated: int, wrapped: int) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--inner",
        directory,
        "--shape",
        shape,
        "--to",
        str(generated),
        "--from",
        str(wrapped),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"valgrind failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(LOADS), default="transactional")
    parser.add_argument("--from", dest="first", type=int, help="default 20 (newsletter: 5)")
    parser.add_argument("--to", dest="last", type=int, help="default 60 (newsletter: 25)")
    parser.add_argument("--inner", help=argparse.SUPPRESS)  # the run under valgrind
    args = parser.parse_args()
    newsletter = args.shape == "newsletter"
    first = args.first if args.first is not None else (5 if newsletter else 20)
    last = args.last if args.last is not None else (25 if newsletter else 60)
    if args.inner is not None:
        run_chain(args.inner, args.shape, last, first)
        return
    if not 0 <= first < last:
        parser.error("--from must be below --to")
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="smartrelay-bench-instructions-") as directory:
        key_path, _ = dkim.generate_key("example.com", "bench", "rsa", directory)
        assert key_path == os.path.join(directory, "example.com.bench.pem")
        load_keyring(os.path.join(directory, "secret.key"))
        fewer = count(directory, args.shape, last, first)
        more = count(directory, args.shape, last, last)
    per_copy = (more - fewer) / (last - first)
    print(
        f"{args.shape}: {per_copy:,.0f} instructions per copy"
        f" (copies {first + 1}-{last} of the load; {fewer:,} and {more:,} in all)"
    )


if __name__ == "__main__":
    main()
