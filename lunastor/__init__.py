"""lunastor: replicated, thin-provisioned block volumes over iSCSI."""

__version__ = "0.1.0"
