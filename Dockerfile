# amo-broker: the OAuth token broker for amoCRM, as a small non-root image.
#
#   docker build -t amo-broker:0.1.0 .
#   podman build --format docker -t amo-broker:0.1.0 .    # podman/buildah: keep the HEALTHCHECK
#
# No `# syntax=` line: it makes BuildKit pull a frontend image from Docker Hub, and the
# built-in frontend of current BuildKit already supports `RUN --mount`.
# Stage 1 builds a wheel of this repository (and wheels of its dependencies); stage 2
# installs them from that directory only (--no-index), so the final image is reproducible
# from the build context and nothing is fetched when a container starts.
#
# Runtime contract (docs/operations.md, deploy/):
#   /data                                 the store (VOLUME; must survive restarts: the refresh
#                                         token is single-use and rotated into this file)
#   /run/secrets/broker.key               the encryption key (BROKER_KEY_FILE), mode 0600,
#                                         owned by uid 10001; or BROKER_ENCRYPTION_KEY instead
#   /run/secrets/broker-clients.json      caller credentials (BROKER_CLIENT_TOKENS_FILE)
#   0.0.0.0:8787                          the proxy, /healthz, /readyz, /status
# The default refuses to start without the clients file: on 0.0.0.0 anyone who reaches the
# port could act as your integration. A sidecar sharing the app's network namespace sets
# BROKER_HOST=127.0.0.1 and BROKER_CLIENT_TOKENS_FILE= (empty) instead: see
# deploy/docker-compose.yml and deploy/kubernetes/.
# Read-only root filesystem: supported; the broker writes only under /data (and SQLite may
# use /tmp for temporary files), so run with --read-only --tmpfs /tmp.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
# The dependencies come from pyproject.toml, as binary wheels where the registry has them.
# aiohttp must bring its C HTTP parser (`serve` refuses the pure-Python one): stage 2 checks.
RUN pip wheel --wheel-dir /wheels --prefer-binary . \
 && sha256sum /wheels/*.whl > /src/wheels.sha256

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="amo-broker" \
      org.opencontainers.image.description="OAuth token broker for amoCRM / Kommo" \
      org.opencontainers.image.licenses="MIT"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# The digests of the wheels installed below, kept as a record of what is in the image. They
# are also what makes podman/buildah rebuild the next step: buildah keys a RUN on its text,
# not on what a bind mount from another stage holds, and would reuse the old install after
# the code changed (seen with podman 4.3). BuildKit keys it on the mount's content anyway.
COPY --from=build /src/wheels.sha256 /usr/local/share/amo-broker/wheels.sha256
# The wheels come in through a bind mount, not a COPY: they never become a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/amo-broker \
 && /opt/amo-broker/bin/pip install --no-index --find-links=/wheels amo-broker \
 && /opt/amo-broker/bin/python -c 'import aiohttp.http_parser as p, sys; sys.exit(p.HttpRequestParser.__module__ != "aiohttp._http_parser")' \
 && /opt/amo-broker/bin/amo-broker --version \
 && groupadd --system --gid 10001 amo-broker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin amo-broker \
 && install -d -m 0700 -o 10001 -g 10001 /data

# Paths and switches only, no secret (hadolint's DL3064 sees "KEY" in BROKER_KEY_FILE).
# hadolint ignore=DL3064
ENV PATH=/opt/amo-broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8787 \
    BROKER_DB=/data/broker.db \
    BROKER_KEY_FILE=/run/secrets/broker.key \
    BROKER_CLIENT_TOKENS_FILE=/run/secrets/broker-clients.json \
    BROKER_LOG_FORMAT=json

# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# Not /data: a ./broker.toml in the working directory would be read as configuration.
WORKDIR /
VOLUME ["/data"]
EXPOSE 8787

# python, not curl (the slim image has none); http.client keeps the probe light. Follows
# BROKER_PORT; a unix-socket-only broker (BROKER_UNIX_SOCKET) needs its own check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-I", "-S", "-c", "import http.client as h, os, sys; c = h.HTTPConnection('127.0.0.1', int(os.environ.get('BROKER_PORT') or 8787), timeout=4); c.request('GET', '/healthz'); sys.exit(c.getresponse().status != 200)"]

# SIGTERM drains for 10 s and waits for a refresh in flight: give `docker stop` -t 90
# (compose: stop_grace_period: 90s), or its SIGKILL may land on a refresh being stored.
STOPSIGNAL SIGTERM
ENTRYPOINT ["amo-broker"]
CMD ["serve"]
