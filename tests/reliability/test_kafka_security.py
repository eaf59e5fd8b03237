"""Kafka over TLS with SASL (SASL_SSL, PLAIN), end to end: the worker, the trainer, the API and `adaptloop publish`.

A broker of the test's own gets a SASL_SSL listener with a certificate from a
test CA (openssl); every adaptloop process is configured the documented way
(docs/SECURITY.md: `ADAPTLOOP_KAFKA__*` variables) and talks only to that
listener. A wrong password is refused with a clear error that does not show it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from api.auth import TokenStore
from core.kafka.broker import LocalBroker, free_port
from core.kafka.client import ClientConfig
from schemas.training import TrainingExample
from tests.support.events import event
from tests.support.handles import start_api
from tests.support.processes import JAR_CACHE

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USER, PASSWORD = "adaptloop", "Kafka-pw-7731"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path, store_password: str) -> tuple[Path, Path]:
    """A test CA and a broker certificate for 127.0.0.1 in a PKCS12 key store: (ca.crt, broker.p12)."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=adaptloop-test-ca",
        cwd=folder,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "broker.key",
        "-out",
        "broker.csr",
        "-subj",
        "/CN=localhost",
        cwd=folder,
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "broker.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        cwd=folder,
    )
    _openssl(
        "pkcs12",
        "-export",
        "-in",
        "broker.crt",
        "-inkey",
        "broker.key",
        "-certfile",
        "ca.crt",
        "-out",
        "broker.p12",
        "-passout",
        f"pass:{store_password}",
        cwd=folder,
    )
    return folder / "ca.crt", folder / "broker.p12"


def sasl_ssl_properties(key_store: Path, store_password: str, users: dict[str, str]) -> dict[str, str]:
    """server.properties for a SASL_SSL listener with PLAIN users (the worked example of docs/SECURITY.md)."""
    accounts = " ".join(f'user_{name}="{password}"' for name, password in users.items())
    return {
        "sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_ssl.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.sasl_ssl.plain.sasl.jaas.config": f"org.apache.kafka.common.security.plain.PlainLoginModule required {accounts};",
        "ssl.keystore.type": "PKCS12",
        "ssl.keystore.location": str(key_store),
        "ssl.keystore.password": store_password,
    }


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory):
    base = tmp_path_factory.mktemp("secure-kafka")
    ca, key_store = make_certificates(base / "tls", "store-pw")
    secure_port = free_port()
    broker = LocalBroker(
        port=free_port(),
        cache_dir=JAR_CACHE,
        data_dir=base / "data",
        extra_listeners=(("SASL_SSL", "SASL_SSL", secure_port),),
        extra_properties=sasl_ssl_properties(key_store, "store-pw", {USER: PASSWORD}),
    )
    broker.up()
    yield f"127.0.0.1:{secure_port}", ca
    broker.down()


@pytest.fixture
def secure_env(secure_broker, monkeypatch) -> ClientConfig:
    """Every process the test starts reads these; returns the test's own client for the same listener."""
    bootstrap, ca = secure_broker
    for key, value in {
        "SECURITY_PROTOCOL": "SASL_SSL",
        "SASL_MECHANISM": "PLAIN",
        "SASL_USERNAME": USER,
        "SASL_PASSWORD": PASSWORD,
        "SSL_CAFILE": str(ca),
    }.items():
        monkeypatch.setenv(f"ADAPTLOOP_KAFKA__{key}", value)
    return ClientConfig(
        bootstrap_servers=bootstrap,
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username=USER,
        sasl_password=SecretStr(PASSWORD),
        ssl_cafile=ca,
    )


def test_publish_worker_trainer_and_api_over_sasl_ssl(secure_env, worker_factory, trainer_factory, tmp_path, figures):
    client = secure_env
    w = worker_factory(start=False, min_gap_events=3, bootstrap=client.bootstrap_servers)
    w.client = client
    w.start()
    events = tmp_path / "events.jsonl"
    events.write_text(
        "".join(json.dumps({"event_type": kind, **body}) + "\n" for kind, body in [event("feedback", "sec", n) for n in range(4)])
    )
    published = subprocess.run(
        [sys.executable, "-m", "adaptloop.cli", "--config", str(w.config_path), "publish", str(events)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": client.bootstrap_servers},
    )
    assert published.returncode == 0, published.stderr[-2000:]
    (request,) = w.wait_for(lambda: w.requests(), timeout=90, what="a training request through SASL_SSL")
    assert request["user_id"] == "sec"

    t = trainer_factory(start=False, bootstrap=client.bootstrap_servers, epochs=1)
    t.client = client
    t.start()
    job = t.request("sec", [TrainingExample(prompt=f"What is code {i}?", response=f"Code {i} is {i * 7}.") for i in range(4)])
    t.publish(job)
    t.wait_for(
        lambda: any(e["type"] == "training_completed" and e["request_id"] == job.request_id for e in t.lifecycle()),
        what="training completed through SASL_SSL",
    )

    token = TokenStore(w.storage_root / "api" / "tokens.json").create(["admin"])[1]
    api, url = start_api(w.config_path, client.bootstrap_servers, tmp_path / "api.log")
    try:
        accepted = httpx.post(
            f"{url}/api/adapter/rollback",
            json={"user_id": "sec", "reason": "over TLS"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert accepted.status_code == 202, accepted.text
        w.wait_for(
            lambda: any(json.loads(r.value)["command_id"] == accepted.json()["job_id"] for r in w.read("commands")),
            what="the API's command through SASL_SSL",
        )
    finally:
        api.stop()
    lifecycle = "".join(json.dumps(e) for e in t.lifecycle())
    shown = {
        "worker log": w.log_path.read_text(errors="replace"),
        "trainer log": t.log_path.read_text(errors="replace"),
        "API log": (tmp_path / "api.log").read_text(errors="replace"),
        "lifecycle events": lifecycle,
    }
    assert "training_completed" in lifecycle
    assert [place for place, text in shown.items() if PASSWORD in text] == [], "the SASL password was shown"
    figures(
        "Security",
        "Kafka over TLS + SASL (SASL_SSL, PLAIN) end to end",
        "a broker with only a SASL_SSL listener in use; every process configured by ADAPTLOOP_KAFKA__* variables",
        lost=None,
        duplicated=None,
        result="`adaptloop publish` -> worker -> training request; trainer -> training_completed; API -> command: all over "
        "SASL_SSL; the password in no log or event; a wrong one is refused without showing it",
    )


def test_a_wrong_password_is_refused_clearly_without_showing_it(secure_env, worker_factory, monkeypatch, tmp_path):
    wrong = "not-the-Pa55word"
    monkeypatch.setenv("ADAPTLOOP_KAFKA__SASL_PASSWORD", wrong)
    w = worker_factory(start=False, bootstrap=secure_env.bootstrap_servers)
    done = subprocess.run(
        [sys.executable, "-m", "adaptloop.cli", "--config", str(w.config_path), "topics", "ensure"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": secure_env.bootstrap_servers},
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "authentication" in output.lower() or "SASL" in output, output[-2000:]
    assert "refused this client" in output, "the refusal is reported as such at once, not after waiting out the timeout"
    assert wrong not in output and PASSWORD not in output
