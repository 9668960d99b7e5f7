"""Kernel-initiator tests: a stock Debian kernel under QEMU drives lunastor's iSCSI target."""
