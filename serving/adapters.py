"""The adapters `adaptloop serve` keeps loaded: named `<user_id>@v<N>`, verified, pinned while in use, LRU-evicted.

    cache = AdapterCache(registry, capacity=32)
    weights = cache.acquire("alice", 3)     # loads alice@v3 through the registry's sha256 check (or finds it)
    ...                                     # generate with it
    cache.release(weights)                  # evictable again

A version is loaded once under its immutable name and never reloaded in
place (vLLM #42125 shows what same-name reloads do to caches). At most
`capacity` are resident; the least recently used one that no request holds
is evicted to make room, so eviction never breaks a request in flight. When
every slot is held, `acquire` waits for one. Loading reads the file in the
caller's thread, never in the generation loop's. An operator may pin a
version (`/v1/load_lora_adapter`) until it is unloaded. A version unloaded,
superseded (a promotion or rollback) or forgotten while requests hold it
finishes them on its own weights and leaves when the last one ends, rather
than staying resident until the LRU reaches it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import AdaptloopError, StorageError, VersionNotFound
from core.storage import file_sha256
from schemas.manifest import ADAPTER_WEIGHTS
from serving.lora import LoraWeights, read_adapter
from trainer.registry import AdapterRegistry, adapter_files, verify_adapter_dir


class CacheFull(AdaptloopError):
    """Every resident adapter is in use (or pinned by an operator) and none could be evicted in time."""


def adapter_name(user_id: str, version: int) -> str:
    return f"{user_id}@v{version}"


@dataclass
class _Entry:
    weights: LoraWeights
    users: int = 0  # requests holding it
    pinned: bool = False  # loaded by an operator: stays until unloaded
    leaving: bool = False  # unloaded or superseded while held: goes when the last request ends, unless wanted again
    forgotten: bool = False  # its user was forgotten: goes when the last request ends, whatever else

    def goes_on_release(self) -> bool:
        return self.users == 0 and (self.forgotten or self.leaving)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    refused: int = 0  # versions that failed their sha256 check


class AdapterCache:
    def __init__(
        self,
        registry: AdapterRegistry,
        capacity: int,
        on_evict: Callable[[LoraWeights], None] | None = None,
        wait_s: float = 30.0,
        device: str = "cpu",
        dtype=None,
    ) -> None:
        self.registry, self.capacity, self.on_evict, self.wait_s = registry, capacity, on_evict, wait_s
        self.device, self.dtype = device, dtype  # the base model's: adapters are read onto its device, in its dtype
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Condition()
        self.stats = CacheStats()

    # ---- requests ------------------------------------------------------------------------ #

    def acquire(self, user_id: str, version: int) -> LoraWeights:
        """The user's version, loaded (verified) if it is not resident; held until `release`."""
        name = adapter_name(user_id, version)
        while True:
            with self._lock:
                entry = self._entries.get(name)
                if entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(name)
                    self.stats.hits += 1
                    return entry.weights
                loading = self._loading.get(name)
                if loading is None:
                    self._loading[name] = threading.Event()
                    self.stats.misses += 1
                    break
            loading.wait(self.wait_s)  # another request is loading this very version: share its load
        try:
            weights = self._read(user_id, version, name)
            with self._lock:
                self._make_room()
                self._entries[name] = _Entry(weights, users=1)
                self.stats.loads += 1
                return weights
        finally:
            with self._lock:
                self._loading.pop(name).set()

    def release(self, weights: LoraWeights) -> None:
        with self._lock:
            entry = self._entries.get(weights.name)
            if entry is not None and entry.weights is weights:
                entry.users -= 1
                if entry.goes_on_release():
                    self._evict(weights.name)
                self._lock.notify_all()

    # ---- operators (vLLM's runtime LoRA API) --------------------------------------------- #

    def pin(self, name: str, path: Path) -> bool:
        """Load `path` under `name` (`<user_id>@v<N>`) and keep it until `unpin`; False when already resident.

        A name is never reloaded in place. When the registry keeps that version,
        the files must be its files (same weights sha256): an operator cannot
        put other weights behind a user's version name.
        """
        manifest = verify_adapter_dir(path)
        sha = (manifest.weights_sha256 if manifest else None) or file_sha256(Path(path) / ADAPTER_WEIGHTS)
        self._check_against_registry(name, sha)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.pinned, entry.leaving = True, False
                return False
        weights = read_adapter(path, name, sha, self.device, self.dtype, adapter_files(path, self.registry.sealer))
        with self._lock:
            self._make_room()
            self._entries[name] = _Entry(weights, pinned=True)
            self.stats.loads += 1
        return True

    def _check_against_registry(self, name: str, sha: str) -> None:
        user_id, _, version = name.rpartition("@v")
        try:
            kept = self.registry.verify(user_id, int(version))
        except VersionNotFound:
            return  # not a registry version: the operator's own adapter
        if kept.manifest.weights_sha256 != sha:
            raise StorageError(
                f"these weights (sha256 {sha[:12]}) are not {name} in the registry "
                f"({(kept.manifest.weights_sha256 or '')[:12]}); refusing to serve them under that name"
            )

    def unpin(self, name: str) -> bool:
        """Unload an operator's adapter (at once when no request holds it, else when the last one ends)."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return False
            entry.pinned = False
            if entry.users == 0:
                self._evict(name)
            else:
                entry.leaving = True
            return True

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def drop_user_versions(self, user_id: str, keep: int | None) -> None:
        """After a promotion or rollback: the user's resident versions other than `keep` go (a held one when its last
        request ends; an operator's pin stays), and `keep` stays even if an earlier swap had it leaving."""
        kept = adapter_name(user_id, keep) if keep else None
        with self._lock:
            for name in [n for n in self._entries if n.startswith(f"{user_id}@v")]:
                entry = self._entries[name]
                if name == kept:
                    entry.leaving = False
                elif entry.pinned:
                    continue
                elif entry.users == 0:
                    self._evict(name)
                else:
                    entry.leaving = True

    def forget_users(self, is_forgotten: Callable[[str], bool]) -> list[str]:
        """Evict every version of the users `is_forgotten` picks, pinned ones too (held ones when released); the names."""
        with self._lock:
            names = [n for n in self._entries if is_forgotten(n.rsplit("@v", 1)[0])]
            for name in names:
                entry = self._entries[name]
                if entry.users == 0:
                    self._evict(name)
                else:
                    entry.forgotten = True
            return names

    # ---- inside ------------------------------------------------------------------------ #

    def _read(self, user_id: str, version: int, name: str) -> LoraWeights:
        try:
            info = self.registry.info(user_id, version)
            files = self.registry.files(info)  # every sha256 checked: a tampered or missing version is never loaded
        except StorageError:
            with self._lock:
                self.stats.refused += 1
            raise
        return read_adapter(info.path, name, info.manifest.weights_sha256 or "", self.device, self.dtype, files)

    def _make_room(self) -> None:
        """Evict least recently used, unheld entries until one more fits (waiting while every one is held)."""
        deadline = time.monotonic() + self.wait_s
        while len(self._entries) >= self.capacity:
            victim = next((n for n, e in self._entries.items() if e.users == 0 and not e.pinned), None)
            if victim is not None:
                self._evict(victim)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CacheFull(f"all {self.capacity} resident adapters are in use (serving.max_resident_adapters)")
            self._lock.wait(remaining)

    def _evict(self, name: str) -> None:
        entry = self._entries.pop(name)
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(entry.weights)
