"""OpenAI-compatible REST: /v1/chat/completions (with SSE streaming), /v1/models (and one by name), health,
readiness, metrics."""
import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from internvl.serving.v1 import serving_pb2 as pb
from services.gateway.admission import RestAdmission
from services.gateway.auth import RestAuth
from services.gateway.chat import ChatService, total_usage
from services.gateway.errors import ApiError, invalid_request
from services.gateway.metrics import TTFT, Phases, RestMetrics
from services.gateway.schema import ChatCompletion, ChatCompletionRequest, ErrorResponse, Model, ModelList, Status


DISCONNECT_POLL_S = 0.5  # how often a request without an answer yet checks that its client is still there
T = TypeVar("T")


def _errors(*statuses: int) -> dict:
    """The OpenAI error body under each status, for the OpenAPI document."""
    return {status: {"model": ErrorResponse} for status in statuses}


_CHAT_RESPONSES = {200: {"model": ChatCompletion, "description": "the answer; with `stream`, server-sent events of "
                         "chat.completion.chunk objects ending with `data: [DONE]`",
                         "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                   **_errors(400, 401, 404, 413, 429, 500, 503)}


def create_app(chat: ChatService) -> FastAPI:
    app = FastAPI(title="InternVL serving gateway", version="1")
    # The last added runs first: refused requests are counted and timed too.
    app.add_middleware(RestAdmission, admission=chat.admission, max_body_bytes=chat.limits.max_request_bytes)
    app.add_middleware(RestMetrics)
    app.add_middleware(RestAuth, keys=chat.api_keys)  # outermost: no work at all for a request without a key

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """FastAPI's own refusals (a body that is not UTF-8, an unknown route) in the OpenAI error body too."""
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        """A fault of this server's still answers in the OpenAI error body (its traceback goes to the log)."""
        return JSONResponse(ApiError(500, "internal server error", type="internal_error").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(invalid_request(e.errors()).body(), status_code=400)

    def openapi() -> dict:
        """FastAPI's document, less its 422: invalid requests are answered 400 with the OpenAI error body."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operation in (op for path in doc["paths"].values() for op in path.values()):
                operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc["components"]["schemas"].pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health", response_model=Status)
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", response_model=Status, responses={503: {"model": Status}})
    async def ready() -> JSONResponse:
        """Readiness: 503 while a pool has no endpoint or the gateway is stopping, so a Service sends traffic to
        gateways that can serve it."""
        if chat.ready():
            return JSONResponse({"status": "ready"})
        why = "stopping" if chat.stopping else "a model pool has no ready endpoint"
        return JSONResponse({"status": why}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def served_model() -> dict:
        return {"id": chat.model_name, "object": "model", "owned_by": "internvl-serving", "created": 0}

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401))  # a key, when keys are configured
    async def models() -> dict:
        return {"object": "list", "data": [served_model()]}

    @app.get("/v1/models/{model:path}", response_model=Model, responses=_errors(401, 404))
    async def model(model: str) -> dict:
        """OpenAI's model retrieval (`client.models.retrieve`); a served name may hold slashes (org/name)."""
        chat.check_model(model)
        return served_model()

    @app.post("/v1/chat/completions", responses=_CHAT_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request, response: Response):
        start, state = time.perf_counter(), request.scope.setdefault("state", {})  # read by the access line
        phases = state["phases"] = Phases()
        stream = chat.generate(await chat.prepare(req, state.get("request_id"), phases=phases), req)
        sent = time.perf_counter()
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            # Wait for the first tokens before answering, so a request the decoder refuses still gets a 4xx status.
            first = await _while_connected(request, anext(stream))
            if first is None:
                return Response(status_code=499)
            phases.decoder(time.perf_counter() - sent, first[1].embeddings_s)
            state["ttft_s"] = round(time.perf_counter() - start, 4)
            TTFT.labels("rest").observe(state["ttft_s"])
            return StreamingResponse(_sse(first, stream, completion_id, created, req, state),
                                     media_type="text/event-stream", headers={"Server-Timing": phases.server_timing()})
        # One message per choice with its whole answer (the decoder's final_only).
        answers = await _while_connected(request, _collect(stream, req.n))
        if answers is None:
            return Response(status_code=499)
        # The prompt's preparation + the decoder's wait for the first token of the first choice to have one.
        first = min(answers, key=lambda a: a.first_token_s)
        phases.decoder(first.first_token_s, first.embeddings_s)
        state["ttft_s"] = round(sent - start + first.first_token_s, 4)
        TTFT.labels("rest").observe(state["ttft_s"])
        usage = total_usage([a.usage for a in answers])
        state.update(_usage_fields(usage))
        choices = []
        for i, a in enumerate(answers):
            choice = {"index": i, "message": {"role": "assistant", "content": a.text}, "finish_reason": a.finish,
                      "logprobs": _logprobs(a.logprobs) if req.logprobs else None}
            if req.return_token_ids:
                choice["token_ids"] = a.token_ids
            choices.append(choice)
        response.headers["Server-Timing"] = phases.server_timing()
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": _usage(usage)}

    return app


async def _while_connected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result (or its error), or None once the client has left: then it is cancelled, which cancels the
    decoder calls and frees their sequences (a prompt's prefill included, not only the tokens after it)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


@dataclass
class _Answer:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    finish: str = ""
    usage: pb.Usage | None = None
    first_token_s: float = 0.0
    embeddings_s: float = 0.0


async def _collect(responses: AsyncIterator[tuple[int, pb.GenerateResponse]], n: int) -> list[_Answer]:
    answers = [_Answer() for _ in range(n)]
    async for i, r in responses:
        a = answers[i]
        a.text += r.text
        a.token_ids += r.token_ids
        a.logprobs += r.logprobs
        if r.finish_reason:
            a.finish, a.usage, a.first_token_s, a.embeddings_s = r.finish_reason, r.usage, r.first_token_s, \
                r.embeddings_s
    return answers


async def _chain(first, rest: AsyncIterator):
    yield first
    async for r in rest:
        yield r


def _logprobs(entries: list[pb.TokenLogprobs]) -> dict:
    """OpenAI's chat form: each token's text, log-probability, UTF-8 bytes and its top alternatives."""
    def one(lp: pb.Logprob) -> dict:
        return {"token": lp.token.decode(errors="replace"), "logprob": lp.logprob, "bytes": list(lp.token)}
    return {"content": [{**one(e.chosen), "top_logprobs": [one(t) for t in e.top]} for e in entries]}


def _usage_fields(u: pb.Usage | None) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens} if u else {}


def _usage(u: pb.Usage | None) -> dict:
    p, c, cached = (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens) if u else (0, 0, 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _sse(first, rest, completion_id: str, created: int, req: ChatCompletionRequest, state: dict):
    def event(choices: list[dict], **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(index: int, delta: dict, r: pb.GenerateResponse | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": (r and r.finish_reason) or None,
                  "logprobs": _logprobs(r.logprobs) if req.logprobs and r else None}
        if req.return_token_ids and r is not None:
            choice["token_ids"] = list(r.token_ids)
        return event([choice])

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    usages = []
    try:
        async for i, r in _chain(first, rest):
            # Tokens that complete no character yet still travel (with their ids), so nothing is dropped.
            yield chunk(i, {"content": r.text} if r.text else {}, r)
            if r.finish_reason:
                usages.append(r.usage)
    except ApiError as e:  # headers are sent: the error travels as an event, never as a silent cut
        state["failed_status"] = e.status  # the request's outcome, for its counter and access line: not the 200
        yield f"data: {json.dumps(e.body())}\n\n"
        return
    usage = total_usage(usages)
    state.update(_usage_fields(usage))
    if req.stream_options and req.stream_options.include_usage:
        yield event([], usage=_usage(usage))
    yield "data: [DONE]\n\n"
