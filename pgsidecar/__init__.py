"""pgsidecar: a PostgreSQL sidecar proxy that hides connection drops between transactions."""

from __future__ import annotations

__version__ = "0.1.0"
