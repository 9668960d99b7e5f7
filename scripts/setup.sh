#!/usr/bin/env bash
# Install everything lunastor needs on Debian 12: system packages and a Python venv in .venv.
# Idempotent and quick once done: packages already present are not reinstalled, and the venv is
# only refreshed when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(
    etcd-server etcd-client        # the metadata store (3.4 on Debian 12)
    libiscsi-bin libiscsi-dev      # iscsi-inq, iscsi-ls, iscsi-test-cu; the bench client links it
    qemu-utils qemu-block-extra    # qemu-img/qemu-io with iscsi:// URLs
    iproute2 iputils-ping sg3-utils  # network namespaces for failover tests; SCSI tools
    nftables                       # tests/fault/test_partitions.py: one-way and partial cuts
    tgt                            # the C userspace target the benchmarks compare against
    gcc python3-venv curl           # curl: tests read metrics from inside network namespaces
    # tests/kernel: boot a stock Debian kernel under QEMU (TCG) and drive the target with the
    # kernel's own initiator (open-iscsi); the guest's userspace is the host root over 9p
    qemu-system-x86 linux-image-amd64 busybox-static cpio
    open-iscsi e2fsprogs fio python3-rtslib-fb targetcli-fb
    xfsprogs util-linux            # the CSI node plugin: mkfs.xfs, xfs_growfs; losetup, blkid, mount
    chromium fonts-dejavu-core     # tests/ui: the dashboard in a real headless browser (Playwright)
)

if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
# wait for another install (a second checkout's setup) instead of failing on the dpkg lock
lock=(-o DPkg::Lock::Timeout=900)
apt_install() {
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${lock[@]}" install -y -qq \
        --no-install-recommends "$@" >/dev/null
}

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get "${lock[@]}" update -qq
    apt_install "${missing[@]}"
fi
# The commands the tests run, each with the package that provides it: a package that dpkg
# listed as installed and whose command is gone anyway (seen on a fresh machine: qemu-img
# missing, and every qemu-img test failing with FileNotFoundError) is installed again.
declare -A COMMANDS=(
    [qemu-img]=qemu-utils [etcd]=etcd-server [etcdctl]=etcd-client [tgtd]=tgt
    [iscsi-test-cu]=libiscsi-bin [iscsiadm]=open-iscsi [qemu-system-x86_64]=qemu-system-x86
)
broken=()
for c in "${!COMMANDS[@]}"; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$c" >/dev/null || broken+=("${COMMANDS[$c]}")
done
if [ ${#broken[@]} -gt 0 ]; then
    echo "setup: reinstalling ${broken[*]} (their commands are missing)"
    apt_install --reinstall "${broken[@]}"
fi
# Debian's etcd-server package starts a system etcd on 2379; lunastor runs its own.
if command -v systemctl >/dev/null && systemctl is-active -q etcd 2>/dev/null; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.lunastor-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
fi
