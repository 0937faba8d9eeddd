#!/usr/bin/env bash
# Build the image and smoke-test it as the operator's docs run it (tests/image/test_image.py),
# against the sandbox amoCRM on loopback: --read-only --tmpfs /tmp --cap-drop ALL
# --security-opt no-new-privileges, secrets in /run/secrets, the store on a volume at /data,
# uid 10001, /healthz and /readyz, caller secrets, a refresh that survives a restart, the
# HEALTHCHECK, the refusal without a clients file, a prompt stop, the compose sidecar settings.
#
#   deploy/image-test.sh [PYTEST_ARGS...]        # as root, in a checkout with .venv
#
# Needs rootful podman with runc, and debootstrap for the base image (built once, kept):
# Debian's `apt-get install --no-install-recommends podman runc iptables debootstrap`.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/image-base.sh
exec "${VENV:-.venv}/bin/pytest" -m image tests/image "$@"
