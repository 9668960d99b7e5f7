#!/usr/bin/env bash
# Make sure the Docker base image of lunastor's images exists: debian:bookworm-slim by default
# (LUNASTOR_BASE_IMAGE overrides it, as the Dockerfiles' BASE_IMAGE build argument does).
#
#   scripts/docker-base-image.sh            # present: nothing; else pull; else build it
#
# Where the image is absent and cannot be pulled (a machine with no container registry), it is
# built from Debian's own packages: debootstrap of a minimal bookworm, `docker import`, tagged
# with the same name, so the Dockerfiles stay the ones a user with a registry runs. The root
# file system is cached as a tarball (LUNASTOR_IMAGE_CACHE, default ~/.cache/lunastor) so a
# machine whose Docker images were removed imports it again without downloading anything.
# Certificate authorities the host added in /usr/local/share/ca-certificates (an egress proxy's)
# are put on top, so that package downloads inside builds trust what the host trusts; the image
# is labelled with their digest and rebuilt (from the cached tarball) when they change.
set -euo pipefail

IMAGE="${LUNASTOR_BASE_IMAGE:-debian:bookworm-slim}"
SUITE="${LUNASTOR_BASE_SUITE:-bookworm}"
MIRROR="${LUNASTOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${LUNASTOR_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
CACHE="${LUNASTOR_IMAGE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/lunastor}"
TARBALL="$CACHE/${SUITE}-minbase-rootfs.tar"
LABEL=io.lunastor.base-image  # on images this script built: the digest of the extra CAs

log() { echo "docker-base-image: $*" >&2; }

shopt -s nullglob
certs=(/usr/local/share/ca-certificates/*.crt)
ca_digest="$(cat /dev/null "${certs[@]}" | sha256sum | cut -c1-16)"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    built="$(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$IMAGE")"
    if [ -z "$built" ] || [ "$built" = "<no value>" ] || [ "$built" = "$ca_digest" ]; then
        log "$IMAGE is present"
        exit 0
    fi
    log "$IMAGE was built with other certificate authorities than the host's: rebuilding"
elif timeout 60 docker pull "$IMAGE" >/dev/null 2>&1; then
    log "pulled $IMAGE"
    exit 0
else
    log "$IMAGE cannot be pulled: building it from Debian's packages ($SUITE, $MIRROR)"
fi

if [ ! -s "$TARBALL" ]; then
    if ! command -v debootstrap >/dev/null; then
        if [ "$(id -u)" -ne 0 ]; then
            log "debootstrap is needed (apt-get install debootstrap, as root)"
            exit 1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 ||
            { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y --no-install-recommends debootstrap >&2; }
    fi
    if [ "$(id -u)" -ne 0 ]; then
        log "debootstrap needs root"
        exit 1
    fi
    mkdir -p "$CACHE"
    work="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    rootfs="$work/rootfs"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # What the official slim image has: the three suites, no service starts inside builds,
    # no documentation, no package lists or downloaded packages.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY_MIRROR
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 755 "$rootfs/usr/sbin/policy-rc.d"
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::GzipIndexes "true";' >"$rootfs/etc/apt/apt.conf.d/docker-gzip-indexes"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/*
    tar -C "$rootfs" --numeric-owner -cf "$work/rootfs.tar" .
    mv "$work/rootfs.tar" "$TARBALL"
    rm -rf "$work"
    trap - EXIT
fi
ROOTFS_IMAGE="lunastor-rootfs:$SUITE"
docker import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$TARBALL" "$ROOTFS_IMAGE" >/dev/null
context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
mkdir "$context/certs"
for cert in "${certs[@]}"; do cp "$cert" "$context/certs/"; done
printf 'FROM %s\nCOPY certs/ /usr/local/share/ca-certificates/\nLABEL %s=%s\n' \
    "$ROOTFS_IMAGE" "$LABEL" "$ca_digest" >"$context/Dockerfile"
docker build -q -t "$IMAGE" "$context" >/dev/null
log "built $IMAGE from $TARBALL (+${#certs[@]} host certificate authorities)"
