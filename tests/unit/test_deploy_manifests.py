"""deploy/kubernetes cannot rot silently: no Kubernetes runs here, so the manifests are
checked against the plugin's real entry point, configuration and parameter tables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lunastor.common.config import env_paths, env_var_name, load_config
from lunastor.csi.config import DRIVER_NAME, CsiConfig
from lunastor.csi.main import parser
from lunastor.csi.node import CHAP_KEYS
from lunastor.csi.requests import (
    CO_PREFIX,
    FS_TYPES,
    VolumeParameters,
    mutable_parameters,
    volume_parameters,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, "kustomization.yaml must list every manifest"
    return [d for name in sorted(listed) for d in documents(DEPLOY / name)]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "DaemonSet")
    ]


def test_the_driver_name_is_the_plugins(objects: list[dict[str, Any]]) -> None:
    assert [o["metadata"]["name"] for o in of_kind(objects, "CSIDriver")] == [DRIVER_NAME]
    assert [o["provisioner"] for o in of_kind(objects, "StorageClass")] == [DRIVER_NAME]
    assert [o["driver"] for o in of_kind(objects, "VolumeSnapshotClass")] == [DRIVER_NAME]
    assert of_kind(objects, "CSIDriver")[0]["spec"]["attachRequired"] is True


def test_plugin_containers_pass_only_arguments_and_settings_that_exist(
    objects: list[dict[str, Any]],
) -> None:
    known_env = {env_var_name(p) for p in env_paths(CsiConfig)}
    modes = []
    for spec in pod_specs(objects):
        for c in spec["containers"]:
            if c["name"] != "lunastor-csi":
                continue
            args = parser().parse_args(c["args"])
            modes.append(args.mode)
            env = {e["name"]: e.get("value", "placeholder") for e in c.get("env", [])}
            unknown = {n for n in env if n.startswith("LUNASTOR_")} - known_env
            assert not unknown, f"{c['name']}: unknown settings {unknown}"
            config = load_config(CsiConfig, env=env)
            if args.mode == "controller":
                assert config.api_token and config.api_url
    assert sorted(modes) == ["controller", "node"]


def test_qos_example_parameters_are_accepted() -> None:
    docs = documents(DEPLOY / "examples" / "qos.yaml")
    classes = [d for d in docs if d["kind"] == "VolumeAttributesClass"]
    assert classes and all(c["driverName"] == DRIVER_NAME for c in classes)
    for c in classes:
        assert mutable_parameters(c["parameters"])  # as ControllerModifyVolume receives them


def test_storage_class_parameters_exist(objects: list[dict[str, Any]]) -> None:
    (sc,) = of_kind(objects, "StorageClass")
    params = sc["parameters"]
    ours = {k: v for k, v in params.items() if not k.startswith(CO_PREFIX)}
    assert set(ours) <= set(VolumeParameters.KEYS)
    volume_parameters(params)  # accepted as the controller will receive them
    assert params[f"{CO_PREFIX}fstype"] in FS_TYPES
    assert sc["allowVolumeExpansion"] is True
    secret = documents(DEPLOY / "examples" / "chap-secret.yaml")[0]
    assert set(secret["stringData"]) <= set(CHAP_KEYS)


def test_mounts_sockets_and_probes_line_up(objects: list[dict[str, Any]]) -> None:
    accounts = {o["metadata"]["name"] for o in of_kind(objects, "ServiceAccount")}
    for spec in pod_specs(objects):
        assert spec["serviceAccountName"] in accounts
        volumes = {v["name"]: v for v in spec["volumes"]}
        health_ports = set()
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= set(volumes), c["name"]
            args = dict(a.removeprefix("--").partition("=")[::2] for a in c.get("args", []))
            address = args.get("csi-address") or args.get("endpoint", "").removeprefix("unix://")
            if address:
                assert os.path.dirname(address) in mounts, f"{c['name']}: {address} not mounted"
            if "health-port" in args:
                health_ports.add(int(args["health-port"]))
            if "kubelet-registration-path" in args:
                path = args["kubelet-registration-path"]
                assert path == f"/var/lib/kubelet/plugins/{DRIVER_NAME}/csi.sock"
                assert volumes["plugin-dir"]["hostPath"]["path"] == os.path.dirname(path)
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), image
        for c in spec["containers"]:
            probe = c.get("livenessProbe")
            if probe:
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                assert ports[probe["httpGet"]["port"]] in health_ports, c["name"]
