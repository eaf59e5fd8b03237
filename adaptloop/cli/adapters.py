"""A user's adapters: `ask`, `status`, `history`, `report`, `rollback`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, new_command_id, pass_ctx, user_arg
from core.settings import Settings


def _registry(settings: Settings):
    from trainer.registry import AdapterRegistry

    return AdapterRegistry.from_settings(settings)


@cli.command("ask")
@click.option("--user-id", required=True)
@click.option("--version", type=click.IntRange(1), default=None, help="a version instead of the active one")
@click.argument("prompt")
@pass_ctx
def ask_cmd(ctx: CliContext, user_id: str, version: int | None, prompt: str) -> None:
    """Answer a prompt with the base model plus the user's adapter."""
    from trainer.inference import ask

    answer, used = ask(ctx.settings, user_arg(user_id, "--user-id"), prompt, version)
    click.echo(f"[{user_id} {'v' + str(used) if used else 'base model'}] {answer}")


@cli.command("status")
@click.argument("user_id")
@click.option("--no-job", is_flag=True, help="the registry only: do not ask Kafka for the user's latest training request")
@pass_ctx
def status_cmd(ctx: CliContext, user_id: str, no_job: bool) -> None:
    """Show a user's active version, its metrics, and their latest training job.

    The job (queued, training with its progress, gating, then how it ended)
    comes from the last day of the user's partition of the requests and
    lifecycle topics; --no-job reads the registry only.
    """
    registry = _registry(ctx.settings)
    user_id = user_arg(user_id)
    active = registry.active(user_id)
    versions = registry.versions(user_id)
    click.echo(f"user {user_id}: active version {active if active else '(none: base model)'}, {len(versions)} version(s) kept")
    for review in (r for r in registry.reviews(user_id) if r.pending):
        click.echo(f"v{review.version} awaits review {review.review_id} (adaptloop review show {review.review_id})")
    if not no_job:
        click.echo(f"job: {_latest_request(ctx.settings, user_id)}")
    if active:
        click.echo(json.dumps(registry.info(user_id, active).manifest.metrics.numbers(), indent=2))


def _latest_request(settings: Settings, user_id: str, hours: float = 24.0) -> str:
    """The user's latest training request and its state, read from the last day of the user's partition of the
    requests and lifecycle topics (no consumer group)."""
    import time

    from api.jobs import RequestBook
    from core.errors import KafkaOperationError
    from core.kafka.client import ClientConfig
    from core.kafka.io import offset_ranges, read_ranges
    from streams.decoding import partition_of

    client, t = ClientConfig.from_settings(settings), settings.topics
    topics = [t.training_requests.name, t.lifecycle.name]
    try:
        ranges = offset_ranges(client, topics, int((time.time() - hours * 3600) * 1000), timeout=10)
        counts = {topic: sum(1 for r in ranges if r.topic == topic) for topic in topics}
        mine = [r for r in ranges if r.partition == partition_of(user_id.encode(), counts[r.topic])]
        book = RequestBook()
        for record in read_ranges(client, mine, timeout=10):
            body = json.loads(record.value or b"null")
            if isinstance(body, dict) and body.get("user_id") == user_id:
                (book.request if record.topic == t.training_requests.name else book.lifecycle)(body)
    except (KafkaOperationError, ValueError) as exc:
        return f"unknown ({exc})"
    view = book.of(user_id)
    return "none in the last day" if view is None else view.describe()


@cli.command("history")
@click.argument("user_id")
@pass_ctx
def history_cmd(ctx: CliContext, user_id: str) -> None:
    """List a user's adapter versions and what happened to them."""
    from trainer.registry import version_label
    from trainer.report import version_rows

    registry = _registry(ctx.settings)
    user_id = user_arg(user_id)
    shown = {
        "final_loss": "final_loss",
        "core_score": "core_score",
        "validation_score": "user_score",
        "facts_learned": "facts_learned",
        "retention": "retention",
        "forgetting": "forgetting",
    }
    for row in version_rows(registry, user_id):
        scores = "  ".join(f"{name}={row[key]}" for key, name in shown.items() if row[key] is not None)
        gate = {True: "passed", False: "rejected", None: "not validated"}[row["passed"]]
        click.echo(
            f"{'*' if row['active'] else ' '} v{row['version']}  {(row['trained_at'] or '')[:19]}  trigger={row['trigger']}  "
            f"gate={gate}  {scores}"
        )
    for entry in registry.history(user_id):
        why = entry.get("reason") or "; ".join(entry.get("reasons", []))
        click.echo(f"  {entry['at'][:19]}  {version_label(entry['version'])}  {entry['status']}" + (f"  ({why})" if why else ""))


@cli.command("report")
@click.argument("user_id")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="directory for the PNGs and the page")
@pass_ctx
def report_cmd(ctx: CliContext, user_id: str, out_dir: str) -> None:
    """Loss curves, validation scores over versions and the version history of a user, as PNGs and HTML."""
    from trainer.report import build_report

    s = ctx.settings
    report = build_report(_registry(s), user_arg(user_id), threshold=s.promote_if_score)
    if not report.rows:
        raise click.ClickException(f"{user_id} has no adapter versions in {s.storage_root}")
    for path in report.write(Path(out_dir)):
        click.echo(f"wrote {path}")


@cli.command("rollback")
@click.option("--user-id", required=True)
@click.option("--reason", required=True, help="why; recorded in the rollback log and the lifecycle event")
@click.option("--to-version", type=click.IntRange(1), default=None, help="default: the previous good version")
@click.option("--direct", is_flag=True, help="apply to the registry here instead of sending a command to the trainers")
@click.option("--timeout", type=click.FloatRange(0), default=120.0, show_default=True, help="seconds to wait for the outcome")
@pass_ctx
def rollback_cmd(ctx: CliContext, user_id: str, reason: str, to_version: int | None, direct: bool, timeout: float) -> None:
    """Make the previous good (or a named) adapter version active again; before v1 that is the base model."""
    from trainer.registry import version_label

    s = ctx.settings
    user_id = user_arg(user_id, "--user-id")
    if direct:
        _rollback_here(s, user_id, reason, to_version)
        return
    from adaptloop.commands import send_command
    from core.kafka.client import ClientConfig
    from schemas import RollbackCommand

    command = RollbackCommand(command_id=new_command_id(), user_id=user_id, reason=reason, to_version=to_version)
    event = send_command(ClientConfig.from_settings(s), s.topics.commands.name, s.topics.lifecycle.name, command, timeout)
    if event is None:
        click.echo(
            f"command {command.command_id} sent; no outcome within {timeout:.0f}s (is `adaptloop trainer` running?)", err=True
        )
        sys.exit(3)
    if event.type != "rolled_back":
        click.echo(f"rollback not done: {event.reason}", err=True)
        sys.exit(1)
    click.echo(f"{user_id}: {version_label(event.previous_version)} -> {version_label(event.version)} active")


def _rollback_here(settings: Settings, user_id: str, reason: str, to_version: int | None) -> None:
    from core.errors import RollbackError
    from trainer.registry import version_label

    try:
        new, previous = _registry(settings).rollback(user_id, reason, to_version, requested_by="cli --direct")
    except RollbackError as exc:
        click.echo(f"rollback not done: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{user_id}: {version_label(previous)} -> {version_label(new)} active")
