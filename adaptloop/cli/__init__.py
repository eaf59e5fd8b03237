"""The `adaptloop` command line: one entry point, one module per command group.

Run `adaptloop --help` for the list. Every command accepts `--config PATH`
(else ADAPTLOOP_CONFIG, else ./config/adapter_retrain.yaml, else the shipped
default). Errors adaptloop expects print one clear message and exit 2.

    context.py    the root group, settings loaded once, shared argument helpers
    broker.py     kafka up/down/status, topics ensure
    stack.py      up, down, demo
    settings_and_schemas.py   config show/check, schemas export
    events.py     worker, generate-data, publish, replay
    training.py   trainer, train, validate
    adapters.py   ask, status, history, report, rollback
    review.py     review list/show/approve/deny/mode (promotion.mode: review)
    api.py        api (the HTTP API), api token create/list/revoke
    serving.py    serve (the OpenAI-compatible server), serving sync
    privacy.py    consent, export, forget
    keys.py       keys init/rotate/retire/list (encryption at rest)
"""

from __future__ import annotations

import sys

import click

from adaptloop.cli import (  # noqa: F401  (each registers its commands)
    adapters,
    api,
    broker,
    events,
    keys,
    privacy,
    review,
    serving,
    settings_and_schemas,
    stack,
    training,
)
from adaptloop.cli.context import cli
from core.errors import AdaptloopError

__all__ = ["cli", "main"]


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
