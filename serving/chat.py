"""`POST /v1/chat/completions`: route the request, hold its adapter, generate, answer whole or as server-sent events.

Every answer says what answered it: `system_fingerprint` (and the header
`X-Adaptloop-Adapter`) is `adaptloop:<user_id>@v<N>:<first 12 hex of the
adapter's sha256>`, or `adaptloop:base:<first 12 hex of the base model's>`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import HTTPException
from fastapi.responses import JSONResponse, StreamingResponse

from core.errors import StorageError
from serving.adapters import AdapterCache, CacheFull
from serving.config import ServeConfig
from serving.engine import Engine, Job, Sampling
from serving.feedback import Completion, EventPublisher, RecentCompletions, conversation_event
from serving.lora import LoraWeights
from serving.metrics import ServeMetrics
from serving.protocol import (
    SSE_DONE,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from serving.routing import Route, RouteError, Router

log = logging.getLogger("adaptloop.serving")

FINGERPRINT_HEADER = "X-Adaptloop-Adapter"


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template over the conversation, ready for the answer (one user message: exactly `ask`'s prompt)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


class AsyncSink:
    """An answer's pieces, from the generation thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.cancelled = False

    def _put(self, item: tuple[str, object]) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def text(self, delta: str) -> None:
        self._put(("text", delta))

    def done(self, content: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._put(("done", (content, finish_reason, prompt_tokens, completion_tokens)))

    def failed(self, error: BaseException) -> None:
        self._put(("error", error))


@dataclass
class _Served:
    """One request on its way: what answers it, its held adapter, its prompt, its sink."""

    id: str
    created: int
    route: Route
    weights: LoraWeights | None
    question: str
    sink: AsyncSink
    started: float
    first_token_at: float | None = None


class ChatService:
    def __init__(
        self,
        cfg: ServeConfig,
        router: Router,
        cache: AdapterCache,
        engine: Engine,
        tokenizer,
        max_positions: int,
        completions: RecentCompletions,
        publisher: EventPublisher | None,
        metrics: ServeMetrics,
    ) -> None:
        self.cfg, self.router, self.cache, self.engine, self.tokenizer = cfg, router, cache, engine, tokenizer
        self.max_positions, self.completions, self.publisher, self.metrics = max_positions, completions, publisher, metrics

    async def complete(self, body: ChatCompletionRequest, who) -> JSONResponse | StreamingResponse:
        max_tokens = body.wanted_tokens(self.cfg.default_max_tokens)
        if max_tokens > self.cfg.max_tokens:
            raise HTTPException(
                422, f"max_tokens {max_tokens} is more than this server gives (serving.max_tokens {self.cfg.max_tokens})"
            )
        try:
            route, weights = await asyncio.to_thread(self._hold, self.router.route(body.model, body.user, who))
        except RouteError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        try:
            served = self._submit(body, route, weights, max_tokens)
        except BaseException:
            self._release(weights)
            raise
        headers = {FINGERPRINT_HEADER: route.fingerprint}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(served, include_usage), media_type="text/event-stream", headers=headers)
        try:
            content, finish, prompt_tokens, completion_tokens = await self._collect(served)
        except BaseException:  # the client left (the request was cancelled) or generation failed: drop the row
            served.sink.cancelled = True
            raise
        finally:
            self._release(weights)
        answer = ChatCompletion(
            id=served.id,
            created=served.created,
            model=route.model,
            system_fingerprint=route.fingerprint,
            choices=[Choice(message=AssistantMessage(content=content), finish_reason=finish)],
            usage=Usage(
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
            ),
        )
        return JSONResponse(answer.model_dump(), headers=headers)

    # ---- steps ------------------------------------------------------------------------ #

    def _hold(self, route: Route) -> tuple[Route, LoraWeights | None]:
        """The route's adapter, loaded and held; a version failing its check falls back as configured."""
        if route.version is None or route.user_id is None:
            return route, None
        try:
            weights = self.cache.acquire(route.user_id, route.version)
        except StorageError as exc:
            log.error("%s not served: %s", route.model, exc)
            return self.router.fallback(route, exc), None
        except CacheFull as exc:
            raise RouteError(503, str(exc)) from None
        return replace(route, fingerprint=f"adaptloop:{route.model}:{weights.sha256[:12]}"), weights

    def _release(self, weights: LoraWeights | None) -> None:
        if weights is not None:
            self.cache.release(weights)

    def _submit(self, body: ChatCompletionRequest, route: Route, weights: LoraWeights | None, max_tokens: int) -> _Served:
        prompt_ids = chat_prompt_ids(self.tokenizer, [{"role": m.role, "content": m.content} for m in body.messages])
        if len(prompt_ids) + max_tokens > self.max_positions:
            raise HTTPException(
                422,
                f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({max_tokens}) exceed the model's "
                f"{self.max_positions} positions",
            )
        sink = AsyncSink(asyncio.get_running_loop())
        sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed, tuple(body.stop_list()), body.ignore_eos)
        served = _Served(
            f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), route, weights, body.messages[-1].content, sink, time.perf_counter()
        )
        self.engine.submit(Job(prompt_ids, weights, sampling, sink))
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return served

    async def _next(self, served: _Served) -> tuple[str, object]:
        kind, value = await served.sink.items.get()
        if kind == "text" and served.first_token_at is None:
            served.first_token_at = time.perf_counter()
            self.metrics.first_token.observe(served.first_token_at - served.started)
        if kind == "error":
            raise HTTPException(500, f"generation failed: {type(value).__name__}")
        return kind, value

    async def _collect(self, served: _Served) -> tuple[str, str, int, int]:
        while True:
            kind, value = await self._next(served)
            if kind == "done":
                await self._finished(served, *value)  # type: ignore[misc]
                return value  # type: ignore[return-value]

    async def _stream(self, served: _Served, include_usage: bool) -> AsyncIterator[bytes]:
        """OpenAI's chunks: the role first, then content pieces, then the finish reason (and the usage), then [DONE]."""
        base = {
            "id": served.id,
            "created": served.created,
            "model": served.route.model,
            "system_fingerprint": served.route.fingerprint,
        }
        ended = False
        try:
            yield ChatCompletionChunk(**base, choices=[ChunkChoice(delta=Delta(role="assistant", content=""))]).sse()
            while True:
                kind, value = await self._next(served)
                if kind == "text":
                    yield ChatCompletionChunk(**base, choices=[ChunkChoice(delta=Delta(content=str(value)))]).sse()
                    continue
                content, finish, prompt_tokens, completion_tokens = value  # type: ignore[misc]
                ended = True
                await self._finished(served, content, finish, prompt_tokens, completion_tokens)
                yield ChatCompletionChunk(**base, choices=[ChunkChoice(delta=Delta(), finish_reason=finish)]).sse()
                if include_usage:
                    usage = Usage(
                        prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens,
                        total_tokens=prompt_tokens + completion_tokens,
                    )
                    yield ChatCompletionChunk(**base, choices=[], usage=usage).sse()
                yield SSE_DONE
                return
        finally:
            if not ended:
                served.sink.cancelled = True  # the client left: the engine drops the row at its next step
            self._release(served.weights)

    async def _finished(self, served: _Served, content: str, finish: str, prompt_tokens: int, completion_tokens: int) -> None:
        now = time.perf_counter()
        self.metrics.generated_tokens.inc(completion_tokens)
        self.metrics.latency.observe(now - served.started)
        if served.first_token_at is not None and completion_tokens > 1 and now > served.first_token_at:
            self.metrics.tokens_per_second.observe((completion_tokens - 1) / (now - served.first_token_at))
        completion = Completion(served.id, served.route.user_id, served.question, content, served.route.model, time.time())
        self.completions.add(completion)
        if self.cfg.publish_conversations and completion.user_id is not None and self.publisher is not None:
            try:
                event = conversation_event(completion)
                await asyncio.to_thread(self.publisher.send, self.cfg.conversations_topic, event.user_id, event.to_bytes())
            except Exception as exc:  # the answer stands; the loop misses one turn, and the log says so
                log.warning("conversation turn of %s not published: %s", served.id, exc)
