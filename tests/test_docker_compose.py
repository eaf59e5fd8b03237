"""docker-compose.yml stays valid: parsed here always, `docker compose config` where the plugin exists."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]


def test_compose_file_defines_a_kraft_broker_and_our_services():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    ours = [name for name, svc in services.items() if svc.get("image") == "adaptloop:local"]
    assert {"worker", "trainer", "api", "serve"} <= set(ours), ours
    for name in ours:
        assert services[name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert (REPO / "Dockerfile").is_file()
    assert services["kafka-ui"]["environment"]["KAFKA_CLUSTERS_0_BOOTSTRAPSERVERS"] == "kafka:9092"
    assert "./config/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    assert services["serve"]["ports"] == ["8100:8100"] and "--port" in services["serve"]["command"]


def test_the_image_holds_every_package_the_wheel_ships():
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = {line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    assert set(packages) <= copied, f"the Dockerfile misses {sorted(set(packages) - copied)}"


def test_prometheus_scrapes_every_service_on_its_configured_port():
    from core.settings import load_settings

    settings = load_settings(REPO / "config" / "adapter_retrain.yaml")
    config = yaml.safe_load((REPO / "config" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {
        "adaptloop-worker": [f"worker:{settings.streams.web_port}"],
        "adaptloop-trainer": [f"trainer:{settings.training.metrics_port}"],
        "adaptloop-api": [f"api:{8000}"],
        "adaptloop-serve": [f"serve:{settings.serving.port}"],
    }


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed here")
def test_docker_compose_config_passes():
    result = subprocess.run(
        ["docker", "compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_example_encrypts_at_rest_with_its_keyring_outside_the_data_volume():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("worker", "trainer", "api", "serve"):
        env = services[name]["environment"]
        assert env["ADAPTLOOP_STORAGE__ENCRYPTION__ENABLED"] == "true"
        keyring = env["ADAPTLOOP_STORAGE__ENCRYPTION__KEYRING"]
        assert not keyring.startswith(env["ADAPTLOOP_STORAGE_ROOT"] + "/"), "a backup of the data must not carry its keys"
        assert services[name]["depends_on"]["keys"] == {"condition": "service_completed_successfully"}
    assert services["keys"]["command"] == ["keys", "init", "--if-missing"]
