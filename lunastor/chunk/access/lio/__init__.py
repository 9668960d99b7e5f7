"""LIO export: lunastor volumes through the kernel iSCSI target, TCMU backstores (docs/lio.md)."""
