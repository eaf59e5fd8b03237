"""`adaptloop serve`: an OpenAI-compatible server that answers each user with their active adapter.

    adaptloop serve [--host 127.0.0.1] [--port 8100]

    POST /v1/chat/completions     OpenAI's chat completions (also `stream: true`); `user` picks the adapter
    GET  /v1/models               the base model first, then the adapters resident now (`<user_id>@v<N>`)
    POST /v1/feedback             a rating or correction of a recent completion -> a feedback event for the loop
    POST /v1/load_lora_adapter    vLLM's runtime LoRA API (admin): load `<user_id>@v<N>` from a path
    POST /v1/unload_lora_adapter
    GET  /healthz, /metrics

The base model is loaded once; the adapters are loaded on demand and kept in
an LRU (serving/adapters.py); the requests of many users share each
generation step (serving/engine.py). Bearer tokens and errors are the API's:
a `user:<id>` token is answered only as that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse

from api.auth import TokenStore
from api.deps import Auth
from api.errors import install_body_limit, install_error_handlers
from core.encryption import sealer_for
from core.errors import StorageError
from core.forgotten import UserHasher
from core.settings import Settings
from core.storage import ArtifactStore
from serving.adapters import AdapterCache
from serving.chat import ChatService
from serving.config import ServeConfig
from serving.engine import Engine
from serving.feedback import EventPublisher, RecentCompletions, UnknownCompletion, feedback_event
from serving.follower import LifecycleFollower
from serving.metrics import ServeMetrics
from serving.protocol import (
    ChatCompletionRequest,
    FeedbackAccepted,
    FeedbackRequest,
    LoadLoraRequest,
    ModelCard,
    ModelList,
    UnloadLoraRequest,
)
from serving.routing import Router
from trainer.model import BaseModelRef
from trainer.registry import AdapterRegistry

log = logging.getLogger("adaptloop.serving")


class Server:
    """Everything one serve process holds, built once."""

    def __init__(self, cfg: ServeConfig, model, tokenizer, device, base: BaseModelRef, follow: bool = True) -> None:
        self.cfg, self.base, self.started = cfg, base, int(time.time())
        self.registry = AdapterRegistry(cfg.storage_root, cfg.max_versions, sealer_for(cfg.storage_root, cfg.encryption))
        self.hasher = UserHasher.for_store(ArtifactStore(cfg.storage_root))
        self.router = Router(self.registry, base.model_id, base.sha256, cfg.on_bad_adapter)
        self.engine = Engine(model, tokenizer, device, cfg.max_batch_size, cfg.batch_window_s)
        self.cache = AdapterCache(
            self.registry,
            cfg.max_resident_adapters,
            on_evict=self.engine.lora.forget,
            device=str(device),
            dtype=next(model.parameters()).dtype,
        )
        self.metrics = ServeMetrics(self.cache, self.engine)
        self.engine.on_step = self.metrics.batch_rows.observe
        self.completions = RecentCompletions(cfg.feedback_window)
        self.publisher = EventPublisher(cfg.client)
        self.chat = ChatService(
            cfg,
            self.router,
            self.cache,
            self.engine,
            tokenizer,
            model.config.max_position_embeddings,
            self.completions,
            self.publisher,
            self.metrics,
        )
        self.follower = LifecycleFollower(cfg.client, cfg.lifecycle_topic, self.on_swap) if follow else None

    def on_swap(self, user_id: str, version: int | None, event: dict) -> None:
        """A promotion or rollback announced on the lifecycle topic: drop the user's other versions, load the new one.

        A forget names the user by salted hash only: whatever is resident of
        the user whose hash it is goes (the registry no longer has them either).
        """
        if event.get("type") == "forgotten":
            dropped = self.cache.forget_users(lambda resident: self.hasher(resident) == user_id)
            if self.registry.sealer is not None:
                self.registry.sealer.forget(user_id)  # their data key, held in memory, goes too
            log.info("a forgotten user's %d resident version(s) dropped", len(dropped))
            return
        self.metrics.swaps.inc()
        self.cache.drop_user_versions(user_id, keep=version)
        if version is not None and self.registry.active(user_id) == version:
            self.cache.release(self.cache.acquire(user_id, version))  # loaded before its first request

    def start(self) -> None:
        self.engine.start()
        if self.follower is not None:
            self.follower.start()

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.close()
        self.engine.stop()
        self.publisher.close()


def create_app(server: Server, tokens: TokenStore) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = FastAPI(title="adaptloop serve", version="1", description=__doc__, lifespan=lifespan)
    app.state.tokens, app.state.server = tokens, server
    install_error_handlers(app)
    install_body_limit(app, server.cfg.max_body_bytes, server.metrics.requests)
    _routes(app, server)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, who: Auth):
        return await server.chat.complete(body, who)

    @app.get("/v1/models", tags=["openai"])
    def models(who: Auth) -> ModelList:
        base = ModelCard(id=server.base.model_id, created=server.started)
        resident = [
            ModelCard(id=name, created=server.started, root=server.base.model_id, parent=server.base.model_id)
            for name in server.cache.resident()
            if who.may_act_for(name.rpartition("@v")[0])  # a user's token sees only that user's versions
        ]
        return ModelList(data=[base, *resident])

    @app.post("/v1/feedback", status_code=202, tags=["loop"])
    async def feedback(body: FeedbackRequest, who: Auth) -> FeedbackAccepted:
        try:
            completion = server.completions.get(body.completion_id)
        except UnknownCompletion as exc:
            raise HTTPException(410 if exc.expired else 404, str(exc)) from None
        if completion.user_id is None:
            raise HTTPException(422, "that completion was answered for nobody (no `user`): feedback needs the user")
        if not who.may_act_for(completion.user_id):
            raise HTTPException(403, f"this token may not give feedback for user {completion.user_id!r}")
        event = feedback_event(completion, body)
        await asyncio.to_thread(server.publisher.send, server.cfg.feedback_topic, event.user_id, event.to_bytes())
        server.metrics.feedback.labels(event.kind).inc()
        return FeedbackAccepted(event_id=event.event_id, topic=server.cfg.feedback_topic, kind=event.kind)

    @app.post("/v1/load_lora_adapter", tags=["lora"], response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoraRequest, who: Auth) -> str:
        _admin(who)
        _versioned(server, body.lora_name)
        try:
            added = await asyncio.to_thread(server.cache.pin, body.lora_name, _path(body.lora_path))
        except StorageError as exc:  # not a PEFT adapter, or not the registry's files for that name
            raise HTTPException(422, str(exc)) from None
        return f"Success: LoRA adapter '{body.lora_name}' {'added successfully' if added else 'was already loaded'}."

    @app.post("/v1/unload_lora_adapter", tags=["lora"], response_class=PlainTextResponse)
    def unload_lora_adapter(body: UnloadLoraRequest, who: Auth) -> str:
        _admin(who)
        if not server.cache.unpin(body.lora_name):
            raise HTTPException(404, f"no LoRA adapter '{body.lora_name}' is loaded")
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        following = server.follower is None or server.follower.ready.is_set()
        return {
            "status": "ok",
            "following_lifecycle": following,
            "running": server.engine.running,
            "waiting": server.engine.waiting,
        }

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics(who: Auth) -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render().decode(), media_type="text/plain; version=0.0.4")


def _admin(who) -> None:
    if not who.is_admin:
        raise HTTPException(403, "loading and unloading adapters needs an admin token")


def _versioned(server: Server, name: str) -> None:
    """adaptloop serves versions under their immutable names `<user_id>@v<N>` only."""
    from serving.routing import RouteError

    try:
        user, version = server.router.parse_model(name)
    except RouteError:  # not a user id at all
        user, version = None, None
    if user is None or version is None:
        raise HTTPException(422, f"lora_name {name!r}: adaptloop serves versions named <user_id>@v<N>")


def _path(value: str):
    from pathlib import Path

    path = Path(value.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise HTTPException(404, f"lora_path {value!r} is not a directory")
    return path


def build_server(settings: Settings, follow: bool = True) -> Server:
    """The base model loaded once, and the server around it, as the settings say."""
    from trainer.model import load_base, resolve_base_model

    base = resolve_base_model(settings.model.base_model, settings.model.gguf_file, settings.cache_dir)
    model, tokenizer, device = load_base(base, settings.model.dtype)
    return Server(ServeConfig.from_settings(settings), model, tokenizer, device, base, follow=follow)


def run_serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from core.settings import tokens_file

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    server = build_server(settings)
    log.info("serving %s on http://%s:%d/v1", server.base.model_id, host, port)
    uvicorn.run(create_app(server, TokenStore(tokens_file(settings))), host=host, port=port, log_level="info")
