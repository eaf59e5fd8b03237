"""The streams side's commands: `worker`, `generate-data`, `publish`, `replay`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, parse_time, pass_ctx, user_arg
from core.kafka.client import ClientConfig


@cli.command("worker")
@click.option("--web-port", type=click.IntRange(0, 65535), default=None, help="metrics port (0 = off)")
@click.option("--loglevel", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@pass_ctx
def worker(ctx: CliContext, web_port: int | None, loglevel: str) -> None:
    """Run the streams worker: validate, curate, count gaps, emit training requests."""
    from streams.worker import run_worker

    run_worker(ctx.settings, web_port=web_port, loglevel=loglevel)


@cli.command("generate-data")
@click.option("--user-id", required=True, help="whose dataset")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="training JSONL to write")
@click.option("--include-global", is_flag=True, help="mix in the global concept pool")
@click.option("--since", default=None, help="ISO-8601 time to read the input topics from (default: the beginning)")
@pass_ctx
def generate_data(ctx: CliContext, user_id: str, output: str, include_global: bool, since: str | None) -> None:
    """Build a user's dataset offline from the input topics (same curation as the worker)."""
    from streams.config import WorkerConfig
    from streams.generate import generate_dataset

    user_id = user_arg(user_id, "--user-id")
    since_ms = 0 if since is None else parse_time(since, "--since")
    result = generate_dataset(
        WorkerConfig.from_settings(ctx.settings), user_id, Path(output), since_ms=since_ms, include_global=include_global
    )
    click.echo(
        f"{result.events} events for {user_id} ({result.invalid} invalid skipped): "
        f"{len(result.train)} training examples -> {result.train_path}, {len(result.test)} held out -> {result.test_path}"
    )


@cli.command("publish")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--dry-run", is_flag=True, help="check the file and show where each line would go; send nothing")
@pass_ctx
def publish_cmd(ctx: CliContext, path: str, dry_run: bool) -> None:
    """Publish recorded events (JSONL) to their topics: each line names its topic or its event type."""
    from adaptloop.publish import publish, read_publish_file, retention_warnings

    settings = ctx.settings
    topics = {name: getattr(settings.topics, name).name for name in type(settings.topics).model_fields}
    records = read_publish_file(Path(path), topics)
    client = ClientConfig.from_settings(settings)
    for warning in retention_warnings(client, records):
        click.echo(f"warning: {warning}", err=True)
    counts: dict[str, int] = {}
    if dry_run:
        for record in records:
            counts[record.topic] = counts.get(record.topic, 0) + 1
    else:
        counts = publish(client, records)
    for topic, n in counts.items():
        click.echo(f"{n:8d} {'would go to' if dry_run else '->'} {topic}")
    click.echo(f"{sum(counts.values())} record(s) {'checked' if dry_run else 'published'} from {path}")


@cli.command("replay")
@click.option("--from", "from_", required=True, help="ISO-8601 time to re-read the topics from (broker timestamps)")
@click.option("--to", "to", default=None, help="ISO-8601 time to stop before (default: the end as of now)")
@click.option(
    "--topics",
    "topic_list",
    default=None,
    help="comma-separated topic keys or names (default: the input topics, commands and lifecycle)",
)
@click.option("--user-id", default=None, help="rebuild this user only")
@click.option("--app-id", default=None, help="the new app version (default: <streams.app_id>-replay-<UTC stamp>)")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="where datasets and requests.jsonl go (default: <storage_root>/replays/<app version>)",
)
@click.option("--emit-requests", is_flag=True, help="also send the rebuilt training requests to the live topic")
@click.option("--dry-run", is_flag=True, help="print the offset plan and stop")
@pass_ctx
def replay_cmd(
    ctx: CliContext,
    from_: str,
    to: str | None,
    topic_list: str | None,
    user_id: str | None,
    app_id: str | None,
    out_dir: str | None,
    emit_requests: bool,
    dry_run: bool,
) -> None:
    """Re-read the input topics from a point in time into a fresh app version: tables and datasets rebuilt."""
    from streams.config import WorkerConfig
    from streams.replay import default_app_id, plan_replay, run_replay

    settings = ctx.settings
    cfg = WorkerConfig.from_settings(settings)
    topics = _replay_topics(cfg, topic_list)
    app = app_id or default_app_id(cfg.app_id)
    if app == cfg.app_id:
        raise click.BadParameter("the replay needs a new app version, not the live one", param_hint="--app-id")
    plan = plan_replay(
        cfg.client,
        topics,
        parse_time(from_, "--from"),
        parse_time(to, "--to") if to else None,
        app,
        user_arg(user_id, "--user-id") if user_id else None,
        _replay_topics(cfg, None),
    )
    for line in plan.lines():
        click.echo(line)
    if dry_run:
        return
    target = Path(out_dir) if out_dir else Path(settings.storage_root) / "replays" / app
    with click.progressbar(length=max(plan.total, 1), label="replaying", file=sys.stderr) as bar:
        done = [0]

        def progress(n: int, _total: int) -> None:
            bar.update(n - done[0])
            done[0] = n

        result = run_replay(plan, cfg, target, emit_requests=emit_requests, progress=progress)
    _say_replayed(result, target, app)


def _replay_topics(cfg, topic_list: str | None) -> list[str]:
    """The topics to replay: those named (config keys or names), else the input topics, commands and lifecycle."""
    from adaptloop.publish import PublishFileError, resolve_topic

    known = {**cfg.input_topics, "commands": cfg.commands_topic, "lifecycle": cfg.lifecycle_topic}
    if not topic_list:
        return list(known.values())
    try:
        return [resolve_topic(t.strip(), known, "--topics") for t in topic_list.split(",") if t.strip()]
    except PublishFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--topics") from None


def _say_replayed(result, target: Path, app: str) -> None:
    click.echo(
        f"{result.records} record(s) in {result.seconds:.1f}s: {result.events} events applied for "
        f"{result.users} user(s), {result.dead_letters} invalid (dead-lettered live), "
        f"{len(result.requests)} training request(s) -> {target / 'requests.jsonl'}"
    )
    for request in result.requests:
        click.echo(f"  {request.user_id}: {request.trigger} dataset {request.dataset.uri} (sha256 {request.dataset.sha256[:12]})")
    if result.tables_written:
        counts = ", ".join(f"{n} {name}" for name, n in result.tables_written.items())
        click.echo(
            f"tables rebuilt on app version {app} ({counts}); its offsets are committed at the plan's end:\n"
            f"  set streams.app_id: {app} to run the worker from there"
        )
