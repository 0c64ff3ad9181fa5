"""pgsidecar: a PostgreSQL sidecar proxy that hides connection drops between transactions."""

__version__ = "0.1.0"
