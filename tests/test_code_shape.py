"""The shape of the code and its docs, checked: short functions, and references generated from one source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "schemas", "streams", "trainer", "api", "adaptloop")
MAX_FUNCTION_LINES = 80


def test_no_function_in_the_package_code_is_longer_than_80_lines():
    long = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert long == [], "split these into named steps:\n" + "\n".join(long)


def test_the_configuration_reference_is_the_settings_models():
    from core.settings import reference_markdown

    page = (REPO / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    generated = page.split("<!-- generated: adaptloop config reference -->\n", 1)[1].split("<!-- end generated -->", 1)[0]
    assert generated == reference_markdown(), "regenerate it: adaptloop config reference"


def test_every_setting_has_a_description():
    from core.settings import reference_rows

    assert [key for key, _env, _default, text in reference_rows() if not text.strip()] == []


def test_the_shipped_settings_file_states_the_models_defaults(monkeypatch, tmp_path):
    """config/adapter_retrain.yaml documents every key with its default: it may not drift from the models."""
    import os

    from core.settings import Settings, load_settings

    for key in list(os.environ):
        if key.startswith("ADAPTLOOP_") or key == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # storage_root resolves against the working directory in both
    shipped = load_settings(REPO / "config" / "adapter_retrain.yaml")
    assert shipped == Settings.model_validate({"storage_root": "./adaptloop-data"})


# Keys the shipped settings file leaves out on purpose: credentials (set from the environment, never written in a
# file), per-topic overrides of the broker's defaults, and paths whose default is derived from another key.
UNLISTED_SETTINGS = (
    "cache_dir",
    "model.gguf_file",
    "kafka.sasl_",
    "kafka.ssl_",
    "kafka.local_broker.data_dir",
    "topics.",
)


def test_the_shipped_settings_file_names_every_other_key():
    """A setting missing from config/adapter_retrain.yaml is one its readers do not know exists (the preference
    settings were, until 2026-12-05)."""
    import yaml

    from core.settings import reference_rows

    shipped = yaml.safe_load((REPO / "config" / "adapter_retrain.yaml").read_text(encoding="utf-8"))

    def named(key: str) -> bool:
        section = shipped
        for part in key.split("."):
            if not isinstance(section, dict) or part not in section:
                return False
            section = section[part]
        return True

    rows = reference_rows()
    missing = [key for key, *_ in rows if not named(key) and not key.startswith(UNLISTED_SETTINGS)]
    assert missing == [], "document these in config/adapter_retrain.yaml (with their defaults)"
