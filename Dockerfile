# pgsidecar: a PostgreSQL sidecar proxy. Small, non-root, healthchecked on /livez.
#   docker build -t pgsidecar .
#   docker run --rm -p 6432:6432 -p 9188:9188 \
#     -e PGSIDECAR_UPSTREAM_DSN="postgresql://db.example.com:5432/app?sslmode=verify-full&sslrootcert=system" \
#     -e PGSIDECAR_LISTEN_HOST=0.0.0.0 \
#     -v "$PWD/pgsidecar.yaml:/etc/pgsidecar/pgsidecar.yaml:ro" pgsidecar
# tests/unit/test_dockerfile.py runs this file's build-stage RUN steps in a fresh virtualenv.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pgsidecar ./pgsidecar
# Dependencies come from pyproject.toml; the project goes in as a wheel built from this tree.
RUN python -m venv /opt/pgsidecar \
 && /opt/pgsidecar/bin/pip wheel --no-deps --wheel-dir /tmp/wheels . \
 && /opt/pgsidecar/bin/pip install /tmp/wheels/pgsidecar-*.whl
RUN /opt/pgsidecar/bin/pgsidecar version

FROM python:3.12-slim
LABEL org.opencontainers.image.title="pgsidecar" \
      org.opencontainers.image.description="PostgreSQL sidecar: transparent reconnects and a record of every drop"
RUN groupadd --system --gid 10001 pgsidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin pgsidecar \
 && mkdir -p /etc/pgsidecar
COPY --from=build /opt/pgsidecar /opt/pgsidecar
# The defaults file documents every key; mount your own over it, or set PGSIDECAR_* variables.
COPY config/pgsidecar.yaml /etc/pgsidecar/pgsidecar.yaml
ENV PATH=/opt/pgsidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PGSIDECAR_CONFIG=/etc/pgsidecar/pgsidecar.yaml \
    PGSIDECAR_METRICS_LISTEN=0.0.0.0:9188 \
    PGSIDECAR_LOG_FORMAT=json
USER 10001:10001
EXPOSE 6432 9188
# No curl in a slim image: the interpreter is already there.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9188/livez', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgsidecar", "run"]
