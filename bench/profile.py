"""`python -m bench.profile`: where pgsidecar spends its CPU under pgbench -S -c16.

Starts the same stack as the benchmark, runs pgbench through pgsidecar while py-spy samples the
sidecar (native-free, low overhead), and prints the functions with the most samples as the leaf
frame ("own time") and the most inclusive samples. py-spy is not a dependency of pgsidecar:
`pip install py-spy` first. BENCH_SIDECAR_PROFILE=out.prof (cProfile) works with the benchmark too.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile

from bench.stack import Stack
from bench.workloads import pgbench_init


def _own_and_total(raw: str) -> tuple[collections.Counter, collections.Counter, int]:
    """py-spy's raw format: `frame;frame;...;leaf count` per line, root first."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # "func (file.py:123)" -> "func (file.py)": own time per function, not per line.
        frames = [
            frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") and ":" in frame else frame
            for frame in stack.split(";")
        ]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--native", action="store_true", help="py-spy --native: C frames too")
    parser.add_argument("--pgbench", default="-S -c16 -j2 -M simple", help="pgbench options")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=sys.prefix + "/bin")
    if pyspy is None:
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    stack = Stack()
    try:
        stack.start()
        pgbench_init(stack, 10)
        out = tempfile.mktemp(suffix=".txt")
        spy = subprocess.Popen(
            [
                pyspy,
                "record",
                "--format",
                "raw",
                "--rate",
                "250",
                "-o",
                out,
                "--pid",
                str(stack.proxy_pid("pgsidecar")),
                "--duration",
                str(args.seconds + 1),
            ]
            + (["--native"] if args.native else []),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        bench = subprocess.run(
            ["pgbench", "-n", "-T", str(args.seconds), *args.pgbench.split()],
            env=stack.env("pgsidecar"),
            capture_output=True,
            text=True,
        )
        spy.wait(args.seconds + 60)
        print(next((line for line in bench.stdout.splitlines() if line.startswith("tps")), bench.stderr))
        with open(out) as fh:
            own, total, samples = _own_and_total(fh.read())
    finally:
        stack.stop()
    print(f"{samples} samples")
    print(f"\ntop {args.top} by own time (leaf samples):")
    for frame, count in own.most_common(args.top):
        print(f"{100 * count / samples:6.1f}%  {frame}")
    print(f"\ntop {args.top} inclusive:")
    for frame, count in total.most_common(args.top):
        print(f"{100 * count / samples:6.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
