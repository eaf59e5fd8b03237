"""The root command group, the settings (loaded once, on first use) and argument helpers every group shares."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from core.redaction import Redactor, redact_logs
from core.settings import Settings, load_settings
from schemas import check_user_id


class CliContext:
    """Loads the settings once, on first use, so `--help` never needs a config."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
            redact_logs(Redactor.from_settings(self._settings))  # every command's logs, from here on
        return self._settings


pass_ctx = click.make_pass_decorator(CliContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120, "terminal_width": 120})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="settings YAML file")
@click.version_option(package_name="adaptloop")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """adaptloop: turn assistant failures into per-user LoRA adapters, safely."""
    ctx.obj = CliContext(config_path)


def user_arg(user_id: str, hint: str = "user_id") -> str:
    """A user_id checked with the shared pattern (a usage error naming the option otherwise)."""
    try:
        return check_user_id(user_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def parse_time(value: str, hint: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 time (UTC when no zone is given)."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO-8601 time: {value!r}", param_hint=hint) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)  # round, not int: a float of whole milliseconds may fall a hair short


def new_command_id() -> str:
    import uuid

    return f"cli-{uuid.uuid4().hex}"
