"""`adaptloop serve` (the OpenAI-compatible server) and `adaptloop serving sync` (keep inference servers in step)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import click

from adaptloop.cli.context import CliContext, cli, pass_ctx


@cli.command("serve")
@click.option("--host", default=None, help="default from config (serving.host)")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="default from config (serving.port)")
@pass_ctx
def serve_cmd(ctx: CliContext, host: str | None, port: int | None) -> None:
    """Answer chat completions (OpenAI's API) with each user's active adapter; OpenAPI docs at /docs."""
    from core.kafka.client import ClientConfig
    from core.kafka.topics import ensure_topics, plans_from_specs
    from serving.app import run_serve

    s = ctx.settings
    ensure_topics(ClientConfig.from_settings(s), plans_from_specs(s.topics.all()))
    run_serve(s, host or s.serving.host, port or s.serving.port)


@cli.group("serving")
def serving_group() -> None:
    """Hand versions to dedicated inference servers (vLLM, SGLang, another `adaptloop serve`)."""


@serving_group.command("sync")
@click.option("--endpoint", "endpoints", multiple=True, required=True, help="an inference server's base URL (repeatable)")
@click.option(
    "--export-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="also lay versions out here as <user_id>@v<N>/ directories, with active.json",
)
@click.option(
    "--base-model-name",
    default=None,
    help="with --export-dir: the model name vLLM serves, written into the exported adapter configs (its filesystem resolver checks it)",
)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, help="Prometheus endpoint (0 = off)")
@pass_ctx
def serving_sync(
    ctx: CliContext, endpoints: tuple[str, ...], export_dir: str | None, base_model_name: str | None, metrics_port: int
) -> None:
    """Load each user's active version on the endpoints, follow promotions and rollbacks; token in ADAPTLOOP_SYNC_TOKEN."""
    import logging

    from core.forgotten import UserHasher
    from core.kafka.client import ClientConfig
    from core.kafka.topics import ensure_topics, plans_from_specs
    from core.storage import ArtifactStore
    from serving.follower import LifecycleFollower
    from serving.sync import Sync, run_sync
    from trainer.registry import AdapterRegistry

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    s = ctx.settings
    ensure_topics(ClientConfig.from_settings(s), plans_from_specs(s.topics.all()))
    exported = Path(export_dir) if export_dir else None
    if exported is not None:
        exported.mkdir(parents=True, exist_ok=True)
    sync = Sync(
        AdapterRegistry.from_settings(s),
        list(endpoints),
        exported,
        s.serving.sync_grace_s,
        s.serving.sync_retry_max_s,
        os.environ.get("ADAPTLOOP_SYNC_TOKEN"),
        base_model_name=base_model_name,
        hasher=UserHasher.for_store(ArtifactStore(s.storage_root)),
    )
    follower = LifecycleFollower(ClientConfig.from_settings(s), s.topics.lifecycle.name, sync.on_swap)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_sync(sync, follower, s.serving.sync_rescan_s, metrics_port, stop=stop)
