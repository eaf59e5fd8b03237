"""Settings: every shipped YAML loads; overrides; one error listing every bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import ConfigError
from core.settings import load_settings, resolve_config_path, shipped_config_dir

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SEED_KEYS = {"schedule", "min_gap_events", "promote_if_score", "regression_threshold", "max_adapter_versions", "storage_root"}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("ADAPTLOOP_") or key == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(key)


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    import yaml

    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or "kafka" not in data and "schedule" not in data:
        pytest.skip("not a settings file")
    load_settings(path)


def test_seed_keys_are_top_level_in_the_shipped_file():
    import yaml

    data = yaml.safe_load((REPO / "config" / "adapter_retrain.yaml").read_text())
    assert SEED_KEYS <= set(data)


def test_relative_storage_root_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(REPO / "config" / "adapter_retrain.yaml")
    assert settings.storage_root == str(tmp_path / "adaptloop-data")


def test_fsspec_url_storage_root_is_kept(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage_root: s3://bucket/adaptloop/\n")
    assert load_settings(cfg).storage_root == "s3://bucket/adaptloop"


def test_env_overrides_top_level_and_nested(monkeypatch):
    monkeypatch.setenv("ADAPTLOOP_MIN_GAP_EVENTS", "11")
    monkeypatch.setenv("ADAPTLOOP_KAFKA__CLIENT_ID", "svc-a")
    monkeypatch.setenv("ADAPTLOOP_LORA__TARGET_MODULES", '["q_proj", "v_proj"]')
    monkeypatch.setenv("ADAPTLOOP_TOPICS__DLQ__PARTITIONS", "3")
    settings = load_settings(REPO / "config" / "adapter_retrain.yaml")
    assert settings.min_gap_events == 11
    assert settings.kafka.client_id == "svc-a"
    assert settings.lora.target_modules == ["q_proj", "v_proj"]
    assert settings.topics.dlq.partitions == 3
    assert settings.topics.dlq.name == "adapter.dlq"  # the rest of the section stays


def test_kafka_bootstrap_servers_env_wins(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker-a:9092,broker-b:9092")
    settings = load_settings(REPO / "config" / "adapter_retrain.yaml")
    assert settings.kafka.bootstrap_servers == "broker-a:9092,broker-b:9092"
    assert settings.external_kafka


def test_a_topic_too_small_for_a_record_batch_is_refused_by_name(tmp_path):
    """The worker's producer batches are sized below every topic's max.message.bytes: a limit that leaves no room
    past a record batch's framing would make them a byte long."""
    from core.settings import MIN_TOPIC_MESSAGE_BYTES

    cfg = tmp_path / "small.yaml"
    cfg.write_text("topics:\n  training_requests: {name: r, config: {max.message.bytes: '1000'}}\n")
    with pytest.raises(ConfigError, match=r"topics\.training_requests\.config[\s\S]*at least 4096, not '1000'"):
        load_settings(cfg)
    cfg.write_text(f"topics:\n  training_requests: {{name: r, config: {{max.message.bytes: '{MIN_TOPIC_MESSAGE_BYTES}'}}}}\n")
    assert load_settings(cfg).topics.training_requests.config["max.message.bytes"] == str(MIN_TOPIC_MESSAGE_BYTES)


def test_one_error_lists_every_bad_key(tmp_path, monkeypatch):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "schedule: weekly\nmin_gap_events: 0\npromote_if_score: 1.5\nkafka:\n  bootstrap_servers: x\n  colour: red\n"
        "topics:\n  dlq: {name: 'bad/name'}\n  feedback: {name: f, config: {max.message.bytes: 64k}}\n"
    )
    monkeypatch.setenv("ADAPTLOOP_MAX_ADAPTER_VERSIONS", "many")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    message = str(info.value)
    for key in [
        "schedule",
        "min_gap_events",
        "promote_if_score",
        "kafka.colour",
        "topics.dlq.name",
        "topics.feedback.config",
        "max_adapter_versions",
    ]:
        assert key in message, key
    assert "ADAPTLOOP_MAX_ADAPTER_VERSIONS" in message
    assert "unknown key" in message
    assert str(cfg) in message


def test_sasl_requires_credentials_and_hides_password(tmp_path):
    cfg = tmp_path / "sasl.yaml"
    cfg.write_text("kafka:\n  security_protocol: SASL_SSL\n")
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_settings(cfg)
    cfg.write_text(
        "kafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n  sasl_username: u\n  sasl_password: hunter2\n"
    )
    settings = load_settings(cfg)
    assert "hunter2" not in repr(settings) and "hunter2" not in settings.model_dump_json()


def test_settings_are_frozen():
    settings = load_settings(REPO / "config" / "adapter_retrain.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        settings.min_gap_events = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.kafka.client_id = "x"  # type: ignore[misc]


def test_bad_yaml_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("schedule: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listy)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.yaml")


def test_config_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 4. nothing here: the shipped default
    assert resolve_config_path() == shipped_config_dir() / "adapter_retrain.yaml"
    # 3. ./config/adapter_retrain.yaml in the working directory
    local = tmp_path / "config" / "adapter_retrain.yaml"
    local.parent.mkdir()
    local.write_text("min_gap_events: 3\n")
    assert resolve_config_path() == local
    assert load_settings().min_gap_events == 3
    # 2. ADAPTLOOP_CONFIG
    env_file = tmp_path / "env.yaml"
    env_file.write_text("min_gap_events: 4\n")
    monkeypatch.setenv("ADAPTLOOP_CONFIG", str(env_file))
    assert load_settings().min_gap_events == 4
    # 1. an explicit path
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("min_gap_events: 5\n")
    assert load_settings(explicit).min_gap_events == 5


def test_write_settings_round_trips_with_secrets(tmp_path):
    import os

    from core.settings import write_settings

    cfg = tmp_path / "in.yaml"
    cfg.write_text(
        "min_gap_events: 9\nkafka:\n  security_protocol: SASL_SSL\n  sasl_mechanism: PLAIN\n  sasl_username: u\n  sasl_password: pw\n"
    )
    settings = load_settings(cfg)
    out = write_settings(settings, tmp_path / "out.yaml")
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    again = load_settings(out)
    assert again == settings and again.kafka.sasl_password.get_secret_value() == "pw"


def test_drift_retry_scales_must_shrink_the_update(tmp_path):
    cfg = tmp_path / "retry.yaml"
    cfg.write_text("validation:\n  drift_retry_scales: [0.75, 1.5]\n")
    with pytest.raises(ConfigError, match=r"validation\.drift_retry_scales[\s\S]*between 0 and 1"):
        load_settings(cfg)
    for unordered in ("[0.5, 0.75]", "[0.75, 0.75]"):
        cfg.write_text(f"validation:\n  drift_retry_scales: {unordered}\n")
        with pytest.raises(ConfigError, match=r"validation\.drift_retry_scales[\s\S]*largest first"):
            load_settings(cfg)
    cfg.write_text("validation:\n  drift_retry_scales: [0.75, 0.5]\n")
    assert load_settings(cfg).validation.drift_retry_scales == [0.75, 0.5]
    cfg.write_text("validation:\n  drift_retry_scales: []\n")
    assert load_settings(cfg).validation.drift_retry_scales == []
