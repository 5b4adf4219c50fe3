# syntax=docker/dockerfile:1
# callingbox-exporter container image.
#
#   docker build -t callingbox-exporter:0.1.0 .
#   docker run --rm -p 9860:9860 callingbox-exporter:0.1.0 --demo
#
# Two stages: the first turns the project and every dependency into wheels; the second installs
# those wheels with --no-index, so the final image has no compiler, no build tools, no source tree
# and needs no network at install time. tests/test_container.py runs the same two pip commands
# outside Docker (this machine has no engine) and starts the result as uid 65532 with a read-only
# file system around the state directory.
#
# Python 3.11, the version the project is developed and tested on, so the test above installs the
# very wheels (cp311) that this build installs.

FROM python:3.11.14-slim-trixie AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (README.md is the package's long description).
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
# Every dependency ships binary wheels for amd64 and arm64. On an architecture without them,
# add build-essential to this stage only: the final stage installs the wheels it produced.
RUN pip wheel --wheel-dir /wheels .


FROM python:3.11.14-slim-trixie

# VERSION must be the package's version (exporter/__init__.py): the install below pins it, so the
# label cannot disagree with what is installed. Set the others at build time:
# --build-arg REVISION=$(git rev-parse HEAD)
# --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ) --build-arg SOURCE=<repository URL>
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="callingbox-exporter" \
      org.opencontainers.image.description="Prometheus exporter for CallingBox AI phone calls: exact counters from GET /v1/calls" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-trixie"

# Nothing is written at run time but the state file: no .pyc (pip compiled them at install),
# unbuffered logs, no pip self-check.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# The wheels are bind-mounted from the build stage, so they never become a layer of this image.
# The state directory belongs to the runtime user; it is the only place the exporter writes
# (state_file: /var/lib/callingbox-exporter/<org>.db, a SQLite database with its -wal and -shm
# files beside it).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "callingbox-exporter==${VERSION}" \
    && mkdir -p /var/lib/callingbox-exporter \
    && chown 65532:65532 /var/lib/callingbox-exporter \
    && chmod 0750 /var/lib/callingbox-exporter

# Numeric, so Kubernetes can verify runAsNonRoot without an /etc/passwd entry.
USER 65532:65532
WORKDIR /var/lib/callingbox-exporter
VOLUME ["/var/lib/callingbox-exporter"]
EXPOSE 9860

# slim has no curl: ask with Python, bypassing any HTTP(S)_PROXY from the environment.
# Set HEALTHCHECK_URL when --web.listen-address moves the port, or to https://... when
# --web.config.file turns on TLS (the server's CA must then be trusted in the image).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:9860/-/healthy'), timeout=4)"]

ENTRYPOINT ["callingbox-exporter"]
# Mount a YAML config here (its state_file under /var/lib/callingbox-exporter), or replace the
# arguments, e.g. `--demo`. Without a config the exporter exits 2 naming the missing file.
CMD ["--config.file=/etc/callingbox-exporter/config.yml"]
