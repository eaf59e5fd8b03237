"""`adaptloop serving sync` keeping a second `adaptloop serve` in step through vLLM's runtime LoRA API."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from core.forgotten import UserHasher
from core.kafka.io import produce
from core.storage import ArtifactStore
from schemas import LifecycleEvent
from tests.support.adapters import manifest, random_adapter
from tests.support.handles import topic_config, unique_topics
from tests.support.processes import Service, log_says
from trainer.model import BaseModelRef, load_base
from trainer.registry import AdapterRegistry

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_sync_follows_a_promotion_a_rollback_and_its_own_restart(serve_factory, tiny_model_dir, tmp_path):
    target = serve_factory()  # the inference server kept in step (an `adaptloop serve`, as vLLM would be)
    registry = AdapterRegistry(target.store)
    # The sync follows a lifecycle topic of its own: the target must not learn of the swaps by itself.
    topics = unique_topics("sync")
    config = tmp_path / "sync.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage_root": str(target.store),
                "topics": topic_config(topics),
                "streams": {"internal_partitions": 3},
                "serving": {"sync_grace_s": 0.5, "sync_retry_max_s": 2},
            }
        )
    )

    def announce(**event) -> None:
        message = LifecycleEvent(event_id=f"ev-{event['type']}-{event.get('version')}", user_id="sia", **event)
        produce(target.client, topics["lifecycle"], [("sia", message.to_bytes())])

    model, _tokenizer, _device = load_base(BaseModelRef(str(tiny_model_dir), "tiny", ""), "float32")

    def promote(seed: int, announced: bool = True) -> int:
        info = registry.register("sia", random_adapter(model, tmp_path / f"a{seed}", seed=seed), manifest(request_id=f"r{seed}"))
        previous = registry.activate("sia", info.version, reason="test")
        if announced:
            announce(type="promoted", version=info.version, previous_version=previous)
        return info.version

    def held() -> set[str]:
        return {m["id"] for m in httpx.get(f"{target.url}/v1/models", headers=target.headers()).json()["data"] if "@v" in m["id"]}

    export = tmp_path / "export"
    sync = Service(
        config,
        ("serving", "sync", "--endpoint", target.url, "--export-dir", str(export)),
        tmp_path / "sync.log",
        log_says("sync ready"),
        target.client.bootstrap_servers,
        env={"ADAPTLOOP_SYNC_TOKEN": target.tokens["admin"]},
    )
    v1 = promote(1, announced=False)  # active before the sync starts: it catches up from the registry
    sync.start(timeout=60)
    try:
        target.wait_for(lambda: held() == {f"sia@v{v1}"}, what="the catch-up load")
        v2 = promote(2)
        target.wait_for(lambda: held() == {f"sia@v{v2}"}, what="the promotion loaded, the old version unloaded after the grace")
        assert json.loads((export / "active.json").read_text()) == {"sia": f"sia@v{v2}"}
        assert sorted(p.name for p in export.iterdir() if p.is_dir()) == [f"sia@v{v1}", f"sia@v{v2}"]
        assert (export / f"sia@v{v2}" / "adapter_model.safetensors").read_bytes() == (
            registry.version_dir("sia", v2) / "adapter_model.safetensors"
        ).read_bytes()
        registry.rollback("sia", "complaints")
        announce(type="rolled_back", version=v1, previous_version=v2)
        target.wait_for(lambda: held() == {f"sia@v{v1}"}, what="the rollback: the older version back, the rolled-back one gone")
        sync.stop()
        v3 = promote(3, announced=False)  # while the sync is down, and without an event
        sync.start(timeout=60)
        target.wait_for(lambda: held() == {f"sia@v{v3}"}, what="the restarted sync catching up")
        assert json.loads((export / "active.json").read_text()) == {"sia": f"sia@v{v3}"}
        # A forget names only the salted hash: the user is unloaded at once, the exported copies deleted.
        user_hash = UserHasher.for_store(ArtifactStore(str(target.store)))("sia")
        forgotten = LifecycleEvent(event_id="ev-forgotten", type="forgotten", user_id=user_hash, details={"user_hash": user_hash})
        produce(target.client, topics["lifecycle"], [(user_hash, forgotten.to_bytes())])
        target.wait_for(lambda: held() == set(), what="the forgotten user unloaded from the endpoint")
        assert [p.name for p in export.iterdir() if p.is_dir()] == [] and json.loads((export / "active.json").read_text()) == {}
    finally:
        sync.stop()
    assert "sync ready" in sync.log() and "Traceback" not in sync.log()
