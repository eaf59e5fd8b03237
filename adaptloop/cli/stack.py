"""`adaptloop up|down` (the whole stack on this machine) and `adaptloop demo`."""

from __future__ import annotations

from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, pass_ctx
from core.kafka.broker import LocalBroker
from core.kafka.client import ClientConfig
from core.kafka.topics import ensure_topics, plans_from_specs
from core.settings import stack_dir, write_settings

STACK_SERVICES = ("worker", "trainer", "api", "serve")


@cli.command("up")
@click.option("--services", default=",".join(STACK_SERVICES), show_default=True, help="which services to start")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(1),
    default=900,
    show_default=True,
    help="seconds to wait for every service to be ready (the first trainer start converts the model)",
)
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="logs and pids (default <cache_dir>/stack)")
@pass_ctx
def up_cmd(ctx: CliContext, services: str, timeout_s: float, run_dir: str | None) -> None:
    """Start the local stack: broker, topics, worker, trainer, API and serve.

    The broker only when KAFKA_BOOTSTRAP_SERVERS is not set.
    """
    from adaptloop.stack import Stack
    from adaptloop.stack import services as stack_services

    names = [n.strip() for n in services.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STACK_SERVICES))
    if unknown:
        raise click.BadParameter(
            f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(STACK_SERVICES)}", param_hint="--services"
        )
    s = ctx.settings
    stack = Stack(Path(run_dir) if run_dir else stack_dir(s))
    broker_port = None
    if s.external_kafka:
        bootstrap = s.kafka.bootstrap_servers
        click.echo(f"Kafka: {bootstrap} (KAFKA_BOOTSTRAP_SERVERS)")
    else:
        broker = LocalBroker.from_settings(s)
        bootstrap, broker_port = broker.up(), broker.port
        click.echo(f"Kafka: local broker at {bootstrap}")
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"bootstrap_servers": bootstrap})})
    for outcome in ensure_topics(ClientConfig.from_settings(s), plans_from_specs(s.topics.all())):
        if outcome.created:
            click.echo(f"created topic {outcome.name}")
    config_file = Path(ctx.config_path).resolve() if ctx.config_path else write_settings(s, stack.run_dir / "settings.yaml")
    wanted = [svc for svc in stack_services(s) if svc.name in names]
    click.echo(f"logs: {stack.run_dir / 'logs'}")
    running = stack.up(config_file, bootstrap, wanted, broker_port, say=click.echo, timeout_s=timeout_s)
    click.echo(f"up: {', '.join(sorted(running))}. Stop with `adaptloop down`.")
    if {"api", "serve"} & set(names):
        click.echo("a token for the API and serve: adaptloop api token create --scope admin")


@cli.command("down")
@click.option("--keep-broker", is_flag=True, help="leave the local broker running")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="as given to `up`")
@pass_ctx
def down_cmd(ctx: CliContext, keep_broker: bool, run_dir: str | None) -> None:
    """Stop what `adaptloop up` started (services first, then the broker it started); data is kept."""
    from adaptloop.stack import Stack

    s = ctx.settings
    broker_port = Stack(Path(run_dir) if run_dir else stack_dir(s)).down(say=click.echo)
    if broker_port is not None and not keep_broker:
        stopped = LocalBroker.from_settings(s, broker_port).down()
        click.echo(f"stopped the local broker on port {broker_port}" if stopped else "the local broker was not running")
    click.echo("down")


@cli.command("demo")
@pass_ctx
def demo(ctx: CliContext) -> None:
    """Run the main job end to end on the embedded defaults, narrating each step."""
    from adaptloop.demo import run_demo

    settings = ctx.settings
    run_demo(settings, local_broker=None if settings.external_kafka else LocalBroker.from_settings(settings))
