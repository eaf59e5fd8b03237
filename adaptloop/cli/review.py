"""`adaptloop review`: the people's side of review mode (trainer/review.py).

    adaptloop review list                       one line per pending review: ID, user, version, age
    adaptloop review show ID                    the gate's scores, the user's cases before and after, changed core answers
    adaptloop review approve ID [--reason R]    the version becomes active (`promoted` follows)
    adaptloop review deny ID --reason R         it never does
    adaptloop review mode USER auto|review|default

`list`, `show` and `mode` read and write the registry; `approve` and `deny`
send a command to the trainers (who publish `approved` + `promoted` or
`denied`, so servers and the worker follow) and wait for it, or with
`--direct` decide on the registry here (no stack needed: after `adaptloop
train` in review mode, for example).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime

import click

from adaptloop.cli.context import CliContext, cli, new_command_id, pass_ctx, user_arg
from core.settings import Settings


def _registry(settings: Settings):
    from trainer.registry import AdapterRegistry

    return AdapterRegistry.from_settings(settings)


def _found(settings: Settings, review_id: str):
    """The review by its ID, or a usage error saying there is none."""
    from core.errors import ReviewError

    try:
        return _registry(settings).review(review_id)
    except ReviewError as exc:
        raise click.BadParameter(str(exc), param_hint="ID") from None


@cli.group("review")
def review_group() -> None:
    """Approve or deny candidates that wait for a person (promotion.mode: review)."""


@review_group.command("list")
@click.option("--all", "everything", is_flag=True, help="decided reviews too, not only the pending ones")
@click.option("--user-id", default=None, help="one user's reviews")
@pass_ctx
def list_cmd(ctx: CliContext, everything: bool, user_id: str | None) -> None:
    """One line per pending review: its ID, then the user, the version, how long it has waited and when it times out."""
    s = ctx.settings
    reviews = _registry(s).reviews(user_arg(user_id, "--user-id") if user_id else None)
    shown = [r for r in reviews if everything or r.pending]
    now = datetime.now(UTC)
    for r in shown:
        waited = (now - r.opened_at).total_seconds() / 3600
        if r.pending:
            state = f"pending {waited:.1f} h, {s.review.on_timeout} in {max(0.0, s.review.timeout_h - waited):.1f} h"
        else:
            state = f"{r.status} by {r.decided_by}" + (f": {r.reason}" if r.reason else "")
        click.echo(f"{r.review_id}  {r.user_id}  v{r.version}  {state}")
    if not shown:
        click.echo("no pending reviews" if not everything else "no reviews", err=True)


@review_group.command("show")
@click.argument("review_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="the whole record as JSON")
@pass_ctx
def show_cmd(ctx: CliContext, review_id: str, as_json: bool) -> None:
    """What to decide on: the gate's verdict and scores, the user's cases before and after, changed core answers."""
    from trainer.review import review_details

    details = review_details(_registry(ctx.settings), _found(ctx.settings, review_id))
    if as_json:
        click.echo(json.dumps(details, indent=2, ensure_ascii=False))
        return
    r = details["review"]
    click.echo(f"{r['review_id']}: {r['user_id']} v{r['version']}, {r['status']}, opened {r['opened_at']}")
    click.echo("gate: " + ", ".join(f"{k} {v:.3f}" for k, v in details["metrics"].items()))
    if r.get("opened_because"):
        click.echo(f"waits because: {r['opened_because']}")
    for c in details["contradictions"]:
        click.echo(
            f"  contradicts: {c['prompt']} -> {c['taught']!r}; the base model says {c['base_answer']!r} (p {c['confidence']:.2f})"
        )
    for title, key in (("user suite", "user_cases"), ("core answers that changed most", "core_changed")):
        click.echo(f"{title}:")
        for case in details[key] or [{"prompt": "(none)"}]:
            click.echo(f"  Q: {case['prompt']}")
            if "answer" in case:
                click.echo(f"     before: {case.get('before', '(not recorded)')}")
                click.echo(
                    f"     after:  {case['answer']}  (score {case.get('before_score', float('nan')):.2f} -> {case['score']:.2f})"
                )


def _decision(command: Callable) -> Callable:
    """What approve and deny share: the review's ID, --direct, --timeout, the context."""
    for option in (
        pass_ctx,
        click.option(
            "--timeout", type=click.FloatRange(0), default=120.0, show_default=True, help="seconds to wait for the outcome"
        ),
        click.option("--direct", is_flag=True, help="decide on the registry here instead of sending a command to the trainers"),
    ):
        command = option(command)
    return click.argument("review_id", metavar="ID")(command)


@review_group.command("approve")
@click.option("--reason", default=None, help="recorded with the decision")
@_decision
def approve_cmd(ctx: CliContext, review_id: str, reason: str | None, direct: bool, timeout: float) -> None:
    """Approve: the version becomes the user's active adapter."""
    _decide(ctx.settings, review_id, True, reason, direct, timeout)


@review_group.command("deny")
@click.option("--reason", required=True, help="why; recorded with the decision and in the `denied` event")
@_decision
def deny_cmd(ctx: CliContext, review_id: str, reason: str, direct: bool, timeout: float) -> None:
    """Deny: the version never becomes active."""
    _decide(ctx.settings, review_id, False, reason, direct, timeout)


def _decide(settings: Settings, review_id: str, approve: bool, reason: str | None, direct: bool, timeout: float) -> None:
    review = _found(settings, review_id)
    if direct:
        _decide_here(settings, review_id, approve, reason)
        return
    from adaptloop.commands import send_command
    from core.kafka.client import ClientConfig
    from schemas import ApproveCommand, DenyCommand

    kind = ApproveCommand if approve else DenyCommand
    command = kind(command_id=new_command_id(), user_id=review.user_id, review_id=review_id, reason=reason)
    s = settings
    event = send_command(ClientConfig.from_settings(s), s.topics.commands.name, s.topics.lifecycle.name, command, timeout)
    if event is None:
        click.echo(
            f"command {command.command_id} sent; no outcome within {timeout:.0f}s (is `adaptloop trainer` running?"
            " --direct decides here)",
            err=True,
        )
        sys.exit(3)
    if event.type == "command_failed":
        click.echo(f"not done: {event.reason}", err=True)
        sys.exit(1)
    click.echo(f"{review.user_id} v{review.version}: {'approved, now active' if approve else 'denied'}")


def _decide_here(settings: Settings, review_id: str, approve: bool, reason: str | None) -> None:
    from core.errors import ReviewError
    from trainer.review import decide

    try:
        review = decide(_registry(settings), review_id, approve, by="cli --direct", reason=reason).review
    except ReviewError as exc:
        click.echo(f"not done: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{review.user_id} v{review.version}: {'approved, now active' if approve else 'denied'}")


@review_group.command("mode")
@click.argument("user_id")
@click.argument("mode", type=click.Choice(["auto", "review", "default"]))
@pass_ctx
def mode_cmd(ctx: CliContext, user_id: str, mode: str) -> None:
    """Set one user's promotion mode; `default` goes back to the configured promotion.mode."""
    registry = _registry(ctx.settings)
    user_id = user_arg(user_id)
    registry.set_user_promotion_mode(user_id, None if mode == "default" else mode, by="cli")
    from trainer.review import promotion_mode

    now = promotion_mode(registry, user_id, ctx.settings.promotion.mode)
    click.echo(f"{user_id}: promotion mode {now}" + (" (the configured default)" if mode == "default" else ""))
