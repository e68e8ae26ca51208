"""Run `bench/relay.py` on several commits, one after another, and print their summary rows.

    .venv/bin/python bench/commits.py [--runs 2] [--bench-of COMMIT] COMMIT... -- [relay.py args]

Each commit is checked out into a temporary git worktree and benchmarked from there with this
checkout's venv (PYTHONPATH and the working directory point at the worktree, so the relay,
its delivery processes and the benchmark script are that commit's code). Runs alternate
between the commits, every other round in reverse (A B C, C B A, A B C, ...), so that a
change of the machine's speed during the runs (this VM's drifts by half within an hour)
spreads over all of them rather than favouring the commit that always runs later. What a
commit's rows say comes from its own bench/relay.py output: the summary table, and each
SmartRelay's phase (a) line with its CPU split (main process, delivery processes);
docs/performance.md's tables are made from this output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worktree(commit: str, base: Path) -> Path:
    path = base / commit
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), commit],
        check=True,
    )
    return path


def summary(output: str) -> list[str]:
    """The rows of the run's final table (from the line after its units line)."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if line.strip().startswith("msg/s"):
            rows = []
            for row in lines[index + 1 :]:
                if not row.strip() or row.startswith(("ratio", "accepted:")):
                    break
                rows.append(row)
            ratios = [row for row in lines if row.startswith("ratio")]
            cpu = [row.strip() for row in lines if "accepted" in row and "main process" in row]
            return rows + ratios + cpu
    return ["(no summary: the run failed)", *lines[-15:]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each commit")
    parser.add_argument(
        "--bench-of",
        metavar="COMMIT",
        help="run this commit's bench/ scripts on every commit (for options older ones lack)",
    )
    parser.add_argument("commits", nargs="+", help="commits, then -- and bench/relay.py args")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1 :]
    with tempfile.TemporaryDirectory(prefix="smartrelay-commits-") as base:
        trees: dict[str, Path] = {}
        try:
            for commit in args.commits:
                trees[commit] = worktree(commit, Path(base))
                if args.bench_of:
                    subprocess.run(
                        ["git", "-C", str(trees[commit]), "checkout", args.bench_of, "--", "bench"],
                        check=True,
                    )
            for run in range(1, args.runs + 1):
                order = list(trees.items())
                for commit, tree in order if run % 2 else reversed(order):
                    env = dict(os.environ, PYTHONPATH=str(tree))
                    done = subprocess.run(
                        [sys.executable, str(tree / "bench" / "relay.py"), *bench_args],
                        cwd=tree,
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                    load = os.getloadavg()[0]
                    print(f"== {commit} run {run} (1-minute load after: {load:.2f})", flush=True)
                    for row in summary(done.stdout + done.stderr):
                        print("   " + row, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                    check=False,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
