#!/bin/busybox sh
# /init of the kernel harness's initramfs (busybox-static + the stock kernel's virtio/9p/overlay
# modules). It mounts the host's root read-only over virtio-9p (tag "hostroot"), puts a tmpfs
# overlay on top so the guest may write anywhere, and switch_roots into it, running the program
# named by lunastor.init= on the kernel command line as PID 1. Any failure drops to a shell on the
# serial console, whose output the host keeps.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for ko in $(cat /modules/order); do insmod "/modules/$ko" || echo "initramfs: insmod $ko failed"; done
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower ||
    { echo "initramfs: cannot mount the host root over 9p"; exec sh; }
mount -t tmpfs -o size=1g,mode=755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
    { echo "initramfs: overlay mount failed"; exec sh; }
init=$(sed -n 's/.*lunastor\.init=\([^ ]*\).*/\1/p' /proc/cmdline)
for d in dev proc sys; do mount --move "/$d" "/newroot/$d"; done
exec switch_root /newroot "${init:-/bin/sh}"
