"""The trainer side's commands: `trainer` (the service), `train` and `validate` (offline)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, pass_ctx, user_arg
from core.encryption import open_store
from core.errors import StorageError, TrainingSkipped


@cli.command("trainer")
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None, help="Prometheus port (0 = off; default from config)"
)
@pass_ctx
def trainer_cmd(ctx: CliContext, metrics_port: int | None) -> None:
    """Run the training consumer: train adapters for requests on adapter.training-requests."""
    from core.kafka.client import ClientConfig
    from core.kafka.topics import ensure_topics, plans_from_specs
    from trainer.service import run_trainer

    s = ctx.settings
    ensure_topics(ClientConfig.from_settings(s), plans_from_specs(s.topics.all()))
    run_trainer(s, metrics_port)


@cli.command("train")
@click.option("--user-id", default=None, help="the user (with --data-path)")
@click.option("--data-path", default=None, type=click.Path(dir_okay=False, exists=True), help="dataset JSONL")
@click.option(
    "--batch",
    "batch_path",
    default=None,
    type=click.Path(dir_okay=False, exists=True),
    help='JSONL of {"user_id": ..., "data_path": ...}: train those users together in one batched pass, each gated',
)
@click.option("--epochs", type=click.IntRange(1, 1000), default=None, help="default from config")
@click.option("--no-hold-out", is_flag=True, help="train on every example (no held-out validation cases)")
@click.option("--no-gate", is_flag=True, help="skip the validation gate: the version stays a candidate, never active")
@pass_ctx
def train_cmd(
    ctx: CliContext,
    user_id: str | None,
    data_path: str | None,
    batch_path: str | None,
    epochs: int | None,
    no_hold_out: bool,
    no_gate: bool,
) -> None:
    """Train and gate a user's next adapter version, or a --batch of users together.

    Each version is validated by the gate (promoted or rejected) unless --no-gate.
    """
    from core.errors import InvalidMessage
    from trainer.job import read_batch_file, train_batch_file, train_file

    settings = ctx.settings
    hold_out = settings.training.hold_out and not no_hold_out
    if batch_path is not None:
        if user_id or data_path:
            raise click.UsageError("--batch lists the users itself: leave out --user-id and --data-path")
        try:
            entries = read_batch_file(Path(batch_path))
        except InvalidMessage as exc:
            raise click.BadParameter(exc.reason, param_hint="--batch") from None
        answers = train_batch_file(settings, entries, epochs=epochs, hold_out=hold_out, with_gate=not no_gate)
        failed = [user for user, answer in answers if not _say(settings, user, answer)]
        if failed:
            click.echo(f"{len(failed)} of {len(answers)} users failed: {', '.join(failed)}", err=True)
            sys.exit(1)
        return
    if not user_id or not data_path:
        raise click.UsageError("give --user-id and --data-path, or --batch FILE")
    user_id = user_arg(user_id, "--user-id")
    try:
        outcome = train_file(settings, user_id, Path(data_path), epochs=epochs, hold_out=hold_out, with_gate=not no_gate)
    except TrainingSkipped as exc:
        outcome = exc
    _say(settings, user_id, outcome)


def _say(settings, user_id: str, outcome) -> bool:
    """Print what became of one user's training; False when it failed."""
    from trainer.registry import AdapterRegistry

    if isinstance(outcome, TrainingSkipped):
        click.echo(f"{user_id}: skipped, {outcome.reason} (nothing was trained, no version registered)")
        return True
    if isinstance(outcome, Exception):
        click.echo(f"{user_id}: FAILED, {type(outcome).__name__}: {outcome}")
        return False
    info = outcome.info
    m = info.manifest.metrics
    click.echo(f"{user_id} v{info.version}: {m.steps} steps in {m.train_seconds}s, final loss {m.final_loss}")
    if outcome.report is not None:
        for line in outcome.report.lines():
            click.echo("  " + line)
    if outcome.decision == "promoted":
        click.echo(f"  v{info.version} promoted: it is now active")
    elif outcome.decision == "awaiting_review":
        review = next(r for r in AdapterRegistry.from_settings(settings).reviews(user_id) if r.version == info.version)
        click.echo(f"  v{info.version} passed and awaits review {review.review_id}: adaptloop review show {review.review_id}")
    elif outcome.decision == "rejected":
        active = AdapterRegistry.from_settings(settings).active(user_id)
        click.echo(f"  v{info.version} rejected; the active version is still {active or 'the base model'}")
    else:
        click.echo(f"  registered as a candidate at {info.path} (not validated, not active)")
    return True


@cli.command("validate")
@click.option("--adapter", "adapter", required=True, type=click.Path(file_okay=False, exists=True), help="PEFT adapter directory")
@click.option("--user-id", required=True)
@click.option(
    "--baseline",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="adapter to compare with on the core suite (default: the user's active one, else the base model)",
)
@pass_ctx
def validate_cmd(ctx: CliContext, adapter: str, user_id: str, baseline: str | None) -> None:
    """Run the validation gate on an adapter offline; exit 0 if it passes, 1 if rejected."""
    from trainer.gate import GateSpec
    from trainer.job import validate_adapter
    from trainer.model import load_base, resolve_base_model
    from trainer.registry import AdapterRegistry, verify_adapter_dir

    s = ctx.settings
    user_id = user_arg(user_id, "--user-id")
    registry = AdapterRegistry.from_settings(s)
    try:
        verify_adapter_dir(Path(adapter))  # a tampered adapter fails here, before the model is even loaded
    except StorageError as exc:
        registry.log_validation(
            user_id, None, {"passed": False, "reasons": [str(exc)], "metrics": {}}, kind="validate", adapter=str(adapter)
        )
        click.echo(f"REJECTED: {exc}")
        sys.exit(1)
    spec = GateSpec.from_settings(s)
    base = resolve_base_model(s.model.base_model, s.model.gguf_file, s.cache_dir)
    model, tokenizer, device = load_base(base, s.model.dtype)
    report = validate_adapter(
        gate=spec.build(model, tokenizer, device, base.sha256),
        registry=registry,
        store=open_store(s.storage_root, s.storage.encryption),
        tests_dir=spec.user_tests_dir,
        user_id=user_id,
        adapter=Path(adapter),
        baseline=Path(baseline) if baseline else None,
    )
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.passed else 1)
