from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.sidecar",
    "tests.fixtures.faults",
    "tests.fixtures.netns",
    "tests.fixtures.pgbouncer",
]
