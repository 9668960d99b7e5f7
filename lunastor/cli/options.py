"""What every CLI command shares: consoles, one-line errors, the API connection options."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from lunastor.cli import devcluster
from lunastor.cli.api import ApiClient, ApiError
from lunastor.common.units import format_size, parse_size

# Tables stay readable when piped: rich would otherwise squeeze them into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)

DEFAULT_DIR = os.environ.get("LUNASTOR_DEV_DIR", "devcluster")


def fail(message: str, status: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    sys.exit(status)


def human_bytes(n: int | float | None) -> str:
    return format_size(n)


class SizeType(click.ParamType):
    """`10GiB`, `512MiB`, `1T`, `4096` -> bytes."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()

dir_option = click.option(
    "--dir",
    "directory",
    default=DEFAULT_DIR,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="dev cluster directory (state file, configs, logs, data)",
)


def api_client(
    directory: Path, api: str | None, token: str | None, ca_cert: str | None = None
) -> ApiClient:
    """The API named by --api/--token, else by the dev cluster state file in --dir."""
    token = token or os.environ.get("LUNASTOR_TOKEN")
    if api:
        return ApiClient(api, token or "", ca_cert=ca_cert)
    try:
        state = devcluster.read_state(directory)
    except devcluster.DevClusterError as exc:
        fail(f"{exc} (or pass --api URL)")
    assert state is not None
    return ApiClient(state["api_url"], token or state.get("admin_token", ""), ca_cert=ca_cert)


api_options = [
    dir_option,
    click.option("--api", metavar="URL", envvar="LUNASTOR_API", help="meta API URL"),
    click.option("--token", metavar="TOKEN", help="bearer token (or LUNASTOR_TOKEN)"),
    click.option(
        "--ca-cert",
        metavar="PEM",
        envvar="LUNASTOR_CA_CERT",
        help="CA certificate to verify an https API with",
    ),
    click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table"),
]


def with_api_options(f: Any) -> Any:
    for option in reversed(api_options):
        f = option(f)
    return f


@dataclass
class Cli:
    """A command's connection and output mode."""

    api: ApiClient
    as_json: bool

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return self.api.request(method, path, body)
        except ApiError as exc:
            fail(str(exc))

    def emit(self, data: Any, render: Callable[[Any], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            render(data)


def api_command(f: Callable[..., None]) -> Callable[..., None]:
    """Give the command a `Cli` built from the shared API options."""

    @functools.wraps(f)
    def wrapper(
        directory: Path,
        api: str | None,
        token: str | None,
        ca_cert: str | None,
        as_json: bool,
        **kwargs: Any,
    ) -> None:
        f(Cli(api_client(directory, api, token, ca_cert), as_json), **kwargs)

    return with_api_options(wrapper)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col)
    for row in rows:
        t.add_row(*("-" if v is None else str(v) for v in row))
    console.print(t)
