"""The demo volume `make run` creates once the dev cluster is up, and how to reach it."""

from __future__ import annotations

from typing import Any

from lunastor.cli.api import ApiClient

DEMO_NAME = "demo"
DEMO_SIZE = 1 << 30
DEMO_INITIATOR = "iqn.2026-11.io.lunastor:demo-client"


def create_demo(state: dict[str, Any]) -> dict[str, Any]:
    """Create (or find: the call is idempotent) the demo volume and publish it to the demo
    initiator; returns the export: portal (the VIP), target IQN and LUN."""
    client = ApiClient(state["api_url"], state["admin_token"], timeout=30)
    volume = client.request("POST", "/v1/volumes", {"name": DEMO_NAME, "size_bytes": DEMO_SIZE})
    export: dict[str, Any] = client.request(
        "POST", f"/v1/volumes/{volume['id']}/exports", {"initiator": DEMO_INITIATOR}
    )
    return export


def demo_commands(export: dict[str, Any], directory: str) -> list[tuple[str, str]]:
    """(what, command) pairs that reach the demo volume through the VIP."""
    portal, target, lun = export["portal"], export["target_iqn"], export["lun"]
    url = f"iscsi://{portal}/{target}/{lun}"
    opts = (
        f"driver=iscsi,transport=tcp,portal={portal},target={target},lun={lun},"
        f"initiator-name={DEMO_INITIATOR}"
    )
    host_iqn = "$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)"
    return [
        ("identify", f"iscsi-inq -i {DEMO_INITIATOR} {url}"),
        ("capacity", f"iscsi-readcapacity16 -i {DEMO_INITIATOR} {url}"),
        ("qemu-img", f"qemu-img info --image-opts '{opts}'"),
        ("write an image", f"qemu-img convert -n -f raw disk.img --target-image-opts '{opts}'"),
        (
            "kernel initiator: publish to this host",
            f'.venv/bin/lunastor export add {DEMO_NAME} "{host_iqn}" --dir {directory}',
        ),
        ("kernel initiator: discover", f"iscsiadm -m discovery -t sendtargets -p {portal}"),
        ("kernel initiator: log in", f"iscsiadm -m node -T {target} -p {portal} --login"),
    ]
