#!/usr/bin/env bash
# Build a local Debian bookworm base image for the Dockerfile where Docker Hub is out of
# reach (python:3.12-slim-bookworm cannot be pulled), from the Debian mirror apt already uses:
#
#   deploy/image-base.sh [TAG]          # default localhost/python-base:bookworm
#   podman build --format docker --build-arg PYTHON_IMAGE=localhost/python-base:bookworm .
#
# The base has python3 (3.11, which the project supports) with venv and pip, a `python` link
# (the Dockerfile and its HEALTHCHECK call `python`), and this host's extra CA certificates,
# so pip inside the build reaches the registry through the same TLS interception the host
# trusts. An existing TAG is kept (delete it with `podman rmi` to rebuild). Needs root,
# debootstrap and podman (Debian: apt-get install --no-install-recommends podman runc
# iptables debootstrap). Takes about a minute, mostly download.
set -euo pipefail
tag=${1:-localhost/python-base:bookworm}
if podman image exists "$tag"; then
    echo "image-base: $tag exists, kept"
    exit 0
fi

# The first Debian (not security) mirror apt uses, from deb822 or one-line sources.
mirror=$(
    { cat /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } |
        awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }'
)
if [ -z "$mirror" ]; then
    mirror=$(
        { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } |
            awk '$1 == "deb" && $2 !~ /^\[/ && $2 !~ /security/ && $3 ~ /^bookworm$/ { print $2; exit }'
    )
fi
mirror=${mirror:-http://deb.debian.org/debian}

root=$(mktemp -d /var/tmp/python-base.XXXXXX)
trap 'rm -rf "$root" "$root.debootstrap.log"' EXIT
echo "image-base: debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
    tail -n 30 "$root.debootstrap.log" >&2
    exit 1
}
ln -s python3 "$root/usr/bin/python"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
# (Its rehash warns about the bundle file, which holds many certificates: expected.)
chroot "$root" update-ca-certificates >/dev/null 2>&1 || {
    echo "image-base: update-ca-certificates failed in $root" >&2
    exit 1
}
# The registry the host's pip uses, if it is not PyPI's default (no credentials expected).
if [ -n "${PIP_INDEX_URL:-}" ]; then
    printf '[global]\nindex-url = %s\n' "$PIP_INDEX_URL" >"$root/etc/pip.conf"
fi
# The package caches would only grow the image.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | podman import --quiet - "$tag" >/dev/null
echo "image-base: $tag built ($(podman image inspect --format '{{.Size}}' "$tag") bytes)"
