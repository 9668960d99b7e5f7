#!/usr/bin/env bash
# Install what `make bench` needs beyond `make setup`: GlusterFS (the replicated anchor) and
# fio. Kept out of scripts/setup.sh so that `make test` stays lean. Idempotent and quick once
# done; `python -m bench` runs it on demand when a part it was asked for needs a missing tool.
set -euo pipefail

BENCH_PACKAGES=(
    glusterfs-server              # glusterd + bricks: GlusterFS replica 3, the replicated anchor
    qemu-utils qemu-block-extra   # qemu-img bench with its iscsi:// and gluster:// drivers
    tgt                           # tgtd: the single-copy C anchor
    libiscsi-dev gcc              # bench/iscsi_load.c, the latency-percentile client
    iproute2 iputils-ping         # the network namespace Gluster's bricks run in
)

missing=()
for p in "${BENCH_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
    echo "bench-setup: installing ${missing[*]}"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's package starts a system glusterd (on 24007, state in /var/lib/glusterd) where an init
# system runs; the bench runs its own inside a network namespace.
if command -v systemctl >/dev/null && systemctl is-active -q glusterd 2>/dev/null; then
    systemctl disable --now glusterd >/dev/null 2>&1 || true
fi
