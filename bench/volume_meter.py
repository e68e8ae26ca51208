"""The volume meter's cost (smartrelay/smtp/volume.py): time per accepted message and memory
per tracked credential.

    .venv/bin/python bench/volume_meter.py [--messages 1000000] [--credentials 10000]

Counts ``--messages`` messages spread over ``--credentials`` credentials and 6 hours of
simulated time (10-minute windows: buckets expire, windows close and are learned), then
measures with tracemalloc the memory of a meter holding ``--credentials`` credentials. A
couple of seconds on a laptop core.
"""

from __future__ import annotations

import argparse
import random
import time
import tracemalloc

from smartrelay.smtp.volume import VolumeMeter, VolumeSettings

SETTINGS = VolumeSettings(action="warn", factor=10.0, minimum=100, window=600.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--credentials", type=int, default=10_000)
    args = parser.parse_args()
    rng = random.Random(1)
    names = [f"credential-{i}" for i in range(args.credentials)]
    # A few busy credentials and a long tail, as real traffic has.
    who = [names[min(int(rng.paretovariate(1.2)) - 1, len(names) - 1)] for _ in range(10_000)]
    start = 1_700_000_000.0
    step = 6 * 3600 / args.messages
    meter = VolumeMeter(SETTINGS, max_tracked=args.credentials)
    began = time.perf_counter()
    for i in range(args.messages):
        meter.count(who[i % len(who)], start + i * step)
    took = time.perf_counter() - began
    print(f"count(): {took / args.messages * 1e9:,.0f} ns per message ({args.messages:,} messages)")

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    full = VolumeMeter(SETTINGS, max_tracked=args.credentials)
    for i, name in enumerate(names):
        full.count(name, start + i * 0.001)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(
        f"memory: {used / len(full):,.0f} bytes per credential"
        f" ({len(full):,} tracked, {used / 1e6:,.1f} MB in all)"
    )


if __name__ == "__main__":
    main()
