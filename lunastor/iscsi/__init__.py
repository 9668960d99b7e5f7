"""iSCSI and SCSI protocol engine, sans-IO: bytes and events in, bytes and events out.

Nothing here opens a socket or imports other lunastor packages; the chunk server and the
redirector drive it (see docs/iscsi.md).
"""
