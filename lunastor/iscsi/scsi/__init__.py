"""SCSI (SPC-4/SBC-3) command handling over a `BlockDevice`, transport-independent."""
