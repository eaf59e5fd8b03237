"""The `adaptloop` command line: one entry point, one subcommand per job.

Run `adaptloop --help` for the list. Every command accepts `--config PATH`
(else ADAPTLOOP_CONFIG, else ./config/adapter_retrain.yaml, else the shipped
default). Errors adaptloop expects print one clear message and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from adaptloop.errors import AdaptloopError, ConfigError, StorageError
from adaptloop.settings import Settings, load_settings


class _Context:
    """Loads the settings once, on first use, so `--help` never needs a config."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings


pass_ctx = click.make_pass_decorator(_Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "terminal_width": 120})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="settings YAML file")
@click.version_option(package_name="adaptloop")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """adaptloop: turn assistant failures into per-user LoRA adapters, safely."""
    ctx.obj = _Context(config_path)


# --------------------------------------------------------------------------- #
# kafka
# --------------------------------------------------------------------------- #


@cli.group()
def kafka() -> None:
    """Run a local single-node Kafka broker (KRaft) from Maven Central jars."""


def _local_broker(settings: Settings, port: int | None = None, data_dir: str | None = None):
    from adaptloop.kafka.broker import LocalBroker

    lb = settings.kafka.local_broker
    return LocalBroker(
        port=port or lb.port,
        cache_dir=settings.cache_dir,
        data_dir=Path(data_dir) if data_dir else lb.data_dir,
        kafka_version=lb.kafka_version,
        heap=lb.heap,
        startup_timeout_s=lb.startup_timeout_s,
    )


@kafka.command("up")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="client port (default from config)")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="broker data directory")
@pass_ctx
def kafka_up(ctx: _Context, port: int | None, data_dir: str | None) -> None:
    """Start the local broker (idempotent) and print its bootstrap address."""
    settings = ctx.settings
    if settings.external_kafka:
        click.echo(f"KAFKA_BOOTSTRAP_SERVERS is set: using {settings.kafka.bootstrap_servers}, no local broker started")
        return
    click.echo(_local_broker(settings, port, data_dir).up())


@kafka.command("down")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="client port (default from config)")
@pass_ctx
def kafka_down(ctx: _Context, port: int | None) -> None:
    """Stop the local broker cleanly (SIGTERM, then wait); its data is kept."""
    broker = _local_broker(ctx.settings, port)
    click.echo(f"stopped broker on port {broker.port}" if broker.down() else f"no broker was running on port {broker.port}")


@kafka.command("status")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="client port (default from config)")
@pass_ctx
def kafka_status(ctx: _Context, port: int | None) -> None:
    """Say whether the local broker is up, and where."""
    settings = ctx.settings
    if settings.external_kafka:
        from adaptloop.kafka.broker import broker_answers

        up = broker_answers(settings.kafka.bootstrap_servers)
        click.echo(f"external cluster {settings.kafka.bootstrap_servers}: {'answering' if up else 'NOT answering'}")
        return
    click.echo(_local_broker(settings, port).status())


# --------------------------------------------------------------------------- #
# the whole local stack
# --------------------------------------------------------------------------- #

STACK_SERVICES = ("worker", "trainer", "api")


@cli.command("up")
@click.option("--services", default=",".join(STACK_SERVICES), show_default=True, help="which services to start")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1), default=900, show_default=True,
              help="seconds to wait for every service to be ready (the first trainer start converts the model)")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="logs and pids (default <cache_dir>/stack)")
@pass_ctx
def up_cmd(ctx: _Context, services: str, timeout_s: float, run_dir: str | None) -> None:
    """Start the local stack: broker (unless KAFKA_BOOTSTRAP_SERVERS is set), topics, worker, trainer, API."""
    from adaptloop.kafka.client import ClientConfig
    from adaptloop.kafka.topics import ensure_topics, plans_from_specs
    from adaptloop.settings import write_settings
    from adaptloop.stack import Stack, services as stack_services

    names = [n.strip() for n in services.split(",") if n.strip()]
    unknown = sorted(set(names) - set(STACK_SERVICES))
    if unknown:
        raise click.BadParameter(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(STACK_SERVICES)}",
                                 param_hint="--services")  # fmt: skip
    s = ctx.settings
    stack = Stack(Path(run_dir) if run_dir else s.cache_dir / "stack")
    broker_port = None
    if s.external_kafka:
        bootstrap = s.kafka.bootstrap_servers
        click.echo(f"Kafka: {bootstrap} (KAFKA_BOOTSTRAP_SERVERS)")
    else:
        broker = _local_broker(s)
        bootstrap, broker_port = broker.up(), broker.port
        click.echo(f"Kafka: local broker at {bootstrap}")
    s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"bootstrap_servers": bootstrap})})
    for outcome in ensure_topics(ClientConfig.from_settings(s.kafka), plans_from_specs(s.topics.all())):
        if outcome.created:
            click.echo(f"created topic {outcome.name}")
    config_file = Path(ctx.config_path).resolve() if ctx.config_path else write_settings(s, stack.run_dir / "settings.yaml")
    wanted = [svc for svc in stack_services(s.api.host, s.api.port, s.streams.web_port, s.training.metrics_port) if svc.name in names]
    click.echo(f"logs: {stack.run_dir / 'logs'}")
    running = stack.up(config_file, bootstrap, wanted, broker_port, say=click.echo, timeout_s=timeout_s)
    click.echo(f"up: {', '.join(sorted(running))}. Stop with `adaptloop down`."
               + ("" if "api" not in names else "\nAPI token: adaptloop api token create --scope admin"))  # fmt: skip


@cli.command("down")
@click.option("--keep-broker", is_flag=True, help="leave the local broker running")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="as given to `up`")
@pass_ctx
def down_cmd(ctx: _Context, keep_broker: bool, run_dir: str | None) -> None:
    """Stop what `adaptloop up` started (services first, then the broker it started); data is kept."""
    from adaptloop.stack import Stack

    s = ctx.settings
    broker_port = Stack(Path(run_dir) if run_dir else s.cache_dir / "stack").down(say=click.echo)
    if broker_port is not None and not keep_broker:
        stopped = _local_broker(s, broker_port).down()
        click.echo(f"stopped the local broker on port {broker_port}" if stopped else "the local broker was not running")
    click.echo("down")


# --------------------------------------------------------------------------- #
# topics, schemas, config
# --------------------------------------------------------------------------- #


@cli.group()
def topics() -> None:
    """Manage adaptloop's Kafka topics."""


@topics.command("ensure")
@pass_ctx
def topics_ensure(ctx: _Context) -> None:
    """Create every configured topic that is missing (idempotent)."""
    from adaptloop.kafka.client import ClientConfig
    from adaptloop.kafka.topics import ensure_topics, plans_from_specs

    settings = ctx.settings
    outcomes = ensure_topics(ClientConfig.from_settings(settings.kafka), plans_from_specs(settings.topics.all()))
    for o in outcomes:
        state = "created" if o.created else "exists "
        click.echo(f"{state} {o.name} ({o.partitions} partitions){'  ! ' + o.note if o.note else ''}")


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
def config_show(ctx: _Context) -> None:
    """Print the resolved settings as JSON (secrets masked)."""
    click.echo(json.dumps(json.loads(ctx.settings.model_dump_json()), indent=2))


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


# --------------------------------------------------------------------------- #
# streams
# --------------------------------------------------------------------------- #


@cli.command("worker")
@click.option("--web-port", type=click.IntRange(0, 65535), default=None, help="metrics port (0 = off)")
@click.option("--loglevel", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@pass_ctx
def worker(ctx: _Context, web_port: int | None, loglevel: str) -> None:
    """Run the streams worker: validate, curate, count gaps, emit training requests."""
    from streams.worker import run_worker

    run_worker(ctx.settings, web_port=web_port, loglevel=loglevel)


@cli.command("generate-data")
@click.option("--user-id", required=True, help="whose dataset")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="training JSONL to write")
@click.option("--include-global", is_flag=True, help="mix in the global concept pool")
@click.option("--since", default=None, help="ISO-8601 time to read the input topics from (default: the beginning)")
@pass_ctx
def generate_data(ctx: _Context, user_id: str, output: str, include_global: bool, since: str | None) -> None:
    """Build a user's dataset offline from the input topics (same curation as the worker)."""
    from adaptloop.kafka.client import ClientConfig
    from schemas import check_user_id
    from streams.generate import generate_dataset
    from streams.worker import worker_config

    try:
        check_user_id(user_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--user-id") from None
    settings = ctx.settings
    cfg = worker_config(settings)
    result = generate_dataset(
        ClientConfig.from_settings(settings.kafka),
        cfg.input_topics,
        user_id,
        Path(output),
        since_ms=_parse_since(since),
        include_global=include_global,
        curation=cfg.processor.curation,
        dataset=cfg.processor.dataset,
        max_event_bytes=cfg.max_event_bytes,
    )
    click.echo(
        f"{result.events} events for {user_id} ({result.invalid} invalid skipped): "
        f"{len(result.train)} training examples -> {result.train_path}, {len(result.test)} held out -> {result.test_path}"
    )


@cli.command("publish")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--dry-run", is_flag=True, help="check the file and show where each line would go; send nothing")
@pass_ctx
def publish_cmd(ctx: _Context, path: str, dry_run: bool) -> None:
    """Publish recorded events (JSONL) to their topics: each line names its topic or its event type."""
    from adaptloop.kafka.client import ClientConfig
    from adaptloop.publish import publish, read_publish_file

    settings = ctx.settings
    topics = {name: getattr(settings.topics, name).name for name in type(settings.topics).model_fields}
    records = read_publish_file(Path(path), topics)
    counts: dict[str, int] = {}
    if dry_run:
        for record in records:
            counts[record.topic] = counts.get(record.topic, 0) + 1
    else:
        counts = publish(ClientConfig.from_settings(settings.kafka), records)
    for topic, n in counts.items():
        click.echo(f"{n:8d} {'would go to' if dry_run else '->'} {topic}")
    click.echo(f"{sum(counts.values())} record(s) {'checked' if dry_run else 'published'} from {path}")


@cli.command("replay")
@click.option("--from", "from_", required=True, help="ISO-8601 time to re-read the topics from (broker timestamps)")
@click.option("--to", "to", default=None, help="ISO-8601 time to stop before (default: the end as of now)")
@click.option("--topics", "topic_list", default=None,
              help="comma-separated topic keys or names (default: the input topics, commands and lifecycle)")
@click.option("--user-id", default=None, help="rebuild this user only")
@click.option("--app-id", default=None, help="the new app version (default: <streams.app_id>-replay-<UTC stamp>)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="where datasets and requests.jsonl go (default: <storage_root>/replays/<app version>)")
@click.option("--emit-requests", is_flag=True, help="also send the rebuilt training requests to the live topic")
@click.option("--dry-run", is_flag=True, help="print the offset plan and stop")
@pass_ctx
def replay_cmd(ctx: _Context, from_: str, to: str | None, topic_list: str | None, user_id: str | None, app_id: str | None,
               out_dir: str | None, emit_requests: bool, dry_run: bool) -> None:  # fmt: skip
    """Re-read the input topics from a point in time into a fresh app version: tables and datasets rebuilt."""
    from adaptloop.publish import PublishFileError, resolve_topic
    from streams.replay import default_app_id, plan_replay, run_replay
    from streams.worker import worker_config

    settings = ctx.settings
    cfg = worker_config(settings)
    known = {**cfg.input_topics, "commands": cfg.commands_topic, "lifecycle": cfg.lifecycle_topic}
    default_topics = list(known.values())
    try:
        topics = [resolve_topic(t.strip(), known, "--topics") for t in topic_list.split(",") if t.strip()] if topic_list else default_topics
    except PublishFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--topics") from None
    app = app_id or default_app_id(cfg.app_id)
    if app == cfg.app_id:
        raise click.BadParameter("the replay needs a new app version, not the live one", param_hint="--app-id")
    plan = plan_replay(cfg.client, topics, _parse_time(from_, "--from"), _parse_time(to, "--to") if to else None,
                       app, _user(user_id) if user_id else None, default_topics)  # fmt: skip
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
    click.echo(f"{result.records} record(s) in {result.seconds:.1f}s: {result.events} events applied for "
               f"{result.users} user(s), {result.dead_letters} invalid (dead-lettered live), "
               f"{len(result.requests)} training request(s) -> {target / 'requests.jsonl'}")  # fmt: skip
    for request in result.requests:
        click.echo(f"  {request.user_id}: {request.trigger} dataset {request.dataset.uri} (sha256 {request.dataset.sha256[:12]})")
    if result.tables_written:
        counts = ", ".join(f"{n} {name}" for name, n in result.tables_written.items())
        click.echo(f"tables rebuilt on app version {app} ({counts}); its offsets are committed at the plan's end:\n"
                   f"  set streams.app_id: {app} to run the worker from there")  # fmt: skip


def _parse_time(value: str, hint: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 time (UTC when no zone is given)."""
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO-8601 time: {value!r}", param_hint=hint) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def _parse_since(since: str | None) -> int:
    return 0 if since is None else _parse_time(since, "--since")


# --------------------------------------------------------------------------- #
# trainer (offline)
# --------------------------------------------------------------------------- #


def _registry(settings: Settings):
    from trainer.registry import AdapterRegistry

    return AdapterRegistry(settings.storage_root, settings.max_adapter_versions)


def _user(user_id: str) -> str:
    from schemas import check_user_id

    try:
        return check_user_id(user_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="user_id") from None


def _train_config(settings: Settings, epochs: int | None):
    from trainer.train import TrainConfig

    t, lora = settings.training, settings.lora
    return TrainConfig(
        epochs=epochs or t.epochs, learning_rate=t.learning_rate, batch_size=t.batch_size, max_seq_len=t.max_seq_len,
        seed=t.seed, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=tuple(lora.target_modules), top_layer_share=lora.top_layer_share,
        checkpoint_every=t.checkpoint_every, anchor_kl=t.anchor_kl, anchor_divergence=t.anchor_divergence, early_stopping=t.early_stopping, min_epochs=t.min_epochs,
        max_train_seconds=t.max_train_seconds, warm_start=t.warm_start, replay_per_fact=t.replay_per_fact, shrink_to=tuple(t.shrink_to),
    )  # fmt: skip


def _config_file(name: str, key: str) -> Path:
    """A file named in the settings: absolute, or in ./config/, or in the shipped config/."""
    from adaptloop.settings import shipped_config_dir

    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / "config" / name, shipped_config_dir() / name]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"{key}: {name} not found (looked in {', '.join(str(p) for p in candidates)})")
    return found


def _anchor_prompts(settings: Settings) -> list[str]:
    from trainer.anchors import read_prompts

    t = settings.training
    return [p for name in t.anchor_files for p in read_prompts(_config_file(name, "training.anchor_files"))] if t.anchors else []


def _anchor_mix(settings: Settings):
    from trainer.anchors import AnchorMix

    t = settings.training
    return AnchorMix(ratio=t.anchor_ratio, minimum=t.anchor_min, weight=t.anchor_weight, nearest=t.anchor_nearest)


def _gate_spec(settings: Settings):
    """The validation gate's plain values from the settings; core suite paths resolved here, at the edge."""
    from trainer.gate import GateConfig, GateSpec
    from trainer.scoring import ScoreWeights

    v = settings.validation
    paths = [_config_file(name, "validation.core_suites") for name in v.core_suites]
    cfg = GateConfig(promote_if_score=settings.promote_if_score, regression_threshold=settings.regression_threshold,
                     weights=ScoreWeights(**v.weights.model_dump()), require_user_tests=v.require_user_tests,
                     retention_similarity=v.retention_similarity, min_retention=v.min_retention,
                     max_forgetting=v.max_forgetting)  # fmt: skip
    return GateSpec(settings.model.embedding_model, tuple(paths), cfg, v.user_tests_dir, settings.cache_dir)


@cli.command("train")
@click.option("--user-id", required=True)
@click.option("--data-path", required=True, type=click.Path(dir_okay=False, exists=True), help="dataset JSONL")
@click.option("--epochs", type=click.IntRange(1, 1000), default=None, help="default from config")
@click.option("--no-hold-out", is_flag=True, help="train on every example (no held-out validation cases)")
@click.option("--no-gate", is_flag=True, help="skip the validation gate: the version stays a candidate, never active")
@pass_ctx
def train_cmd(ctx: _Context, user_id: str, data_path: str, epochs: int | None, no_hold_out: bool, no_gate: bool) -> None:
    """Train a LoRA adapter version for a user from a dataset file, then validate it (promote or reject)."""
    from adaptloop.storage import ArtifactStore
    from trainer.offline import train_from_file

    settings = ctx.settings
    registry = _registry(settings)
    outcome = train_from_file(
        registry=registry, base_model=settings.model.base_model, gguf_file=settings.model.gguf_file,
        cache_dir=settings.cache_dir, dtype=settings.model.dtype, user_id=_user(user_id), data_path=Path(data_path),
        cfg=_train_config(settings, epochs), hold_out=settings.training.hold_out and not no_hold_out,
        gate=None if no_gate else _gate_spec(settings), store=ArtifactStore(settings.storage_root),
        anchor_prompts=_anchor_prompts(settings), anchor_mix=_anchor_mix(settings),
        embedding_model=settings.model.embedding_model,
    )  # fmt: skip
    info = outcome.info
    m = info.manifest["metrics"]
    click.echo(f"{user_id} v{info.version}: {m['steps']} steps in {m['train_seconds']}s, final loss {m['final_loss']}")
    if outcome.report is not None:
        for line in outcome.report.lines():
            click.echo("  " + line)
    if outcome.decision == "promoted":
        click.echo(f"  v{info.version} promoted: it is now active")
    elif outcome.decision == "rejected":
        click.echo(f"  v{info.version} rejected; the active version is still {registry.active(user_id) or 'the base model'}")
    else:
        click.echo(f"  registered as a candidate at {info.path} (not validated, not active)")


@cli.command("validate")
@click.option("--adapter", "adapter", required=True, type=click.Path(file_okay=False, exists=True), help="PEFT adapter directory")
@click.option("--user-id", required=True)
@click.option("--baseline", type=click.Path(file_okay=False, exists=True), default=None,
              help="adapter to compare with on the core suite (default: the user's active one, else the base model)")  # fmt: skip
@pass_ctx
def validate_cmd(ctx: _Context, adapter: str, user_id: str, baseline: str | None) -> None:
    """Run the validation gate on an adapter offline; exit 0 if it passes, 1 if rejected."""
    from adaptloop.storage import ArtifactStore
    from trainer.model import load_base, resolve_base_model
    from trainer.offline import validate_adapter, verified_adapter

    s = ctx.settings
    user_id = _user(user_id)
    try:
        verified_adapter(Path(adapter))  # a tampered adapter fails here, before the model is even loaded
    except StorageError as exc:
        _registry(s).log_validation(user_id, None, {"passed": False, "reasons": [str(exc)], "metrics": {}},
                                    kind="validate", adapter=str(adapter))  # fmt: skip
        click.echo(f"REJECTED: {exc}")
        sys.exit(1)
    spec = _gate_spec(s)
    base = resolve_base_model(s.model.base_model, s.model.gguf_file, s.cache_dir)
    model, tokenizer, device = load_base(base, s.model.dtype)
    report = validate_adapter(gate=spec.build(model, tokenizer, device, base.sha256), registry=_registry(s), store=ArtifactStore(s.storage_root),
                              tests_dir=spec.user_tests_dir, user_id=user_id, adapter=Path(adapter),
                              baseline=Path(baseline) if baseline else None)  # fmt: skip
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.passed else 1)


@cli.command("rollback")
@click.option("--user-id", required=True)
@click.option("--reason", required=True, help="why; recorded in the rollback log and the lifecycle event")
@click.option("--to-version", type=click.IntRange(1), default=None, help="default: the previous good version")
@click.option("--direct", is_flag=True, help="apply to the registry here instead of sending a command to the trainers")
@click.option("--timeout", type=click.FloatRange(0), default=120.0, show_default=True, help="seconds to wait for the outcome")
@pass_ctx
def rollback_cmd(ctx: _Context, user_id: str, reason: str, to_version: int | None, direct: bool, timeout: float) -> None:
    """Make the previous good (or a named) adapter version active again; before v1 that is the base model."""
    from trainer.registry import version_label

    s = ctx.settings
    user_id = _user(user_id)
    if direct:
        from adaptloop.errors import RollbackError

        try:
            new, previous = _registry(s).rollback(user_id, reason, to_version, requested_by="cli --direct")
        except RollbackError as exc:
            click.echo(f"rollback not done: {exc}", err=True)
            sys.exit(1)
        click.echo(f"{user_id}: {version_label(previous)} -> {version_label(new)} active")
        return
    from adaptloop.commands import send_command
    from adaptloop.kafka.client import ClientConfig
    from schemas import RollbackCommand

    command = RollbackCommand(command_id=_new_command_id(), user_id=user_id, reason=reason, to_version=to_version)
    event = send_command(ClientConfig.from_settings(s.kafka), s.topics.commands.name, s.topics.lifecycle.name, command, timeout)
    if event is None:
        click.echo(f"command {command.command_id} sent; no outcome within {timeout:.0f}s (is `adaptloop trainer` running?)", err=True)
        sys.exit(3)
    if event.type != "rolled_back":
        click.echo(f"rollback not done: {event.reason}", err=True)
        sys.exit(1)
    click.echo(f"{user_id}: {version_label(event.previous_version)} -> {version_label(event.version)} active")


def _new_command_id() -> str:
    import uuid

    return f"cli-{uuid.uuid4().hex}"


@cli.command("trainer")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help="Prometheus port (0 = off; default from config)")
@pass_ctx
def trainer_cmd(ctx: _Context, metrics_port: int | None) -> None:
    """Run the training consumer: train adapters for requests on adapter.training-requests."""
    from adaptloop.kafka.client import ClientConfig
    from adaptloop.kafka.topics import ensure_topics, plans_from_specs
    from trainer.model import resolve_base_model
    from trainer.service import TrainerConfig, run_trainer

    s = ctx.settings
    client = ClientConfig.from_settings(s.kafka)
    ensure_topics(client, plans_from_specs(s.topics.all()))
    cfg = TrainerConfig(
        client=client, group_id=s.training.group_id, requests_topic=s.topics.training_requests.name,
        lifecycle_topic=s.topics.lifecycle.name, dlq_topic=s.topics.dlq.name, storage_root=s.storage_root,
        max_versions=s.max_adapter_versions, train=_train_config(s, None), gate=_gate_spec(s),
        commands_topic=s.topics.commands.name, cache_dir=s.cache_dir, anchor_prompts=tuple(_anchor_prompts(s)),
        anchor_mix=_anchor_mix(s), embedding_model=s.model.embedding_model, metrics_host=s.training.metrics_host, session_timeout_s=s.kafka.session_timeout_s,
        metrics_port=s.training.metrics_port if metrics_port is None else metrics_port,
    )  # fmt: skip
    run_trainer(cfg, resolve_base_model(s.model.base_model, s.model.gguf_file, s.cache_dir), s.model.dtype)


@cli.command("ask")
@click.option("--user-id", required=True)
@click.option("--version", type=click.IntRange(1), default=None, help="a version instead of the active one")
@click.argument("prompt")
@pass_ctx
def ask_cmd(ctx: _Context, user_id: str, version: int | None, prompt: str) -> None:
    """Answer a prompt with the base model plus the user's adapter."""
    from trainer.offline import ask

    s = ctx.settings
    answer, used = ask(
        registry=_registry(s), base_model=s.model.base_model, gguf_file=s.model.gguf_file, cache_dir=s.cache_dir,
        dtype=s.model.dtype, user_id=_user(user_id), prompt=prompt, version=version,
    )  # fmt: skip
    click.echo(f"[{user_id} {'v' + str(used) if used else 'base model'}] {answer}")


@cli.command("status")
@click.argument("user_id")
@pass_ctx
def status_cmd(ctx: _Context, user_id: str) -> None:
    """Show a user's active adapter version and its metrics."""
    registry = _registry(ctx.settings)
    user_id = _user(user_id)
    active = registry.active(user_id)
    versions = registry.versions(user_id)
    click.echo(f"user {user_id}: active version {active if active else '(none: base model)'}, {len(versions)} version(s) kept")
    if active:
        click.echo(json.dumps(registry.info(user_id, active).manifest["metrics"], indent=2))


@cli.command("history")
@click.argument("user_id")
@pass_ctx
def history_cmd(ctx: _Context, user_id: str) -> None:
    """List a user's adapter versions and what happened to them."""
    from trainer.registry import version_label

    registry = _registry(ctx.settings)
    user_id = _user(user_id)
    active = registry.active(user_id)
    for info in registry.versions(user_id):
        m = info.manifest.get("metrics", {})
        mark = "*" if info.version == active else " "
        scores = "  ".join(f"{k}={m[k]}" for k in ("final_loss", "core_score", "user_score", "facts_learned", "retention", "forgetting")
                           if k in m)  # fmt: skip
        verdict = info.manifest.get("validation", {}).get("passed")
        gate = {True: "passed", False: "rejected", None: "not validated"}[verdict]
        click.echo(f"{mark} v{info.version}  {info.manifest.get('trained_at', '')[:19]}  trigger={info.manifest.get('trigger')}  "
                   f"gate={gate}  {scores}")  # fmt: skip
    for entry in registry.history(user_id):
        why = entry.get("reason") or "; ".join(entry.get("reasons", []))
        click.echo(f"  {entry['at'][:19]}  {version_label(entry['version'])}  {entry['status']}" + (f"  ({why})" if why else ""))


@cli.command("report")
@click.argument("user_id")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="directory for the PNGs and the page")
@pass_ctx
def report_cmd(ctx: _Context, user_id: str, out_dir: str) -> None:
    """Loss curves, validation scores over versions and the version history of a user, as PNGs and HTML."""
    from trainer.report import build_report

    s = ctx.settings
    report = build_report(_registry(s), _user(user_id), threshold=s.promote_if_score)
    if not report.rows:
        raise click.ClickException(f"{user_id} has no adapter versions in {s.storage_root}")
    for path in report.write(Path(out_dir)):
        click.echo(f"wrote {path}")


# --------------------------------------------------------------------------- #
# api
# --------------------------------------------------------------------------- #


def _tokens_file(settings: Settings) -> Path:
    if settings.api.tokens_file is not None:
        return settings.api.tokens_file
    if "://" in settings.storage_root and not settings.storage_root.startswith("file://"):
        raise ConfigError("api.tokens_file must be set when storage_root is not a local directory")
    return Path(settings.storage_root.removeprefix("file://")) / "api" / "tokens.json"


@cli.group("api", invoke_without_command=True)
@click.option("--host", default=None, help="default from config (api.host)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="default from config (api.port)")
@click.pass_context
def api_group(click_ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs); `api token` manages bearer tokens."""
    if click_ctx.invoked_subcommand is not None:
        return
    from adaptloop.kafka.client import ClientConfig
    from adaptloop.kafka.topics import ensure_topics, plans_from_specs
    from api.app import ApiConfig, run_api

    s = click_ctx.find_object(_Context).settings
    client = ClientConfig.from_settings(s.kafka)
    ensure_topics(client, plans_from_specs(s.topics.all()))
    cfg = ApiConfig(
        client=client, commands_topic=s.topics.commands.name, lifecycle_topic=s.topics.lifecycle.name,
        users_changelog=f"{s.streams.app_id}-users-changelog", storage_root=s.storage_root,
        max_versions=s.max_adapter_versions, tokens_file=_tokens_file(s), max_body_bytes=s.api.max_body_bytes,
        lag_groups=_lag_groups(s), promote_if_score=s.promote_if_score,
    )  # fmt: skip
    run_api(cfg, host or s.api.host, port or s.api.port)


def _lag_groups(s: Settings) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The worker's and the trainers' consumer groups with the topics each reads."""
    t = s.topics
    worker = (*[spec.name for spec in t.inputs().values()], t.commands.name, t.lifecycle.name, f"{s.streams.app_id}-users")
    return ((s.streams.app_id, worker), (s.training.group_id, (t.training_requests.name, t.commands.name)))


@api_group.group("token")
def api_token() -> None:
    """Create, list and revoke the API's bearer tokens."""


@api_token.command("create")
@click.option("--scope", "scopes", multiple=True, required=True, help="admin, or user:<user_id> (repeatable)")
@click.option("--note", default="", help="what the token is for")
@pass_ctx
def api_token_create(ctx: _Context, scopes: tuple[str, ...], note: str) -> None:
    """Create a token and print it once (only its hash is stored)."""
    from api.auth import TokenStore

    token_id, token = TokenStore(_tokens_file(ctx.settings)).create(list(scopes), note)
    click.echo(f"token id {token_id} ({', '.join(scopes)}); shown once, store it now:", err=True)
    click.echo(token)


@api_token.command("list")
@pass_ctx
def api_token_list(ctx: _Context) -> None:
    """List token ids and scopes (never the tokens)."""
    from api.auth import TokenStore

    for token_id, entry in TokenStore(_tokens_file(ctx.settings)).list().items():
        click.echo(f"{token_id}  {','.join(entry['scopes'])}  {entry['created_at'][:19]}  {entry.get('note', '')}")


@api_token.command("revoke")
@click.argument("token_id")
@pass_ctx
def api_token_revoke(ctx: _Context, token_id: str) -> None:
    """Revoke a token by its id."""
    from api.auth import TokenStore

    if not TokenStore(_tokens_file(ctx.settings)).revoke(token_id):
        click.echo(f"no token {token_id}", err=True)
        sys.exit(1)
    click.echo(f"revoked {token_id}")


# --------------------------------------------------------------------------- #
# demo
# --------------------------------------------------------------------------- #


@cli.command("demo")
@pass_ctx
def demo(ctx: _Context) -> None:
    """Run the main job end to end on the embedded defaults, narrating each step."""
    from adaptloop.demo import run_demo

    run_demo(ctx.settings, local_broker=None if ctx.settings.external_kafka else _local_broker(ctx.settings))


def main() -> None:
    try:
        cli.main(prog_name="adaptloop", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AdaptloopError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
