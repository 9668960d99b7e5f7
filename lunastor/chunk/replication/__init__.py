"""Replication of extents (docs/datapath.md): the primary's ordering and forwarding (`node`),
replica-level requests (`replicas`), the extent map in etcd (`extentmap`), the placement ring
reader (`ring`), fencing by nexus epoch (`fencing`), joining and retiring members (`join`) and
copy-on-write for snapshots (`snapshots`)."""
