"""`adaptloop consent`: a user's standing choice about training on their data.

    adaptloop consent USER --no-train      # opt out: pending examples dropped, no training requests
    adaptloop consent USER --train         # opt back in: new events count from here on

The choice travels as a `consent` command on the commands topic and is
applied by the worker that owns the user (the API's
`PUT /api/adapter/users/{user_id}/consent` sends the same command).
Events marked `"consent": "no-train"` are never trained on, whatever the
standing choice.
"""

from __future__ import annotations

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
    produce(ClientConfig.from_settings(s.kafka), s.topics.commands.name, [(user_id, command.to_bytes())])
    choice = "may be trained on" if train else "opted out of training"
    click.echo(f"{user_id}: {choice} (command {command.command_id} sent; the worker applies it)")
