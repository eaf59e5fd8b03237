"""`adaptloop config show|check` and `adaptloop schemas export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, pass_ctx
from core.errors import AdaptloopError
from core.settings import load_settings


@cli.group()
def schemas() -> None:
    """Message schemas for producers in any language."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
def schemas_export(directory: str) -> None:
    """Write one JSON Schema file per message type into DIRECTORY."""
    from schemas import export_json_schemas

    for path in export_json_schemas(Path(directory)):
        click.echo(str(path))


@cli.group()
def config() -> None:
    """Inspect the settings."""


@config.command("show")
@pass_ctx
def config_show(ctx: CliContext) -> None:
    """Print the resolved settings as JSON (secrets masked)."""
    click.echo(json.dumps(json.loads(ctx.settings.model_dump_json()), indent=2))


@config.command("reference")
def config_reference() -> None:
    """Print every setting with its environment variable, default and meaning (Markdown)."""
    from core.settings import reference_markdown

    click.echo(reference_markdown(), nl=False)


@config.command("check")
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False, exists=True))
def config_check(paths: tuple[str, ...]) -> None:
    """Validate settings files; list every bad key and exit 2 if any is invalid."""
    failed = False
    for path in paths:
        try:
            load_settings(path)
            click.echo(f"ok      {path}")
        except AdaptloopError as exc:
            failed = True
            click.echo(f"invalid {exc}")
    if failed:
        sys.exit(2)
