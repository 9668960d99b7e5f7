"""The Kubernetes CSI driver: Identity, Controller (a client of the REST API) and Node (the
node's open-iscsi, mkfs and mount) services over gRPC. The iSCSI data path never runs in the
plugin: restarting it never breaks IO (docs/csi.md)."""

import os

# The node plugin runs iscsiadm, mkfs and mount as children of a process full of gRPC threads.
# gRPC's fork handlers (on by default) run in every forked child before it execs, and on a
# one-CPU guest we saw children (iscsiadm, mkfs.ext4) die of SIGSEGV there. Our children exec
# at once and never use gRPC, so the handlers are not needed: off, unless the operator says.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
