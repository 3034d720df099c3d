"""`ragline keys`: create, list and revoke the API keys of the service (in its database)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Optional, TypeVar

import typer
from rich.markup import escape
from rich.table import Column, Table

from ragline.cli.common import State, err, out

if TYPE_CHECKING:  # the service's database layer is imported when a command runs, not by every `ragline`
    from ragline.serve.db import ApiKey, Database

keys_cli = typer.Typer(help="API keys of the service: create, list, revoke.", no_args_is_help=True)

T = TypeVar("T")


def _with_database(work: Callable[[Database], Awaitable[T]]) -> T:
    """Run `work` on the configured service database, migrated first (the CLI may run before any server)."""
    from ragline.serve.db import Database, DatabaseError

    database = Database.from_settings(State.settings())

    async def run() -> T:
        try:
            await database.migrate()
            return await work(database)
        finally:
            await database.close()

    try:
        return asyncio.run(run())
    except DatabaseError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}")
        raise typer.Exit(1) from None


def _groups(text: str) -> list[str]:
    return [group.strip() for group in text.split(",") if group.strip()]


@keys_cli.command("create")
def create(
    tenant: Annotated[str, typer.Option("--tenant", help="the tenant whose documents the key reads")],
    groups: Annotated[
        str, typer.Option("--groups", help="access groups, comma separated (documents of group * need none)")
    ] = "",
    admin: Annotated[bool, typer.Option("--admin", help="reads every group of the tenant and administers it")] = False,
    name: Annotated[str, typer.Option("--name", help="a note saying whose key it is")] = "",
    json_output: Annotated[bool, typer.Option("--json", help="print the key and its token as JSON")] = False,
) -> None:
    """Create an API key and print its token: the only time it is shown."""
    if not tenant.strip():
        raise typer.BadParameter("must not be empty", param_hint="--tenant")
    key, token = _with_database(lambda database: database.keys.create(tenant.strip(), _groups(groups), admin, name))
    if json_output:
        print(json.dumps({"key": key.to_dict(), "token": token}))
        return
    err.print(f"created API key [bold]{key.id}[/bold] for tenant {escape(key.tenant)} "
              f"(groups: {escape(', '.join(key.groups) or 'none')}; admin: {'yes' if key.admin else 'no'})")
    print(token)
    err.print("[yellow]This token is shown only once and cannot be shown again: store it now.[/yellow] "
              f"Revoke it with `ragline keys revoke {key.id}`.")


@keys_cli.command("list")
def list_keys(
    tenant: Annotated[Optional[str], typer.Option("--tenant", help="only this tenant's keys")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the keys as JSON")] = False,
) -> None:
    """List API keys, revoked ones too; tokens are never shown (only their hash is stored)."""
    keys: list[ApiKey] = _with_database(lambda database: database.keys.list(tenant))
    if json_output:
        print(json.dumps([key.to_dict() for key in keys]))
        return
    if not keys:
        out.print("no API keys" + (f" for tenant {escape(tenant)}" if tenant else ""))
        return
    table = Table(Column("id", no_wrap=True, min_width=16), Column("tenant", no_wrap=True), "name", "groups", "admin",
                  Column("created (UTC)", no_wrap=True), Column("state", no_wrap=True))
    for key in keys:
        table.add_row(
            key.id, escape(key.tenant), escape(key.name), escape(", ".join(key.groups)), "yes" if key.admin else "",
            key.created_at.strftime("%Y-%m-%d %H:%M"), "revoked" if key.revoked_at else "active",
        )
    out.print(table)


@keys_cli.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="the key's id (see `ragline keys list`)")]) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    if not _with_database(lambda database: database.keys.revoke(key_id)):
        err.print(f"[bold red]error:[/bold red] no active API key {escape(key_id)} "
                  "(unknown or revoked already: see `ragline keys list`)")
        raise typer.Exit(1)
    out.print(f"revoked API key {escape(key_id)}")
