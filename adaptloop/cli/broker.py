"""`adaptloop kafka up|down|status` (a local single-node broker) and `adaptloop topics ensure`."""

from __future__ import annotations

import click

from adaptloop.cli.context import CliContext, cli, pass_ctx
from core.kafka.broker import LocalBroker, broker_answers
from core.kafka.client import ClientConfig
from core.kafka.topics import ensure_topics, plans_from_specs

PORT = click.option("--port", type=click.IntRange(1, 65535), default=None, help="client port (default from config)")


@cli.group()
def kafka() -> None:
    """Run a local single-node Kafka broker (KRaft) from Maven Central jars."""


@kafka.command("up")
@PORT
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="broker data directory")
@pass_ctx
def kafka_up(ctx: CliContext, port: int | None, data_dir: str | None) -> None:
    """Start the local broker (idempotent) and print its bootstrap address."""
    settings = ctx.settings
    if settings.external_kafka:
        click.echo(f"KAFKA_BOOTSTRAP_SERVERS is set: using {settings.kafka.bootstrap_servers}, no local broker started")
        return
    click.echo(LocalBroker.from_settings(settings, port, data_dir).up())


@kafka.command("down")
@PORT
@pass_ctx
def kafka_down(ctx: CliContext, port: int | None) -> None:
    """Stop the local broker cleanly (SIGTERM, then wait); its data is kept."""
    broker = LocalBroker.from_settings(ctx.settings, port)
    click.echo(f"stopped broker on port {broker.port}" if broker.down() else f"no broker was running on port {broker.port}")


@kafka.command("status")
@PORT
@pass_ctx
def kafka_status(ctx: CliContext, port: int | None) -> None:
    """Say whether the local broker is up, and where."""
    settings = ctx.settings
    if settings.external_kafka:
        up = broker_answers(settings.kafka.bootstrap_servers)
        click.echo(f"external cluster {settings.kafka.bootstrap_servers}: {'answering' if up else 'NOT answering'}")
        return
    click.echo(LocalBroker.from_settings(settings, port).status())


@cli.group()
def topics() -> None:
    """Manage adaptloop's Kafka topics."""


@topics.command("ensure")
@pass_ctx
def topics_ensure(ctx: CliContext) -> None:
    """Create every configured topic that is missing (idempotent)."""
    settings = ctx.settings
    for o in ensure_topics(ClientConfig.from_settings(settings), plans_from_specs(settings.topics.all())):
        state = "created" if o.created else "exists "
        click.echo(f"{state} {o.name} ({o.partitions} partitions){'  ! ' + o.note if o.note else ''}")
