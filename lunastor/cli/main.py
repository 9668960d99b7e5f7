"""`lunastor`: the operator's command line (a REST client) and the dev cluster launcher."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from lunastor.cli import devcluster, resources
from lunastor.cli.api import ApiError
from lunastor.cli.demo import DEMO_INITIATOR, DEMO_NAME, DEMO_SIZE, create_demo, demo_commands
from lunastor.cli.options import (
    api_client,
    console,
    dir_option,
    err_console,
    fail,
    human_bytes,
    with_api_options,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lunastor")
def main() -> None:
    """lunastor: replicated, thin-provisioned block volumes over iSCSI."""


# -- dev cluster --------------------------------------------------------------------------------


@main.group()
def dev() -> None:
    """Run a whole cluster on this machine (etcd, meta, chunk servers, redirector)."""


def print_ready(state: dict[str, Any]) -> None:
    daemons = state["daemons"]
    table = Table(title=f"lunastor dev cluster in {state['dir']}", title_justify="left")
    table.add_column("daemon")
    table.add_column("pid", justify="right")
    table.add_column("endpoints")
    for name, d in daemons.items():
        eps = "  ".join(f"{k}={v}" for k, v in d["endpoints"].items())
        table.add_row(name, str(d["pid"] or "-"), eps)
    console.print(table)
    statefile = Path(state["dir"]) / devcluster.STATE_FILE
    etcd = ",".join(state["etcd"]["endpoints"])
    console.print(
        f"REST API      {state['api_url']}  (admin token in {statefile})\n"
        f"dashboard     {state['api_url']}/ui/  (sign in with a REST API token)\n"
        f"iSCSI portal  {state['portal']}  (the redirector's VIP)\n"
        f"etcd          {etcd}  namespace {state['etcd']['namespace']}\n"
        f"status        lunastor cluster status --dir {state['dir']}\n"
        f"stop          lunastor dev down --dir {state['dir']}  (or Ctrl-C here)",
        highlight=False,
    )


@dev.command("up")
@click.option(
    "--chunks",
    default=3,
    show_default=True,
    type=click.IntRange(1, 250),
    help="number of chunk servers",
)
@dir_option
@click.option("--detach", is_flag=True, help="run in the background and return when ready")
@click.option(
    "--address-prefix",
    default=devcluster.DEFAULT_PREFIX,
    show_default=True,
    help="first two octets of the 127.x.y.z loopback addresses the daemons bind",
)
@click.option(
    "--lease-ttl",
    default=5.0,
    show_default=True,
    type=click.FloatRange(1, 60),
    help="etcd lease TTL in seconds (how fast a dead daemon is noticed)",
)
@click.option(
    "--etcd-members",
    default=1,
    show_default=True,
    type=click.Choice(["1", "3", "5"]),
    help="etcd cluster members (3 or 5: the cluster survives losing one or two)",
)
@click.option(
    "--chunk-workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="worker processes per chunk server (`workers` in its config; docs/scale.md)",
)
@click.option("--demo", is_flag=True, help="create a 1 GiB demo volume and print how to reach it")
def dev_up(
    chunks: int,
    directory: Path,
    detach: bool,
    address_prefix: str,
    lease_ttl: float,
    etcd_members: str,
    chunk_workers: int,
    demo: bool,
) -> None:
    """Start etcd, meta, N chunk servers and a redirector on loopback."""
    octets = address_prefix.split(".")
    if len(octets) != 2 or octets[0] != "127" or not octets[1].isdigit() or int(octets[1]) > 255:
        fail(f"--address-prefix must look like 127.N (N in 0..255), got {address_prefix!r}")
    layout = devcluster.Layout(
        prefix=address_prefix,
        chunks=chunks,
        etcd_members=int(etcd_members),
        chunk_workers=chunk_workers,
    )

    def event(message: str) -> None:
        err_console.print(f"[yellow]dev:[/] {message}", highlight=False)

    def ready(state: dict[str, Any]) -> None:
        print_ready(state)
        if demo:
            print_demo(state)

    if detach:
        _detach_and_run(directory, layout, lease_ttl)
        state = devcluster.read_state(directory)
        assert state is not None
        ready(state)
        return
    try:
        devcluster.run_supervisor(directory, layout, lease_ttl, ready, event)
    except devcluster.DevClusterError as exc:
        fail(str(exc))
    console.print("dev cluster stopped")


def _detach_and_run(directory: Path, layout: devcluster.Layout, lease_ttl: float) -> None:
    """Fork a supervisor into its own session; return once it reports ready (or failed)."""
    directory.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become the supervisor, detached from the terminal
        os.close(read_fd)
        os.setsid()
        if os.fork() != 0:  # the grandchild is reparented to init and never becomes a zombie
            os._exit(0)
        log = os.open(directory / "logs-supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        status = 1
        try:

            def ready(state: dict[str, Any]) -> None:
                os.write(write_fd, b"ok\n")

            status = devcluster.run_supervisor(
                directory, layout, lease_ttl, ready, lambda m: print(f"dev: {m}", flush=True)
            )
        except devcluster.DevClusterError as exc:
            os.write(write_fd, f"error {exc}\n".encode())
        except BaseException as exc:  # report, never leave the parent waiting
            os.write(write_fd, f"error supervisor failed: {exc!r}\n".encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    os.waitpid(pid, 0)
    with os.fdopen(read_fd) as pipe:
        line = pipe.readline().strip()
    if line != "ok":
        fail(
            line.removeprefix("error ")
            or f"the supervisor died during start-up; see {directory}/logs-supervisor.log"
        )


def print_demo(state: dict[str, Any]) -> None:
    try:
        export = create_demo(state)
    except ApiError as exc:
        err_console.print(f"[yellow]dev:[/] could not create the demo volume: {exc}")
        return
    console.print(
        f"\ndemo volume   {DEMO_NAME}: {DEMO_SIZE >> 30} GiB, LUN {export['lun']} of "
        f"{export['target_iqn']}, published to {DEMO_INITIATOR}",
        highlight=False,
    )
    for what, command in demo_commands(export, state["dir"]):
        console.print(f"  {what + ':':40} {command}", highlight=False, soft_wrap=True)


@dev.command("down")
@dir_option
def dev_down(directory: Path) -> None:
    """Stop every daemon of the dev cluster."""
    try:
        stopped = devcluster.down(directory)
    except devcluster.DevClusterError as exc:
        fail(str(exc))
    console.print("dev cluster stopped" if stopped else f"no dev cluster running in {directory}")


@dev.command("stop")
@click.argument("name")
@click.option("--kill", is_flag=True, help="SIGKILL instead of a clean SIGTERM")
@dir_option
def dev_stop(name: str, kill: bool, directory: Path) -> None:
    """Take one daemon (etcd, meta, chunkN, redirector) down."""
    try:
        devcluster.send_control(directory, {"op": "stop", "name": name, "kill": kill})
    except devcluster.DevClusterError as exc:
        fail(str(exc))
    console.print(f"{name} {'killed' if kill else 'stopped'}")


@dev.command("start")
@click.argument("name")
@dir_option
def dev_start(name: str, directory: Path) -> None:
    """Bring a stopped daemon back."""
    try:
        reply = devcluster.send_control(directory, {"op": "start", "name": name})
    except devcluster.DevClusterError as exc:
        fail(str(exc))
    console.print(f"{name} started (pid {reply['state']['daemons'][name]['pid']})")


# -- cluster --------------------------------------------------------------------------------------


@main.group()
def cluster() -> None:
    """Cluster-wide views and operations."""


@cluster.command("status")
@with_api_options
def cluster_status(
    directory: Path, api: str | None, token: str | None, ca_cert: str | None, as_json: bool
) -> None:
    """Chunk servers with state and capacity, meta instances and the redirector leader."""
    client = api_client(directory, api, token, ca_cert)
    try:
        status = client.get("/v1/cluster")
    except ApiError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    table = Table(title="chunk servers", title_justify="left")
    for col in ("id", "state", "zone", "portal", "capacity", "free", "version"):
        table.add_column(col, justify="right" if col in ("capacity", "free") else "left")
    colours = {"up": "green", "draining": "yellow", "down": "red"}
    for c in status["chunk_servers"]:
        state = c["state"]
        table.add_row(
            c["id"],
            f"[{colours.get(state, 'white')}]{state}[/]",
            c["zone"],
            c["portal"],
            human_bytes(c.get("capacity")),
            human_bytes(c.get("free")),
            c.get("version") or "-",
        )
    console.print(table)
    metas = ", ".join(f"{m['id']} ({m['api_url']})" for m in status["meta_instances"]) or "none"
    leader = status.get("redirector_leader")
    leader_text = f"{leader['id']} serving {leader['vip']}" if leader else "none"
    console.print(f"meta instances: {metas}\nredirector leader: {leader_text}", highlight=False)
    summary = status.get("summary", {})
    if summary:
        console.print(
            f"{summary.get('chunk_servers_up', 0)}/{summary.get('chunk_servers', 0)} chunk servers "
            f"up; capacity {human_bytes(summary.get('capacity'))}, "
            f"free {human_bytes(summary.get('free'))}",
            highlight=False,
        )


resources.register(main, cluster)

if __name__ == "__main__":
    main()
