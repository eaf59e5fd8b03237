"""The adapter cache: loaded once under an immutable name, verified, held while in use, LRU-bounded."""

from __future__ import annotations

import threading

import pytest

from core.errors import StorageError
from serving.adapters import AdapterCache, CacheFull
from tests.support.adapters import manifest, random_adapter
from trainer.model import BaseModelRef, load_base
from trainer.registry import AdapterRegistry

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def registry(tiny_model_dir, tmp_path_factory):
    """Six users, each with an active v1 (tiny random adapters)."""
    model, _tokenizer, _device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")
    tmp = tmp_path_factory.mktemp("cache")
    registry = AdapterRegistry(tmp / "store")
    for n in range(6):
        registry.register(f"u{n}", random_adapter(model, tmp / f"a{n}", seed=n), manifest(request_id=f"r{n}"))
        registry.activate(f"u{n}", 1, reason="test")
    return registry


def test_three_times_more_users_than_slots_stay_within_the_bound(registry):
    evicted = []
    cache = AdapterCache(registry, capacity=2, on_evict=lambda w: evicted.append(w.name))
    for _round in range(2):
        for n in range(6):
            weights = cache.acquire(f"u{n}", 1)
            assert weights.name == f"u{n}@v1" and weights.sha256 == registry.info(f"u{n}", 1).manifest.weights_sha256
            cache.release(weights)
            assert len(cache.resident()) <= 2
    assert cache.stats.loads == 12 and cache.stats.evictions == 10 and evicted[:4] == ["u0@v1", "u1@v1", "u2@v1", "u3@v1"]
    again = cache.acquire("u5", 1)
    assert cache.stats.hits == 1, "the most recent one is still resident"
    cache.release(again)


def test_an_adapter_in_use_is_never_evicted(registry):
    cache = AdapterCache(registry, capacity=2, wait_s=0.5)
    held = [cache.acquire("u0", 1), cache.acquire("u1", 1)]
    with pytest.raises(CacheFull, match="all 2 resident adapters are in use"):
        cache.acquire("u2", 1)
    assert sorted(cache.resident()) == ["u0@v1", "u1@v1"]
    cache.wait_s = 60  # a request that waits for a slot gets it as soon as another request ends
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(cache.acquire("u2", 1)))
    waiting.start()
    cache.release(held[0])
    waiting.join(60)
    assert [w.name for w in got] == ["u2@v1"] and sorted(cache.resident()) == ["u1@v1", "u2@v1"]


def test_a_tampered_version_is_refused_and_counted(registry, tmp_path):
    cache = AdapterCache(registry, capacity=4)
    path = registry.version_dir("u4", 1) / "adapter_model.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"tampered")
    try:
        with pytest.raises(StorageError, match="sha256 mismatch"):
            cache.acquire("u4", 1)
        assert cache.stats.refused == 1 and "u4@v1" not in cache.resident()
    finally:
        path.write_bytes(original)


def test_an_operators_adapter_stays_until_unloaded(registry):
    cache = AdapterCache(registry, capacity=2)
    assert cache.pin("u3@v1", registry.version_dir("u3", 1)) is True
    assert cache.pin("u3@v1", registry.version_dir("u3", 1)) is False, "never reloaded under the same name"
    for n in (0, 1, 2):
        cache.release(cache.acquire(f"u{n}", 1))
    assert "u3@v1" in cache.resident() and len(cache.resident()) == 2
    assert cache.unpin("u3@v1") and "u3@v1" not in cache.resident() and not cache.unpin("u3@v1")
    with pytest.raises(StorageError, match="not u3@v1 in the registry"):
        cache.pin("u3@v1", registry.version_dir("u4", 1))  # other weights behind a user's version name
    assert cache.pin("ops@v1", registry.version_dir("u4", 1)), "an operator's own adapter, not in the registry"


def test_a_version_superseded_or_unloaded_while_held_leaves_when_its_last_request_ends(registry):
    """A promotion (or an operator's unload) while a request holds a version: the request keeps it to the end, and
    it goes then, not when the LRU reaches it; a version kept again (a rollback, a new pin) stays."""
    evicted = []
    cache = AdapterCache(registry, capacity=4, on_evict=lambda w: evicted.append(w.name))
    held = cache.acquire("u0", 1)
    cache.drop_user_versions("u0", keep=2)  # u0@v2 promoted while a request holds u0@v1
    assert "u0@v1" in cache.resident() and evicted == [], "never taken from a request in flight"
    cache.release(held)
    assert "u0@v1" not in cache.resident() and evicted == ["u0@v1"]

    held = cache.acquire("u1", 1)
    cache.drop_user_versions("u1", keep=2)
    cache.drop_user_versions("u1", keep=1)  # rolled back to the version still held
    cache.release(cache.acquire("u1", 1))  # the rollback's preload
    cache.release(held)
    assert "u1@v1" in cache.resident(), "kept again: it stays"

    cache.pin("u2@v1", registry.info("u2", 1).path)
    held = cache.acquire("u2", 1)
    assert cache.unpin("u2@v1") and "u2@v1" in cache.resident(), "unloaded while a request holds it"
    cache.release(held)
    assert "u2@v1" not in cache.resident()
    cache.pin("u3@v1", registry.info("u3", 1).path)
    held = cache.acquire("u3", 1)
    cache.unpin("u3@v1")
    cache.pin("u3@v1", registry.info("u3", 1).path)  # loaded again before the request ended
    cache.release(held)
    assert "u3@v1" in cache.resident() and evicted == ["u0@v1", "u2@v1"]


def test_a_forgotten_users_versions_leave_the_cache_pinned_or_held(registry):
    """A `forgotten` event names a salted hash: every resident version of that user goes, an operator's pin too;
    one a request still holds goes when the request ends. Other users stay."""
    evicted = []
    cache = AdapterCache(registry, capacity=4, on_evict=lambda w: evicted.append(w.name))
    held = cache.acquire("u0", 1)
    cache.pin("u1@v1", registry.info("u1", 1).path)
    cache.release(cache.acquire("u2", 1))
    assert sorted(cache.forget_users(lambda user: user in ("u0", "u1"))) == ["u0@v1", "u1@v1"]
    assert sorted(cache.resident()) == ["u0@v1", "u2@v1"] and evicted == ["u1@v1"], "the pinned one at once"
    cache.release(held)
    assert cache.resident() == ["u2@v1"] and evicted == ["u1@v1", "u0@v1"], "the held one once released"


def test_a_version_sealed_at_rest_serves_the_same_weights(registry, tmp_path):
    from tests.support.stores import sealed_store

    user = registry.info("u0", 1)
    sealed = AdapterRegistry(tmp_path / "store", sealer=sealed_store(tmp_path).sealer)
    sealed.register("u0", sealed.plain_dir(user.path, tmp_path / "plain"), manifest(request_id="r0"))
    plain_weights = AdapterCache(registry, capacity=1).acquire("u0", 1)
    sealed_weights = AdapterCache(sealed, capacity=1).acquire("u0", 1)
    assert sealed_weights.sha256 == plain_weights.sha256, "the version's identity is its plaintext's sha256"
    assert sealed_weights.modules.keys() == plain_weights.modules.keys()
    for module, (a, b) in plain_weights.modules.items():
        assert (sealed_weights.modules[module][0] == a).all() and (sealed_weights.modules[module][1] == b).all(), module
