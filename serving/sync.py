"""`adaptloop serving sync`: keep inference servers in step with the users' active versions.

    adaptloop serving sync --endpoint http://vllm-1:8000 [--endpoint ...] [--export-dir /srv/loras]

What each endpoint should hold is every user's active version, named
`<user_id>@v<N>` (names are immutable: a version is never reloaded in place,
vLLM #42125). The sync starts from the registry (so a restart catches up, and
what an endpoint holds beyond that is unloaded), then follows the lifecycle
topic: on a promotion it loads the new version on every endpoint
(`POST /v1/load_lora_adapter`, vLLM's and SGLang's runtime LoRA API, which
`adaptloop serve` has too); on a rollback, the version now active; a version
no longer active is unloaded (`POST /v1/unload_lora_adapter`) after
`serving.sync_grace_s`, so requests in flight finish. An endpoint that does
not answer is retried with a growing backoff (up to
`serving.sync_retry_max_s`); nothing is dropped meanwhile.

`--export-dir` also lays the versions out as directories named
`<user_id>@v<N>` (what vLLM's filesystem resolver loads by name; with
`--base-model-name`, their configs name the model vLLM serves, as the resolver
requires) and writes `active.json` (each user's active name); the endpoints
are then given paths in it. A bearer token for the endpoints comes from ADAPTLOOP_SYNC_TOKEN.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from core.errors import ConfigError, StorageError
from core.storage import atomic_write_json
from schemas.manifest import ADAPTER_CONFIG
from serving.adapters import adapter_name
from trainer.registry import AdapterRegistry

log = logging.getLogger("adaptloop.sync")


@dataclass
class _Op:
    kind: str  # "load" | "unload"
    name: str
    path: str = ""
    due: float = 0.0  # not before this (monotonic)
    attempts: int = 0


@dataclass
class Endpoint:
    """One inference server: what it was told to hold, what is still to do, and how it went."""

    url: str
    pending: list[_Op] = field(default_factory=list)
    held: set[str] = field(default_factory=set)
    loads: int = 0
    unloads: int = 0
    failures: int = 0
    up: bool = False


class Sync:
    def __init__(
        self,
        registry: AdapterRegistry,
        urls: list[str],
        export_dir: Path | None = None,
        grace_s: float = 30.0,
        retry_max_s: float = 60.0,
        token: str | None = None,
        client_factory: Callable[[], httpx.Client] | None = None,
        base_model_name: str | None = None,
        hasher: Callable[[str], str] | None = None,
    ) -> None:
        """`hasher`: the store's salted user hash, to recognise the user a `forgotten` event names."""
        if export_dir is None and registry.sealer is not None:
            raise ConfigError("the registry is encrypted at rest: engines load plain files, so sync needs an export dir")
        self.registry, self.export_dir, self.grace_s, self.retry_max_s = registry, export_dir, grace_s, retry_max_s
        # vLLM's filesystem resolver loads an adapter only when its config names the served model:
        # the exported copies say this name (the registry's files are never changed).
        self.base_model_name = base_model_name
        self.hasher = hasher
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        self.active: dict[str, str] = {}  # user -> the name every endpoint should hold
        self.refused = 0  # versions that failed their sha256 check and were handed to no endpoint
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = client_factory() if client_factory else httpx.Client(timeout=httpx.Timeout(30, connect=5), headers=headers)
        self._lock = threading.Lock()

    # ---- what should be held ------------------------------------------------------------ #

    def catch_up(self) -> None:
        """Every user's active version from the registry; what an endpoint holds beyond that is unloaded."""
        with self._lock:
            self.active = {}  # afresh: a user rolled back to the base model offline has nothing active now
            for user in self.registry.users():
                version = self.registry.active(user)
                if version is not None:
                    self._want(user, version)
            for endpoint in self.endpoints:
                for name in self._listed(endpoint) - set(self.active.values()):
                    self._queue(endpoint, _Op("unload", name, due=time.monotonic() + self.grace_s))
            self._write_aliases()

    def on_swap(self, user_id: str, version: int | None, event: dict | None = None) -> None:
        """A promotion or a rollback: load the version now active, unload the one before after the grace period."""
        if event is not None and event.get("type") == "forgotten":
            self.forget(user_id)
            return
        with self._lock:
            before = self.active.pop(user_id, None)
            if version is not None:
                self._want(user_id, version)
            if before is not None and before != self.active.get(user_id):
                for endpoint in self.endpoints:
                    self._queue(endpoint, _Op("unload", before, due=time.monotonic() + self.grace_s))
            self._write_aliases()

    def forget(self, user_hash: str) -> None:
        """A forgotten user (named by salted hash): unloaded from every endpoint at once, exported copies deleted."""
        if self.hasher is None:
            log.warning("a forgotten user cannot be recognised: this sync has no user hasher")
            return
        with self._lock:
            names = {n for e in self.endpoints for n in e.held | {op.name for op in e.pending}} | set(self.active.values())
            if self.export_dir is not None and self.export_dir.is_dir():
                names |= {p.name for p in self.export_dir.iterdir() if "@v" in p.name and not p.name.startswith(".")}
            gone = {n for n in names if self.hasher(n.rsplit("@v", 1)[0]) == user_hash}
            self.active = {u: n for u, n in self.active.items() if n not in gone}
            for endpoint in self.endpoints:
                endpoint.pending = [op for op in endpoint.pending if op.name not in gone]
                for name in gone & endpoint.held:
                    self._queue(endpoint, _Op("unload", name))  # no grace: nobody may be answered with it any more
            for name in gone:
                if self.export_dir is not None:
                    shutil.rmtree(self.export_dir / name, ignore_errors=True)
            self._write_aliases()

    def _want(self, user_id: str, version: int) -> None:
        name = adapter_name(user_id, version)
        try:
            path = self._export(user_id, version, name)
        except StorageError as exc:  # tampered or missing: never handed to an endpoint; the log and the metric say so
            self.refused += 1
            log.error("%s not handed to the endpoints: %s", name, exc)
            return
        self.active[user_id] = name
        for endpoint in self.endpoints:
            endpoint.pending = [op for op in endpoint.pending if op.name != name]  # a pending unload of it is void now
            if name not in endpoint.held:
                self._queue(endpoint, _Op("load", name, path))

    def _queue(self, endpoint: Endpoint, op: _Op) -> None:
        if not any(p.kind == op.kind and p.name == op.name for p in endpoint.pending):
            endpoint.pending.append(op)

    # ---- doing it -------------------------------------------------------------------------- #

    def tick(self) -> None:
        """Carry out every operation that is due; a failed one is retried later, with a longer wait each time."""
        with self._lock:
            now = time.monotonic()
            for endpoint in self.endpoints:
                for op in [op for op in endpoint.pending if op.due <= now]:
                    if op.kind == "unload" and op.name in self.active.values():
                        endpoint.pending.remove(op)  # active again meanwhile (a rollback to it)
                        continue
                    if self._send(endpoint, op):
                        endpoint.pending.remove(op)
                    else:
                        op.attempts += 1
                        op.due = now + min(self.retry_max_s, 0.5 * 2**op.attempts)

    def _send(self, endpoint: Endpoint, op: _Op) -> bool:
        body = {"lora_name": op.name, "lora_path": op.path} if op.kind == "load" else {"lora_name": op.name}
        try:
            response = self.http.post(f"{endpoint.url}/v1/{op.kind}_lora_adapter", json=body)
        except httpx.HTTPError as exc:
            endpoint.up, endpoint.failures = False, endpoint.failures + 1
            log.warning("%s: %s %s failed (%s); retrying", endpoint.url, op.kind, op.name, exc)
            return False
        endpoint.up = True
        text = response.text.lower()
        done = (
            response.status_code == 200
            or (op.kind == "load" and "already" in text)
            or (op.kind == "unload" and response.status_code == 404)
        )
        if not done:
            endpoint.failures += 1
            log.warning("%s: %s %s answered %d: %s", endpoint.url, op.kind, op.name, response.status_code, response.text[:200])
            return False
        if op.kind == "load":
            endpoint.held.add(op.name)
            endpoint.loads += 1
        else:
            endpoint.held.discard(op.name)
            endpoint.unloads += 1
        log.info("%s: %sed %s", endpoint.url, op.kind, op.name)
        return True

    def _listed(self, endpoint: Endpoint) -> set[str]:
        """The versions an endpoint says it holds (`GET /v1/models`); none when it does not answer yet."""
        try:
            data = self.http.get(f"{endpoint.url}/v1/models").json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return set()
        names = {str(card.get("id")) for card in data if isinstance(card, dict) and "@v" in str(card.get("id"))}
        endpoint.held |= names
        return names

    # ---- the export directory ---------------------------------------------------------------- #

    def _export(self, user_id: str, version: int, name: str) -> str:
        """The path the endpoints load `name` from: the registry's version directory, or its copy in the export dir."""
        info = self.registry.verify(user_id, version)
        if self.export_dir is None:
            return str(info.path)
        target = self.export_dir / name
        if not target.is_dir():  # immutable: written once, whole (staged, then renamed)
            staging = self.export_dir / f".{name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for file, data in self.registry.files(info).items():  # opened, when sealed at rest: engines load plain files
                (staging / file).write_bytes(data)
            if self.base_model_name:
                config_file = staging / ADAPTER_CONFIG
                config = json.loads(config_file.read_text(encoding="utf-8"))
                config["base_model_name_or_path"] = self.base_model_name
                config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
            staging.rename(target)
        return str(target)

    def _write_aliases(self) -> None:
        if self.export_dir is not None:
            atomic_write_json(self.export_dir / "active.json", dict(sorted(self.active.items())), mode=0o644)

    def status(self) -> list[dict]:
        with self._lock:
            return [
                {
                    "endpoint": e.url,
                    "up": e.up,
                    "held": sorted(e.held),
                    "pending": len(e.pending),
                    "loads": e.loads,
                    "unloads": e.unloads,
                    "failures": e.failures,
                }
                for e in self.endpoints
            ]


def run_sync(
    sync: Sync,
    follower,
    rescan_s: float = 30.0,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    stop: threading.Event | None = None,
) -> None:
    """Catch up from the registry, follow the lifecycle topic, and keep doing what is due until `stop`.

    The registry is read again every `rescan_s`: a promotion or rollback made
    without an event (`adaptloop train` offline, `rollback --direct`) reaches
    the endpoints too, and the follower re-reads it whenever it reconnects.
    """
    stop = stop or threading.Event()
    if metrics_port:
        _serve_metrics(sync, metrics_port, metrics_host)
    sync.catch_up()
    follower.on_positioned = sync.catch_up
    follower.start()
    log.info("sync ready: %d endpoint(s), %d active version(s)", len(sync.endpoints), len(sync.active))
    rescan_at = time.monotonic() + rescan_s
    try:
        while not stop.is_set():
            if time.monotonic() >= rescan_at:
                sync.catch_up()
                rescan_at = time.monotonic() + rescan_s
            sync.tick()
            stop.wait(0.2)
    finally:
        follower.close()


def _serve_metrics(sync: Sync, port: int, host: str) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):
            status = sync.status()
            for key, kind, text in (
                ("loads", CounterMetricFamily, "adapters loaded"),
                ("unloads", CounterMetricFamily, "adapters unloaded"),
                ("failures", CounterMetricFamily, "calls that failed (retried)"),
                ("pending", GaugeMetricFamily, "operations waiting"),
                ("up", GaugeMetricFamily, "answered the last call"),
            ):
                family = kind(f"adaptloop_sync_{key}", text, labels=["endpoint"])
                for entry in status:
                    family.add_metric([entry["endpoint"]], float(entry[key]))
                yield family
            yield CounterMetricFamily("adaptloop_sync_refused", "versions that failed their sha256 check", value=sync.refused)

        def describe(self):
            return []

    registry = CollectorRegistry()
    registry.register(Collector())
    start_http_server(port, addr=host, registry=registry)
