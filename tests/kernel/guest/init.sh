#!/bin/sh
# PID 1 of the guest once the initramfs has switched to the host root (read-only 9p + tmpfs
# overlay). Reads its settings from the kernel command line:
#   lunastor.addr=A.B.C.D/N  the guest's address on eth0 (the tap in the test's namespace)
#   lunastor.run=PATH        the scenario program; run with the results directory as argument
# The results share (9p tag "results") is mounted on /results; the scenario writes its
# results.json there. This script records the scenario's exit code in /results/exit_code and
# powers the machine off, which ends QEMU (-no-reboot).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
arg() { sed -n "s/.*lunastor\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
say() { echo "guest-init [$(cut -d' ' -f1 /proc/uptime)]: $*"; }
# reboot, not power off: it needs no ACPI from the firmware, and -no-reboot makes QEMU exit
off() { sync; echo b > /proc/sysrq-trigger; sleep 60; }
echo 1 > /proc/sys/kernel/sysrq
echo 4 > /proc/sys/kernel/printk  # warnings and worse still reach the serial log
mount -t tmpfs tmpfs /run
# The scenario's folder lives in the checkout, which may itself be under /tmp (CI clones
# there): copy it out before a fresh /tmp hides it.
run=$(arg run)
mkdir -p /run/lunastor-guest
cp -r "$(dirname "$run")"/. /run/lunastor-guest/ || { say "cannot copy $(dirname "$run")"; off; }
run=/run/lunastor-guest/$(basename "$run")
mount -t tmpfs tmpfs /tmp
mkdir -p /run/lock /results
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none,msize=262144 results /results ||
    { say "cannot mount the results share"; off; }
hostname lunastor-guest
ip link set lo up
modprobe virtio_net
addr=$(arg addr)
ip addr add "$addr" dev eth0 && ip link set eth0 up || { say "cannot configure eth0"; off; }
say "kernel $(uname -r), eth0 $addr, running $run"
export PYTHONPATH="$(dirname "$run")" PYTHONDONTWRITEBYTECODE=1
"$run" /results
rc=$?
echo "$rc" > /results/exit_code
say "scenario exited with $rc"
off
