#!/usr/bin/python3
"""Guest scenario: a target that demands CHAP admits the right secret and refuses others.

Discovery and login are each tried without credentials and with a wrong secret (both must be
refused), then with the right one (must work, and the disk must appear and answer). Last, an
initiator name outside the target's ACL, with the right secret, must see no target in
discovery and be refused at login.

params.json: portal, iqn, initiator, other_initiator, lun, size, user, secret, wrong_secret.
"""

from __future__ import annotations

import initiator
from steps import Run, StepFailed, main


def discovery_auth(user: str, secret: str) -> dict[str, str]:
    return {
        "discovery.sendtargets.auth.authmethod": "CHAP",
        "discovery.sendtargets.auth.username": user,
        "discovery.sendtargets.auth.password": secret,
    }


def login_auth(user: str, secret: str) -> dict[str, str]:
    return {
        "node.session.auth.authmethod": "CHAP",
        "node.session.auth.username": user,
        "node.session.auth.password": secret,
    }


def body(run: Run) -> None:
    p = run.params
    portal, iqn = p["portal"], p["iqn"]
    with run.step("iscsid"):
        initiator.start_iscsid(run, p["initiator"])
    with run.step("discovery-without-chap-refused"):
        proc = initiator.iscsiadm(run, "-m", "discovery", "-t", "st", "-p", portal, check=False)
        initiator.expect_refused(proc, "discovery without CHAP", None)
        run.record("discovery_without_chap_exit", proc.returncode)
    with run.step("discovery-wrong-secret-refused"):
        try:
            initiator.discover(run, portal, discovery_auth(p["user"], p["wrong_secret"]))
        except StepFailed as exc:
            run.record("discovery_wrong_secret", str(exc))
        else:
            raise StepFailed("discovery with a wrong CHAP secret succeeded")
    with run.step("discovery-chap"):
        found = initiator.discover(run, portal, discovery_auth(p["user"], p["secret"]))
        if iqn not in found:
            raise StepFailed(f"SendTargets returned {found}, not {iqn}")
    with run.step("login-without-chap-refused"):
        initiator.node_update(run, iqn, portal, {"node.session.auth.authmethod": "None"})
        proc = initiator.iscsiadm(
            run, "-m", "node", "-T", iqn, "-p", portal, "--login", check=False
        )
        initiator.expect_refused(proc, "login without CHAP", initiator.ISCSI_ERR_LOGIN_AUTH_FAILED)
    with run.step("login-wrong-secret-refused"):
        initiator.node_update(run, iqn, portal, login_auth(p["user"], p["wrong_secret"]))
        proc = initiator.iscsiadm(
            run, "-m", "node", "-T", iqn, "-p", portal, "--login", check=False
        )
        initiator.expect_refused(
            proc, "login with a wrong secret", initiator.ISCSI_ERR_LOGIN_AUTH_FAILED
        )
        if initiator.sessions_for(iqn):
            raise StepFailed("a session exists after the refused login")
    with run.step("login-chap"):
        initiator.node_update(run, iqn, portal, login_auth(p["user"], p["secret"]))
        disk = initiator.login(run, iqn, portal, p["lun"])
    with run.step("read-capacity"):
        readcap = run.sh("sg_readcap", "--long", disk).stdout
        run.record("sg_readcap", readcap)
        if f"Device size: {p['size']} bytes" not in readcap:
            raise StepFailed(f"unexpected capacity: {readcap}")
        run.sh("dd", f"if={disk}", "of=/dev/null", "bs=1M", "count=4", "iflag=direct")
    with run.step("logout"):
        initiator.logout(run, iqn, portal)
    with run.step("acl-other-initiator-refused"):
        # a second iface carries another initiator name; iscsid itself keeps the first
        iface = ["-I", "outsider"]
        initiator.iscsiadm(run, "-m", "iface", *iface, "-o", "new")
        initiator.iscsiadm(
            run,
            "-m",
            "iface",
            *iface,
            "-o",
            "update",
            "-n",
            "iface.initiatorname",
            "-v",
            p["other_initiator"],
        )
        base = ["-m", "discoverydb", "-t", "sendtargets", "-p", portal, *iface]
        initiator.iscsiadm(run, *base, "-o", "new")
        for name, value in discovery_auth(p["user"], p["secret"]).items():
            initiator.iscsiadm(run, *base, "-o", "update", "-n", name, "-v", value)
        proc = initiator.iscsiadm(run, *base, "--discover", check=False)
        run.record("acl_discovery", {"exit": proc.returncode, "output": proc.stdout.strip()})
        if iqn in proc.stdout:
            raise StepFailed(f"an initiator outside the ACL discovered {iqn}")
        node = ["-m", "node", "-T", iqn, "-p", portal, *iface]
        initiator.iscsiadm(run, *node, "-o", "new")
        for name, value in login_auth(p["user"], p["secret"]).items():
            initiator.iscsiadm(run, *node, "-o", "update", "-n", name, "-v", value)
        proc = initiator.iscsiadm(run, *node, "--login", check=False)
        run.record("acl_login_exit", proc.returncode)
        initiator.expect_refused(proc, "login from outside the ACL", None)
        if initiator.sessions_for(iqn):
            raise StepFailed("a session exists after the refused login")


main("iscsi-chap", body)
