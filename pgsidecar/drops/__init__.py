"""Drop forensics, pure: classify why an upstream connection ended, record it, report on records.

No sockets, no clocks: times arrive as epoch floats inside the evidence (docs/architecture.md,
"The drop path").
"""

from __future__ import annotations

from pgsidecar.drops.causes import DropCause, hint_for
from pgsidecar.drops.classify import (
    Classification,
    Evidence,
    Observed,
    ReconnectOutcome,
    classify,
)
from pgsidecar.drops.record import (
    ClientInfo,
    DropRecord,
    DropRecordError,
    UpstreamInfo,
    human_line,
)

__all__ = [
    "Classification",
    "ClientInfo",
    "DropCause",
    "DropRecord",
    "DropRecordError",
    "Evidence",
    "Observed",
    "ReconnectOutcome",
    "UpstreamInfo",
    "classify",
    "hint_for",
    "human_line",
]
