"""Benchmarks: pgsidecar against direct TLS and PgBouncer in one run (`python -m bench`)."""
