"""`adaptloop api` (serve the HTTP API) and `adaptloop api token create|list|revoke`."""

from __future__ import annotations

import sys

import click

from adaptloop.cli.context import CliContext, cli, pass_ctx
from core.settings import tokens_file


@cli.group("api", invoke_without_command=True)
@click.option("--host", default=None, help="default from config (api.host)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="default from config (api.port)")
@click.pass_context
def api_group(click_ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs); `api token` manages bearer tokens."""
    if click_ctx.invoked_subcommand is not None:
        return
    from api.app import run_api
    from api.config import ApiConfig
    from core.kafka.client import ClientConfig
    from core.kafka.topics import ensure_topics, plans_from_specs

    s = click_ctx.find_object(CliContext).settings
    ensure_topics(ClientConfig.from_settings(s), plans_from_specs(s.topics.all()))
    run_api(ApiConfig.from_settings(s), host or s.api.host, port or s.api.port)


@api_group.group("token")
def api_token() -> None:
    """Create, list and revoke the API's bearer tokens."""


@api_token.command("create")
@click.option("--scope", "scopes", multiple=True, required=True, help="admin, or user:<user_id> (repeatable)")
@click.option("--note", default="", help="what the token is for")
@pass_ctx
def api_token_create(ctx: CliContext, scopes: tuple[str, ...], note: str) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from api.auth import TokenStore

    token_id, token = TokenStore(tokens_file(ctx.settings)).create(list(scopes), note)
    click.echo(f"token id {token_id} ({', '.join(scopes)}); shown once, store it now:", err=True)
    click.echo(token)


@api_token.command("list")
@pass_ctx
def api_token_list(ctx: CliContext) -> None:
    """List token ids and scopes (never the tokens)."""
    from api.auth import TokenStore

    for token_id, entry in TokenStore(tokens_file(ctx.settings)).list().items():
        click.echo(f"{token_id}  {','.join(entry['scopes'])}  {entry['created_at'][:19]}  {entry.get('note', '')}")


@api_token.command("revoke")
@click.argument("token_id")
@pass_ctx
def api_token_revoke(ctx: CliContext, token_id: str) -> None:
    """Revoke a token by its id."""
    from api.auth import TokenStore

    if not TokenStore(tokens_file(ctx.settings)).revoke(token_id):
        click.echo(f"no token {token_id}", err=True)
        sys.exit(1)
    click.echo(f"revoked {token_id}")
