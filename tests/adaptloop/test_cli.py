"""The command line: help for every command, clear errors, schema export."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from adaptloop.cli import cli

pytestmark = pytest.mark.unit


def _leaf_commands(group, prefix=()):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_help_lists_every_command_with_one_line():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in cli.commands:
        line = next(ln for ln in result.output.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split(None, 1)) == 2 and not line.rstrip().endswith("..."), line
    for path, command in _leaf_commands(cli):
        assert command.help and command.help.strip(), f"{' '.join(path)} has no help"
        sub = CliRunner().invoke(cli, [*path, "--help"])
        assert sub.exit_code == 0, path


def test_console_script_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "adaptloop.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "kafka" in result.stdout


def test_schemas_export_writes_files(tmp_path):
    result = CliRunner().invoke(cli, ["schemas", "export", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "intent_trace.schema.json").is_file()


def test_bad_config_is_one_clear_message_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_gap_events: -1\nschedule: hourly\n")
    result = subprocess.run(
        [sys.executable, "-m", "adaptloop.cli", "--config", str(bad), "config", "show"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "min_gap_events" in result.stderr and "schedule" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("min_gap_events: 2\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_gap_events: nope\n")
    assert CliRunner().invoke(cli, ["config", "check", str(good)]).exit_code == 0
    result = CliRunner().invoke(cli, ["config", "check", str(good), str(bad)])
    assert result.exit_code == 2 and "min_gap_events" in result.output


def test_config_show_masks_secrets(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "kafka:\n  security_protocol: SASL_PLAINTEXT\n  sasl_mechanism: PLAIN\n  sasl_username: u\n  sasl_password: s3cret\n"
    )
    result = CliRunner().invoke(cli, ["--config", str(cfg), "config", "show"])
    assert result.exit_code == 0 and "s3cret" not in result.output and "**********" in result.output
