"""The access point: what an initiator reaches. The replicated volume as a block device
(`volume`), every target and LUN in etcd (`targets`), the asyncio iSCSI server
(`iscsi_server`), reservations and nexus epochs shared through etcd, the local-file device of
the standalone target (`filedev`), and the LIO export (`lio`)."""
