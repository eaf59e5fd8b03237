"""`adaptloop consent`, `export` and `forget`: a user's choice about training, a copy of what is held, erasure.

    adaptloop consent USER --no-train      # opt out: pending examples dropped, no training requests
    adaptloop consent USER --train         # opt back in: new events count from here on

The choice travels as a `consent` command on the commands topic and is
applied by the worker that owns the user (the API's
`PUT /api/adapter/users/{user_id}/consent` sends the same command).
Events marked `"consent": "no-train"` are never trained on, whatever the
standing choice.

    adaptloop export USER --out DIR [--no-worker-state]

writes everything held about USER into DIR (privacy/export.py: datasets,
pending examples, every kept adapter with its manifest, history, validation
results, rollbacks, lineage), with a README.md saying what each part is.

    adaptloop forget USER --reason "erasure request #1234"

erases USER everywhere adaptloop keeps them (privacy/forget.py): datasets,
adapters, checkpoints, log lines (a tombstone with a salted hash instead),
the worker's state and changelog records; their older events on the input
topics are ignored from then on. Run it again if it was interrupted.
"""

from __future__ import annotations

from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, new_command_id, pass_ctx, user_arg


@cli.command("consent")
@click.argument("user_id")
@click.option("--train/--no-train", required=True, help="allow training on this user's data, or stop it")
@pass_ctx
def consent_cmd(ctx: CliContext, user_id: str, train: bool) -> None:
    """Opt USER_ID out of training (--no-train) or back in (--train)."""
    from core.kafka.client import ClientConfig
    from core.kafka.io import produce
    from schemas import ConsentCommand

    s = ctx.settings
    user_id = user_arg(user_id, "USER_ID")
    command = ConsentCommand(command_id=new_command_id(), user_id=user_id, train=train)
    produce(ClientConfig.from_settings(s), s.topics.commands.name, [(user_id, command.to_bytes())])
    choice = "may be trained on" if train else "opted out of training"
    click.echo(f"{user_id}: {choice} (command {command.command_id} sent; the worker applies it)")


@cli.command("export")
@click.argument("user_id")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="a new, empty directory")
@click.option("--no-worker-state", is_flag=True, help="skip the worker's state and pending examples (read from Kafka otherwise)")
@pass_ctx
def export_cmd(ctx: CliContext, user_id: str, out: Path, no_worker_state: bool) -> None:
    """Write everything adaptloop holds about USER_ID into a directory (machine-readable, with a README)."""
    from privacy.export import ExportConfig, export_user, read_worker_holdings

    cfg = ExportConfig.from_settings(ctx.settings)
    user_id = user_arg(user_id, "USER_ID")
    held = None if no_worker_state else read_worker_holdings(cfg, user_id)
    index = export_user(cfg, user_id, out, held)
    click.echo(f"{user_id}: {len(index.parts)} parts written to {out} (see {out / 'README.md'})")


@cli.command("forget")
@click.argument("user_id")
@click.option("--reason", required=True, help="why (kept in the tombstones, with the salted hash and the time)")
@pass_ctx
def forget_cmd(ctx: CliContext, user_id: str, reason: str) -> None:
    """Erase USER_ID everywhere adaptloop keeps them (idempotent; finishes an interrupted forget)."""
    from api.auth import TokenStore
    from core.settings import tokens_file
    from core.storage import is_local
    from privacy.forget import ForgetConfig, forget_user

    user_id = user_arg(user_id, "USER_ID")
    result = forget_user(ForgetConfig.from_settings(ctx.settings), user_id, reason)
    if ctx.settings.api.tokens_file is not None or is_local(ctx.settings.storage_root):
        revoked = TokenStore(tokens_file(ctx.settings)).forget_user(user_id)  # tokens name the user they act for
        result.removed += [f"api tokens of the user: {revoked}"] if revoked else []
    finished = "an interrupted forget finished" if result.resumed else "forgotten"
    click.echo(f"{user_id}: {finished} at {result.forgotten_at} (hash {result.user_hash}); {len(result.removed)} item(s) removed")
    for item in result.removed:
        click.echo(f"  removed {item}")
    click.echo("  the worker drops its state when it reads the forget command")
