"""Every command handler module, imported for its registrations in the command table.

`target.py` imports this module (and the handler modules import `target` only for type
checking), so that the command table is complete whenever a `ScsiTarget` exists, without an
import circle between the target and its handlers.
"""

from lunastor.iscsi.scsi import mode, prcmds, sbc, spc

__all__ = ["mode", "prcmds", "sbc", "spc"]
