"""The Kubernetes CSI driver: Identity, Controller (a client of the REST API) and Node (the
node's open-iscsi, mkfs and mount) services over gRPC. The iSCSI data path never runs in the
plugin: restarting it never breaks IO (docs/csi.md)."""
