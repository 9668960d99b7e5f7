"""Apply a `LioPlan` to the kernel through rtslib-fb (configfs under /sys/kernel/config/target).

Only what lunastor owns is touched: backstores named `lunastor-*` and iSCSI targets whose IQN
starts with lunastor's target prefix; any other LIO configuration on the machine stays as it
is. Applying is idempotent and converges: what the plan lacks is removed, what it adds is
created, ACLs, mapped LUNs and CHAP settings are rewritten to match.

rtslib-fb is the distribution's package (python3-rtslib-fb), not a dependency of lunastor: it is
imported when the LIO export starts, from the interpreter's path or else from Debian's
dist-packages.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from lunastor.chunk.access.lio.plan import BACKSTORE_PREFIX, Backstore, LioPlan, TargetPlan
from lunastor.common.records import TARGET_IQN_PREFIX
from lunastor.iscsi.chap import ChapCredentials

log = logging.getLogger(__name__)

DIST_PACKAGES = "/usr/lib/python3/dist-packages"
# the largest command LIO sends us: 1 MiB in 512-byte sectors (TCMU's default is 64 KiB)
HW_MAX_SECTORS = 2048
# no netlink round trips with a tcmu-runner that is not there (the kernel would wait for it)
CONTROL = "nl_reply_supported=-1"


class LioUnavailable(Exception):
    """This kernel or machine cannot host the LIO export (no configfs, modules, rtslib)."""


def load_rtslib() -> ModuleType:
    try:
        return importlib.import_module("rtslib_fb")
    except ImportError:
        if DIST_PACKAGES not in sys.path:
            sys.path.append(DIST_PACKAGES)  # after the venv's own packages: they win
        try:
            return importlib.import_module("rtslib_fb")
        except ImportError as exc:
            raise LioUnavailable(f"rtslib-fb is not installed ({exc})") from None


class RtsConfig:
    """The LIO side: `existing_backstores()`, then `apply(plan)`."""

    def __init__(self, rtslib: ModuleType | None = None, *, command_timeout: int = 0) -> None:
        """`command_timeout`: seconds before LIO fails a command the handler has not answered
        (TCMU's cmd_time_out; 0 keeps the kernel's default of 30 s)."""
        self.rts: Any = rtslib or load_rtslib()
        self.command_timeout = command_timeout
        try:
            self.root: Any = self.rts.RTSRoot()
            self.fabric: Any = self.rts.FabricModule("iscsi")
        except Exception as exc:  # rtslib raises its own errors for a missing configfs
            raise LioUnavailable(f"LIO is not available: {exc}") from None
        self._discovery_set = False  # whether we turned discovery CHAP on
        self._ensure_pr_directory()

    def _ensure_pr_directory(self) -> None:
        """LIO answers PERSISTENT RESERVE OUT and rewrites its APTPL file
        `<dbroot>/pr/aptpl_<serial>` on every change, APTPL or not; without that directory
        every PR OUT fails with NOT READY, LOGICAL UNIT COMMUNICATION FAILURE."""
        try:
            pr = Path(str(self.root.dbroot)) / "pr"
            pr.mkdir(parents=True, exist_ok=True)
        except Exception as exc:  # read-only root, odd dbroot: serve anyway, say why PR fails
            log.error("LIO: no PR directory under its dbroot (PR OUT will fail): %s", exc)

    def existing_backstores(self) -> dict[str, Any]:
        return {
            so.name: so
            for so in self.root.storage_objects
            if so.plugin == "user" and so.name.startswith(BACKSTORE_PREFIX)
        }

    def _our_targets(self) -> dict[str, Any]:
        return {t.wwn: t for t in self.fabric.targets if t.wwn.startswith(TARGET_IQN_PREFIX)}

    def apply(self, plan: LioPlan) -> None:
        """Make LIO hold exactly `plan` (of what lunastor owns)."""
        for iqn, target in self._our_targets().items():
            if iqn not in plan.targets:
                log.info("LIO: removing target %s", iqn)
                target.delete()
        stores = self.existing_backstores()
        for name, so in stores.items():
            wanted = plan.backstores.get(name)
            if wanted is None or not self._same(so, wanted):
                log.info("LIO: removing backstore %s", name)
                for lun in list(so.attached_luns):
                    lun.delete()
                so.delete()
        stores = self.existing_backstores()
        for name, store in plan.backstores.items():
            if name not in stores:
                stores[name] = self._create_backstore(store)
        for target in plan.targets.values():
            self._apply_target(target, plan.portals, stores)
        self._apply_discovery(plan.discovery)

    def _apply_discovery(self, chap: ChapCredentials | None) -> None:
        f = self.fabric
        if chap is None:
            if self._discovery_set:  # ours to clear; someone else's setting stays
                f.clear_discovery_auth_settings()
                self._discovery_set = False
            return
        f.discovery_userid = chap.username
        f.discovery_password = chap.secret.decode()
        mutual = chap.mutual_username is not None and chap.mutual_secret is not None
        f.discovery_mutual_userid = chap.mutual_username if mutual else ""
        f.discovery_mutual_password = (chap.mutual_secret or b"").decode() if mutual else ""
        f.discovery_enable_auth = True
        self._discovery_set = True

    def _same(self, so: Any, store: Backstore) -> bool:
        try:
            # not the size: READ CAPACITY is ours (passthrough), so a resize needs no new backstore
            return bool(so.config == store.config)
        except Exception:  # half-created: rebuild it
            return False

    def _create_backstore(self, store: Backstore) -> Any:
        log.info("LIO: user backstore %s (%s, %d bytes)", store.name, store.config, store.size)
        control = f"{CONTROL},hw_block_size={store.block_size}"
        so = self.rts.UserBackedStorageObject(
            store.name,
            config=store.config,
            size=store.size,
            hw_max_sectors=HW_MAX_SECTORS,
            control=control,
        )
        if self.command_timeout:
            so.set_attribute("cmd_time_out", str(self.command_timeout))
        return so

    def _apply_target(
        self, plan: TargetPlan, portals: tuple[tuple[str, int], ...], stores: dict[str, Any]
    ) -> None:
        target = self.rts.Target(self.fabric, plan.iqn)
        tpg = self.rts.TPG(target, 1)
        have = {(p.ip_address, p.port): p for p in tpg.network_portals}
        for key, portal in have.items():
            if key not in portals:
                portal.delete()
        for ip, port in portals:
            if (ip, port) not in have:
                self.rts.NetworkPortal(tpg, ip, port)
        luns = {lun.lun: lun for lun in tpg.luns}
        for number, lun in luns.items():
            if plan.luns.get(number) != lun.storage_object.name:
                lun.delete()
        luns = {lun.lun: lun for lun in tpg.luns}
        for number, name in plan.luns.items():
            if number not in luns:
                luns[number] = self.rts.LUN(tpg, number, stores[name])
        acls = {acl.node_wwn: acl for acl in tpg.node_acls}
        wanted = {acl.initiator: acl for acl in plan.acls}
        for name, acl in acls.items():
            if name not in wanted:
                acl.delete()
        for name, spec in wanted.items():
            acl = acls.get(name) or self.rts.NodeACL(tpg, name)
            mapped = {m.mapped_lun: m for m in acl.mapped_luns}
            for number, m in mapped.items():
                if number not in spec.luns or m.tpg_lun.lun != number:
                    m.delete()
            mapped = {m.mapped_lun: m for m in acl.mapped_luns}
            for number in spec.luns:
                if number not in mapped:
                    self.rts.MappedLUN(acl, number, luns[number], write_protect=False)
            chap = spec.chap
            acl.chap_userid = chap.username if chap else ""
            acl.chap_password = chap.secret.decode() if chap else ""
            mutual = chap is not None and chap.mutual_username and chap.mutual_secret
            acl.chap_mutual_userid = chap.mutual_username if mutual and chap else ""
            acl.chap_mutual_password = (
                chap.mutual_secret.decode() if mutual and chap and chap.mutual_secret else ""
            )
        tpg.set_attribute("generate_node_acls", "0")  # only the ACLs above may log in
        tpg.set_attribute("demo_mode_write_protect", "0")
        tpg.set_attribute("authentication", "1" if plan.authentication else "0")
        tpg.enable = True

    def clear_targets(self) -> None:
        """Remove lunastor's iSCSI targets (sessions end; the backstores stay)."""
        for target in self._our_targets().values():
            target.delete()

    def clear(self) -> None:
        """Remove everything lunastor created (at shutdown)."""
        self.clear_targets()
        self._apply_discovery(None)
        for so in self.existing_backstores().values():
            for lun in list(so.attached_luns):
                lun.delete()
            so.delete()
