"""The Quart app: routes, auth, error mapping. ``create_app(model, settings) -> Quart``."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from quart_cors import cors
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from flaxchat.chat.errors import ChatError
from flaxchat.chat.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from flaxchat.chat.reply import Reply
from flaxchat.chat.responses import ResponsesRequest
from flaxchat.chat.request import Prepared, ServedModel, prepare, prepare_completion, submit
from flaxchat.chat.tokens import detokenize, tokenize
from flaxchat.serve.errors import APIError, from_chat_error, from_validation_error
from flaxchat.serve.ledger import Ledger, Reservation, key_hash
from flaxchat.serve.limits import RateLimiter
from flaxchat.serve.metrics import Metrics
from flaxchat.serve.openapi import openapi_document
from flaxchat.serve.render import Rendering, TextRendering
from flaxchat.serve.responses import ResponsesRendering

log = logging.getLogger("flaxchat.server")
Body = TypeVar("Body", bound=BaseModel)


@dataclass(frozen=True)
class ServerSettings:
    api_keys: frozenset[str] = field(default_factory=frozenset)  # empty: no auth
    max_body_bytes: int = 4 * 1024 * 1024
    rate_limit_per_minute: int | None = None  # per API key (per client address without keys)
    token_budgets: Mapping[str, int] = field(default_factory=dict)  # API key -> total tokens allowed
    ledger: Ledger | None = None  # keys and token accounting (persistent); None: in memory, from the two above
    cors_allow_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any); none: no CORS
    # Seconds a client may take to send its request body (then 408), so slow-drip clients cannot hold the
    # server; headers must be complete within hypercorn's keep-alive timeout (5 s, serve/server.py).
    read_timeout: float = 30.0


def not_unicode(value: object, where: str = "") -> str | None:
    """The dotted path of the first string that is not valid Unicode (JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no tokenizer can take), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and not_unicode(key) is not None:
            return where
        if (found := not_unicode(item, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return None


def _error_response(error: APIError) -> Response:
    response = Response(json.dumps(error.body()), status=error.status, content_type="application/json")
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def create_app(model: ServedModel, settings: ServerSettings = ServerSettings()) -> Quart:
    app = Quart("flaxchat")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["BODY_TIMEOUT"] = settings.read_timeout  # Quart: 408 when the body takes longer
    rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    ledger = settings.ledger or Ledger()
    for key in settings.api_keys:
        ledger.add_key(f"key-{key_hash(key)[:12]}", settings.token_budgets.get(key), key=key)
    keys_required = bool(settings.api_keys) or ledger.has_keys
    metrics = Metrics(model.engine)

    @app.after_request
    async def _count(response):
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(rule, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), content_type="text/plain; version=0.0.4")

    @app.errorhandler(APIError)
    async def _api_error(error: APIError):
        return _error_response(error)

    @app.errorhandler(ChatError)
    async def _chat_error(error: ChatError):
        if error.code == "content_filter":
            metrics.filtered_prompts.inc()
        return _error_response(from_chat_error(error))

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = {413: f"Request body exceeds {settings.max_body_bytes} bytes"}.get(error.code, error.description)
        return _error_response(APIError(error.code or 500, message, code=kinds.get(error.code)))

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception):
        request_id = "req_" + secrets.token_hex(8)
        log.exception("unhandled error in request %s", request_id)
        return _error_response(APIError(500, f"Internal server error (request id {request_id})",
                                        type="server_error", code="internal_error"))

    def check_auth() -> str:
        """The caller's identity for limits: its API key's hash, or its address when no keys are configured."""
        if not keys_required:
            return "addr:" + (request.remote_addr or "?")
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                           code="invalid_api_key")
        identity = ledger.identify(key.strip())
        if identity is None:
            raise APIError(401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key")
        return identity

    def model_card(name: str) -> dict:
        """OpenAI's model object, plus the context length (vLLM's ``max_model_len``) and the other names."""
        return {"id": name, "object": "model", "created": model.created, "owned_by": "flaxchat",
                "max_model_len": model.engine.max_len, "root": model.id, "aliases": list(model.aliases)}

    @app.get("/openapi.json")
    async def openapi():
        return openapi_document()

    @app.get("/health")
    async def health():
        engine = model.engine
        body = {"status": "ok", "model": model.id, "busy_slots": engine.busy_slots, "queue_depth": engine.queue_depth}
        if not engine.healthy:  # the engine thread died (or stopped): say so rather than let requests hang
            body |= {"status": "engine stopped", "error": engine.failure}
            return Response(json.dumps(body), status=503, content_type="application/json")
        return body

    @app.get("/v1/models")
    async def list_models():
        check_auth()
        return {"object": "list", "data": [model_card(n) for n in (model.id, *model.aliases)]}

    @app.get("/v1/models/<path:name>")
    async def get_model(name: str):
        check_auth()
        if not model.answers_to(name):
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return model_card(name)

    async def read_body(schema: type[Body]) -> Body:
        """The JSON object body as ``schema``; 400s for what is not one, pydantic's 400/422 otherwise."""
        if request.mimetype != "application/json":
            raise APIError(400, "Content-Type must be application/json", code="invalid_content_type")
        raw = await request.get_data(as_text=False)
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "The JSON body is nested too deeply", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise APIError(400, "The request body must be a JSON object", code="invalid_json")
        try:
            where = not_unicode(payload)
        except RecursionError:
            raise APIError(400, "The JSON body is nested too deeply", code="invalid_json") from None
        if where is not None:
            raise APIError(400, f"{where or 'body'}: text must be valid Unicode (a \\u escape left a lone surrogate)",
                           param=where or None, code="invalid_value")
        try:
            body = schema.model_validate(payload)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        name = getattr(body, "model", None)
        if name is not None and not model.answers_to(name):
            raise APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return body

    @app.post("/tokenize")
    async def tokenize_text():
        check_auth()
        return tokenize(model, await read_body(TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize_tokens():
        check_auth()
        return detokenize(model, await read_body(DetokenizeRequest))

    def start(caller: str, prepared: list[Prepared]) -> tuple[Reservation, list[Reply]]:
        """Reserve the requests' worst case on the caller's budget, then queue them (all or none)."""
        worst = sum(len(p.prompt_ids) + p.params.max_tokens * p.params.n for p in prepared)
        reservation, replies = ledger.reserve(caller, worst), []
        try:
            for item in prepared:
                replies.append(Reply(model, item, submit(model, item)))
        except ChatError:
            for reply in replies:  # a later prompt was refused: the earlier ones must not run on
                reply.cancel()
            ledger.settle(reservation, 0)
            raise
        return reservation, replies

    async def respond(reservation: Reservation, replies: list[Reply],
                      rendering: Rendering | TextRendering | ResponsesRendering, stream: bool):
        """The replies as one JSON object or as server-sent events; their slots freed and tokens charged at the end."""
        def settle() -> None:
            for reply in replies:
                reply.cancel()  # a no-op once finished; frees the slots if the client went away
            ledger.settle(reservation, sum(reply.prompt_tokens + reply.completion_tokens for reply in replies))

        if not stream:
            try:
                with metrics.latency.time():
                    return await rendering.completion()
            finally:
                settle()

        async def events():
            try:
                async for chunk in rendering.chunks():
                    yield rendering.frame(chunk)
                yield rendering.done_marker
            except ChatError as error:  # headers are gone: report in the stream, as OpenAI does
                yield rendering.error_frame(error)
            finally:
                settle()

        response = Response(events(), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None
        return response

    def admit() -> str:
        caller = check_auth()
        ledger.check(caller)
        rate_limiter.check(caller)
        return caller

    async def chat_completions():
        caller = admit()
        body = await read_body(ChatCompletionRequest)
        prepared = prepare(model, body)
        reservation, (reply,) = start(caller, [prepared])
        usage = bool(body.stream_options and body.stream_options.include_usage)
        rendering = Rendering(reply, model.id, include_usage=usage)
        log.info("%s model=%s user=%s prompt_tokens=%d n=%d stream=%s seed=%s", rendering.id, body.model,
                 body.user, reply.prompt_tokens, prepared.params.n, bool(body.stream), reply.handle.seed)
        return await respond(reservation, [reply], rendering, bool(body.stream))

    async def completions():
        caller = admit()
        body = await read_body(CompletionRequest)
        reservation, replies = start(caller, prepare_completion(model, body))
        echoes = [p if isinstance(p, str) else model.tokenizer.decode(p) for p in body.prompts()] if body.echo else None
        usage = bool(body.stream_options and body.stream_options.include_usage)
        rendering = TextRendering(replies, model.id, echoes, include_usage=usage)
        log.info("%s model=%s user=%s prompts=%d n=%d stream=%s", rendering.id, body.model, body.user, len(replies),
                 replies[0].prepared.params.n, bool(body.stream))
        return await respond(reservation, replies, rendering, bool(body.stream))

    def as_chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
        """The chat request a responses request means; what only the chat rules refuse is refused here."""
        try:
            return body.to_chat()
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    async def responses():
        caller = admit()
        body = await read_body(ResponsesRequest)
        prepared = prepare(model, as_chat_request(body))
        reservation, (reply,) = start(caller, [prepared])
        rendering = ResponsesRendering(reply, model.id, body)
        log.info("%s model=%s user=%s prompt_tokens=%d stream=%s seed=%s", rendering.id, body.model, body.user,
                 reply.prompt_tokens, bool(body.stream), reply.handle.seed)
        return await respond(reservation, [reply], rendering, bool(body.stream))

    app.add_url_rule("/v1/chat/completions", "chat_completions", chat_completions, methods=["POST"])
    app.add_url_rule("/api/v1/chat/completions", "chat_completions_alias", chat_completions, methods=["POST"])
    app.add_url_rule("/v1/completions", "completions", completions, methods=["POST"])
    app.add_url_rule("/v1/responses", "responses", responses, methods=["POST"])
    if settings.cors_allow_origins:
        origins = "*" if "*" in settings.cors_allow_origins else list(settings.cors_allow_origins)
        app = cors(app, allow_origin=origins, allow_headers=["Authorization", "Content-Type"],
                   allow_methods=["GET", "POST", "OPTIONS"], max_age=600)
    return app
