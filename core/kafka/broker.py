"""A real single-node Apache Kafka (KRaft, broker+controller) run from Maven jars.

No Docker engine runs on the development machines, so `adaptloop kafka up`
fetches `org.apache.kafka:kafka_2.13` with its runtime dependencies from Maven
Central (once, into the cache), formats a KRaft node and starts `kafka.Kafka`
in the background. The state of a broker started this way is a small JSON file
under `<cache_dir>/kafka/run/<port>.json`, so `down` and `status` find it by
port alone. The data directory survives down/up: a restart loses nothing.

    broker = LocalBroker(port=9092, data_dir=..., cache_dir=..., kafka_version="4.1.1")
    broker.up()      # idempotent; returns the bootstrap address
    broker.down()    # SIGTERM, then wait
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from core.errors import BrokerError
from core.settings import Settings

HOST = "127.0.0.1"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.adaptloop</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- Kafka logs through SLF4J 1.x; route it to log4j2 so log4j2.yaml applies. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """Configuration:
  status: warn
  Appenders:
    RollingFile:
      name: file
      fileName: "{log}"
      filePattern: "{log}.%i"
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
      Policies:
        SizeBasedTriggeringPolicy:
          size: 20MB
      DefaultRolloverStrategy:
        max: 2
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: file
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def ensure_kafka_jars(cache_dir: Path, kafka_version: str) -> Path:
    """Resolve Kafka and its runtime dependencies into `<cache_dir>/kafka/dist/<version>/libs` once."""
    dist = cache_dir / "kafka" / "dist" / kafka_version
    libs = dist / "libs"
    stamp = dist / ".complete"
    if stamp.is_file():
        return libs
    if shutil.which("mvn") is None:
        raise BrokerError("Maven ('mvn') is needed once to fetch the Kafka jars; install Maven or set KAFKA_BOOTSTRAP_SERVERS")
    dist.mkdir(parents=True, exist_ok=True)
    # Several processes may start brokers at once on a fresh machine (the test suite's xdist workers):
    # one fetches, the others wait for it and use its jars (two Mavens in one directory break each other).
    with open(dist / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file():
            return libs
        _fetch_kafka_jars(dist, libs, kafka_version)
        stamp.write_text(kafka_version, encoding="utf-8")
    return libs


def _fetch_kafka_jars(dist: Path, libs: Path, kafka_version: str) -> None:
    (dist / "pom.xml").write_text(_POM.format(version=kafka_version), encoding="utf-8")
    _log(f"fetching Apache Kafka {kafka_version} jars from Maven Central into {libs} (once) ...")
    tmp_libs = dist / "libs.partial"
    shutil.rmtree(tmp_libs, ignore_errors=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(dist / "pom.xml"),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp_libs}",
        "-DincludeScope=runtime",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BrokerError(f"fetching the Kafka {kafka_version} jars with Maven failed:\n{tail}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp_libs.rename(libs)


def broker_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when a broker at `bootstrap` answers a metadata request."""
    from confluent_kafka.admin import AdminClient

    # log_level 0: a broker that is still starting is expected; keep librdkafka quiet about it.
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": int(timeout * 1000), "log_level": 0})
    try:
        metadata = admin.list_topics(timeout=timeout)
    except Exception:  # KafkaException while the broker is not up yet
        return False
    return bool(metadata.brokers)


@dataclass(frozen=True)
class BrokerState:
    pid: int
    port: int
    controller_port: int
    data_dir: str
    log_file: str
    kafka_version: str


class LocalBroker:
    """Start, stop and inspect one local KRaft broker, identified by its port."""

    def __init__(
        self,
        *,
        port: int,
        cache_dir: Path,
        data_dir: Path | None = None,
        kafka_version: str = "4.1.1",
        heap: str = "512m",
        startup_timeout_s: float = 90.0,
        extra_listeners: tuple[tuple[str, str, int], ...] = (),
        extra_properties: dict[str, str] | None = None,
    ) -> None:
        """`extra_listeners`: (name, security protocol, port) beside PLAINTEXT, e.g.
        ("SASL_SSL", "SASL_SSL", 9094); `extra_properties` configures them
        (JAAS users, key stores): see docs/SECURITY.md for a worked TLS + SASL setup."""
        self.port = port
        self.extra_listeners = tuple(extra_listeners)
        self.extra_properties = dict(extra_properties or {})
        self.cache_dir = Path(cache_dir)
        self.data_dir = Path(data_dir) if data_dir else self.cache_dir / "kafka" / f"broker-{port}"
        self.kafka_version = kafka_version
        self.heap = heap
        self.startup_timeout_s = startup_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, port: int | None = None, data_dir: str | Path | None = None) -> LocalBroker:
        """The broker `kafka.local_broker` describes (`port` and `data_dir` override it)."""
        lb = settings.kafka.local_broker
        return cls(
            port=port or lb.port,
            cache_dir=settings.cache_dir,
            data_dir=Path(data_dir) if data_dir else lb.data_dir,
            kafka_version=lb.kafka_version,
            heap=lb.heap,
            startup_timeout_s=lb.startup_timeout_s,
        )

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def _state_file(self) -> Path:
        return self.cache_dir / "kafka" / "run" / f"{self.port}.json"

    # ---- inspection ------------------------------------------------------- #

    def state(self) -> BrokerState | None:
        """The recorded state of a broker on this port whose process is alive, else None."""
        try:
            state = BrokerState(**json.loads(self._state_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        return state if pid_alive(state.pid) else None

    def status(self) -> str:
        state = self.state()
        if state is None:
            if port_in_use(self.port):
                return f"port {self.port} is in use, but not by a broker that adaptloop started"
            return f"no broker on port {self.port}"
        answering = "answering" if broker_answers(self.bootstrap) else "NOT answering yet"
        return f"up at {self.bootstrap} (pid {state.pid}, Kafka {state.kafka_version}, data {state.data_dir}), {answering}"

    # ---- up --------------------------------------------------------------- #

    def up(self) -> str:
        """Start the broker unless it already runs; wait until it answers; return bootstrap."""
        existing = self.state()
        if existing is not None:
            if self._wait_ready(existing.pid, Path(existing.log_file)):
                _log(f"broker already running at {self.bootstrap} (pid {existing.pid})")
                return self.bootstrap
            raise BrokerError(f"broker pid {existing.pid} on port {self.port} does not answer; see {existing.log_file}")
        if port_in_use(self.port):
            raise BrokerError(f"port {self.port} is already in use by another process; choose another with --port")

        libs = ensure_kafka_jars(self.cache_dir, self.kafka_version)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        meta = self._node_meta()
        properties = self._write_properties(meta)
        log_file = self.data_dir / "server.log"
        log4j = self.data_dir / "log4j2.yaml"
        log4j.write_text(_LOG4J2.format(log=log_file), encoding="utf-8")
        java = self._java()
        classpath = f"{libs}/*"
        jvm = [
            java,
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            classpath,
        ]

        if not (self.data_dir / "logs" / "meta.properties").is_file():
            fmt = subprocess.run(
                # "--cluster-id=..." as one word: a base64 id may start with "-".
                [*jvm, "kafka.tools.StorageTool", "format", f"--cluster-id={meta['cluster_id']}", f"--config={properties}"],
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting the KRaft storage failed: {(fmt.stdout + fmt.stderr).strip()[-2000:]}")

        stdout = open(self.data_dir / "stdout.log", "ab")  # the child owns it
        proc = subprocess.Popen(
            [*jvm, "kafka.Kafka", str(properties)],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the CLI and ignores its Ctrl-C
            cwd=self.data_dir,
        )
        stdout.close()
        state = BrokerState(
            pid=proc.pid,
            port=self.port,
            controller_port=meta["controller_port"],
            data_dir=str(self.data_dir),
            log_file=str(log_file),
            kafka_version=self.kafka_version,
        )
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        self._state_file.write_text(json.dumps(state.__dict__), encoding="utf-8")
        if not self._wait_ready(proc.pid, log_file, proc):
            terminate(proc.pid, 10, "broker")
            raise BrokerError(f"Kafka did not come up on port {self.port} in {self.startup_timeout_s:.0f}s; see {log_file}")
        _log(f"broker up at {self.bootstrap} (pid {proc.pid}, data {self.data_dir})")
        return self.bootstrap

    def _node_meta(self) -> dict:
        """Cluster id and controller port, kept in the data dir so restarts reuse them."""
        meta_file = self.data_dir / "adaptloop-node.json"
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {"cluster_id": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")}
        controller = meta.get("controller_port")
        if not controller or controller == self.port or port_in_use(controller):
            meta["controller_port"] = free_port()
        meta_file.write_text(json.dumps(meta), encoding="utf-8")
        return meta

    def _write_properties(self, meta: dict) -> Path:
        path = self.data_dir / "server.properties"
        controller = meta["controller_port"]
        extra = "".join(f",{name}://{HOST}:{port}" for name, _protocol, port in self.extra_listeners)
        protocols = "".join(f",{name}:{protocol}" for name, protocol, _port in self.extra_listeners)
        path.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{HOST}:{controller}",
                    f"listeners=PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{controller}{extra}",
                    f"advertised.listeners=PLAINTEXT://{HOST}:{self.port}{extra}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{protocols}",
                    f"log.dirs={self.data_dir / 'logs'}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=10",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "log.retention.hours=168",
                    "num.network.threads=2",
                    "num.io.threads=2",
                    *(f"{key}={value}" for key, value in self.extra_properties.items()),
                    "",
                ]
            ),
            encoding="utf-8",
        )
        return path

    @staticmethod
    def _java() -> str:
        home = os.environ.get("JAVA_HOME")
        candidate = Path(home) / "bin" / "java" if home else None
        if candidate and candidate.is_file():
            return str(candidate)
        found = shutil.which("java")
        if not found:
            raise BrokerError("Java 17+ is needed to run the local Kafka broker; install it or set KAFKA_BOOTSTRAP_SERVERS")
        return found

    def _wait_ready(self, pid: int, log_file: Path, proc: subprocess.Popen | None = None) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if (proc is not None and proc.poll() is not None) or not pid_alive(pid):
                tail = _tail(log_file) or _tail(log_file.parent / "stdout.log")
                raise BrokerError(f"Kafka exited during start-up (port {self.port}):\n{tail}")
            if broker_answers(self.bootstrap, timeout=2.0):
                return True
            time.sleep(0.5)
        return False

    # ---- down ------------------------------------------------------------- #

    def down(self, timeout: float = 60.0) -> bool:
        """Stop the broker on this port; return False when none was running."""
        state = self.state()
        if state is None:
            self._state_file.unlink(missing_ok=True)
            return False
        terminate(state.pid, timeout, "broker")
        self._state_file.unlink(missing_ok=True)
        return True


def terminate(pid: int, timeout: float, name: str = "process") -> None:
    """SIGTERM `pid`, wait up to `timeout` seconds for it to exit, then SIGKILL it."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.2)
    _log(f"{name} pid {pid} did not stop in {timeout:.0f}s after SIGTERM; killing it")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
