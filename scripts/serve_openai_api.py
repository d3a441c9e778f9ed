"""An OpenAI-compatible Chat Completions server, so that the `openai` SDK, curl, Open-WebUI or FastGPT
can talk to a trained MiniMind (or to any chat model the shared loader opens).

    python scripts/serve_openai_api.py                                    # out/full_sft_512.pth on http://127.0.0.1:8998/v1
    python scripts/serve_openai_api.py --load_from out/reason_512.pth --max_concurrency 2
    python scripts/serve_openai_api.py --load_from path/to/Qwen2.5-0.5B-Instruct --host 0.0.0.0
    python scripts/chat_openai_api.py                                     # chat with it in the terminal

    curl http://127.0.0.1:8998/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"model": "minimind", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 64}'

Endpoints: POST /v1/chat/completions, GET /v1/models, and GET /health (ready, and generation counts).
The model's `<think>...</think>` text comes back as `reasoning_content`; its `<tool_call>{...}</tool_call>`
blocks come back as `tool_calls` when the request offers `tools` (model/chat_format.py reads both as the
reply streams). A conversation longer than the context loses its oldest whole turns; one whose last
turn alone does not fit is refused with a 400.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from model.chat_format import THINK_OPEN, Event, PromptTooLong, ReplyParser, fit_history, render_prompt
from model.loader import ChatStream, add_model_args, chat_stream, context_length, describe, load_from_args

log = logging.getLogger("minimind.serve")


# ---------------------------------------------------------------------------------------------
# Errors, in the OpenAI shape: {"error": {"message", "type", "param", "code"}}
# ---------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.body}, status_code=error.status)


def validation_error(exc: RequestValidationError) -> ApiError:
    """pydantic's complaint about the body, with `param` in OpenAI's `messages[0].role` form. Of the
    complaints about a value that may take several types, the one that is not "wrong type" says most."""
    errors = exc.errors()
    first = next((error for error in errors if not error["type"].endswith("_type")), errors[0])
    if first["type"] == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    param = ""
    for part in first["loc"][1:]:  # [0] is "body"
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in FIELD_NAMES:  # not the names pydantic gives the branches of a union ("str", "list[TextPart]")
            param += f".{part}" if param else part
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"Invalid value for '{param or 'body'}': {message}", param=param or None, code="invalid_value")


# ---------------------------------------------------------------------------------------------
# The request, as the Chat Completions API defines it (fields it has and we don't use are accepted)
# ---------------------------------------------------------------------------------------------

class ApiModel(BaseModel):
    # strict: "0.5" is not a number and "yes" not a boolean, as for OpenAI; unknown fields pass.
    model_config = ConfigDict(strict=True, extra="allow")


class TextPart(ApiModel):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def only_text(self) -> "TextPart":
        if self.type != "text" or self.text is None:
            raise ValueError(f"content parts of type '{self.type}' are not supported; send text")
        return self


class FunctionCall(ApiModel):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"


class ToolCall(ApiModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(ApiModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def has_content(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def for_template(self) -> dict:
        """The message as the chat template reads it: plain text, `developer` as `system`."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        return message


class FunctionDefinition(ApiModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(ApiModel):
    type: Literal["function"]
    function: FunctionDefinition


class StreamOptions(ApiModel):
    include_usage: bool = False


class ChatCompletionRequest(ApiModel):
    model: str | None = None  # one model is served; any name is answered by it
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    chat_template_kwargs: dict[str, Any] | None = None  # as vLLM: {"enable_thinking": false}
    enable_thinking: bool | None = None

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("this server returns one choice per request; n must be 1")
        return n

    def thinking(self) -> bool | None:
        """`chat_template_kwargs.enable_thinking`, else `enable_thinking`, else the template's default."""
        value = (self.chat_template_kwargs or {}).get("enable_thinking", self.enable_thinking)
        if value is not None and not isinstance(value, bool):
            raise ApiError(400, "Invalid value for 'chat_template_kwargs.enable_thinking': expected a boolean",
                           param="chat_template_kwargs.enable_thinking", code="invalid_value")
        return value


FIELD_NAMES = {name for schema in (ChatCompletionRequest, ChatMessage, TextPart, ToolCall, FunctionCall, Tool,
                                     FunctionDefinition, StreamOptions) for name in schema.model_fields}


# ---------------------------------------------------------------------------------------------
# Admission: a bounded number of generations at once, a bounded queue behind them
# ---------------------------------------------------------------------------------------------

class Admission:
    """At most `max_running` generations run at once and `max_waiting` more wait for a turn; a
    request beyond that is refused (503) at once rather than queued without bound."""

    def __init__(self, max_running: int, max_waiting: int):
        self.slots = asyncio.Semaphore(max_running)
        self.limit = max_running + max_waiting
        self.admitted = self.running = 0

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def admit(self) -> "Ticket":
        if self.admitted >= self.limit:
            raise ApiError(503, f"The server is busy ({self.running} requests generating, {self.waiting} waiting). "
                                f"Try again shortly.", type="server_error", code="server_overloaded")
        self.admitted += 1
        return Ticket(self)


class Ticket:
    """One admitted request: waiting, then running (holding a slot), then done."""

    def __init__(self, admission: Admission):
        self.admission, self.state = admission, "waiting"

    async def enter(self) -> None:
        try:
            await self.admission.slots.acquire()
        except BaseException:  # the client left while waiting
            self.leave()
            raise
        self.state = "running"
        self.admission.running += 1

    def leave(self) -> None:
        if self.state == "running":
            self.admission.running -= 1
            self.admission.slots.release()
        if self.state != "done":
            self.admission.admitted -= 1
            self.state = "done"

    def abandon(self) -> None:
        """For a response that never started: give the place back unless its generation runs."""
        if self.state == "waiting":
            self.leave()


# ---------------------------------------------------------------------------------------------
# Generation: one ChatStream per request, in its own threads, bridged to asyncio
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    """A validated request, its conversation fitted to the context."""
    messages: list[dict]
    tools: list[dict] | None
    enable_thinking: bool | None
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    starts_thinking: bool


@dataclass
class Finished:
    finish_reason: str  # "stop", "length", or "cancelled" (the client left)
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Defaults:
    """What a request that leaves a setting out gets."""
    max_tokens: int = 1024
    temperature: float = 0.85
    top_p: float = 0.85
    system_prompt: str | None = None


class ChatService:
    """The model and its tokenizer, shared read-only. Each request gets its own ChatStream (its own
    generation thread, KV cache and random generator), so no generation state is shared."""

    def __init__(self, model, tokenizer, name: str, defaults: Defaults, admission: Admission):
        self.model, self.tokenizer, self.name, self.defaults, self.admission = model, tokenizer, name, defaults, admission
        self.counts = {"finished": 0, "cancelled": 0, "completion_tokens": 0}

    def prepare(self, body: ChatCompletionRequest) -> Job:
        """The request checked against the model, and its conversation fitted to the context by
        dropping the oldest whole turns. Raises ApiError (400)."""
        max_new_tokens = body.max_completion_tokens or body.max_tokens or self.defaults.max_tokens
        context = context_length(self.model)
        if max_new_tokens >= context:
            raise ApiError(400, f"max_tokens ({max_new_tokens}) leaves no room for a prompt in this model's "
                                f"{context}-token context", param="max_tokens", code="invalid_value")
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools and body.tool_choice != "none" else None
        enable_thinking = body.thinking()
        messages = [message.for_template() for message in body.messages]
        if self.defaults.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.defaults.system_prompt})
        try:
            fitted = fit_history(self.tokenizer, messages, context - max_new_tokens, enable_thinking=enable_thinking, tools=tools)
        except PromptTooLong as error:
            raise ApiError(400, f"This model's maximum context length is {context} tokens and max_tokens is "
                                f"{max_new_tokens}: {error}. Shorten the last message or lower max_tokens.",
                           param="messages", code="context_length_exceeded") from None
        if len(fitted) < len(messages):
            log.info("dropped the oldest %d of %d messages to fit the context", len(messages) - len(fitted), len(messages))
        prompt = render_prompt(self.tokenizer, fitted, enable_thinking=enable_thinking, tools=tools)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return Job(messages=fitted, tools=tools, enable_thinking=enable_thinking, max_new_tokens=max_new_tokens,
                   temperature=self.defaults.temperature if body.temperature is None else body.temperature,
                   top_p=self.defaults.top_p if body.top_p is None else body.top_p, seed=body.seed,
                   stop=[text for text in stop if text],
                   starts_thinking=prompt.rstrip().endswith(THINK_OPEN))  # templates that open the think block themselves

    async def reply(self, job: Job, ticket: Ticket, request: Request) -> AsyncIterator[Event | Finished]:
        """The reply's events, then Finished. Waits for a slot first. Generation and parsing run in
        threads; the client leaving (a cancelled response, or a disconnect seen between events)
        cancels the generation, which frees the slot when it has stopped."""
        await ticket.enter()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            stream = chat_stream(self.model, self.tokenizer, job.messages, max_new_tokens=job.max_new_tokens,
                                 temperature=job.temperature, top_p=job.top_p, enable_thinking=job.enable_thinking,
                                 tools=job.tools, seed=job.seed, stop=job.stop)
            worker = threading.Thread(target=self._generate, args=(stream, job, ticket, loop, queue), daemon=True)
            worker.start()
        except BaseException:
            ticket.leave()
            raise
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished) or await request.is_disconnected():
                    return
        finally:
            stream.cancel()  # no-op when it has finished

    def _generate(self, stream: ChatStream, job: Job, ticket: Ticket, loop: asyncio.AbstractEventLoop,
                  queue: asyncio.Queue) -> None:
        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the server is shutting down
                stream.cancel()

        start = time.perf_counter()
        parser = ReplyParser(parse_tools=job.tools is not None, starts_thinking=job.starts_thinking)
        try:
            with stream:
                for piece in stream:
                    for event in parser.feed(piece):
                        put(event)
            for event in parser.finish():
                put(event)
            put(Finished(stream.finish_reason, stream.prompt_tokens, stream.completion_tokens))
        except BaseException as error:
            put(error)
        finally:
            seconds = time.perf_counter() - start
            try:
                loop.call_soon_threadsafe(self._done, stream, ticket, seconds)
            except RuntimeError:
                pass

    def _done(self, stream: ChatStream, ticket: Ticket, seconds: float) -> None:
        """On the event loop, once a generation has stopped: free its slot and count it."""
        ticket.leave()
        self.counts["cancelled" if stream.finish_reason == "cancelled" else "finished"] += 1
        self.counts["completion_tokens"] += stream.completion_tokens
        log.info("%d prompt + %d completion tokens, %s, %.1f tokens/s", stream.prompt_tokens, stream.completion_tokens,
                 stream.finish_reason, stream.completion_tokens / max(seconds, 1e-9))

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, "running": self.admission.running,
                "waiting": self.admission.waiting, **self.counts}


# ---------------------------------------------------------------------------------------------
# Responses: a whole chat.completion, or chat.completion.chunk events
# ---------------------------------------------------------------------------------------------

def finish_reason(finished: Finished, tool_calls: bool) -> str:
    return "tool_calls" if tool_calls and finished.finish_reason == "stop" else finished.finish_reason


async def complete(service: ChatService, job: Job, ticket: Ticket, request: Request, reply_id: str, created: int) -> Response:
    texts: dict[str, list[str]] = {"content": [], "reasoning": []}
    tool_calls: list[dict] = []
    finished = None
    async with aclosing(service.reply(job, ticket, request)) as events:
        async for event in events:
            if isinstance(event, Finished):
                finished = event
            elif event[0] == "tool_call":
                tool_calls.append(event[1])
            else:
                texts[event[0]].append(event[1])
    if finished is None:  # the client left: nobody reads this
        return Response(status_code=499)
    content = "".join(texts["content"])
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if tool_calls else "")}
    if texts["reasoning"]:
        message["reasoning_content"] = "".join(texts["reasoning"])
    if tool_calls:
        message["tool_calls"] = tool_calls
    return JSONResponse({
        "id": reply_id, "object": "chat.completion", "created": created, "model": service.name,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(finished, bool(tool_calls))}],
        "usage": finished.usage()})


async def stream_chunks(service: ChatService, job: Job, ticket: Ticket, request: Request, reply_id: str, created: int,
                        include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the role first, then the reply as deltas, a last chunk with the
    finish_reason, the usage chunk (when asked for), and `data: [DONE]`."""
    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": service.name,
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    tool_calls = 0
    try:
        async with aclosing(service.reply(job, ticket, request)) as events:
            async for event in events:
                if isinstance(event, Finished):
                    yield chunk({}, finish_reason(event, tool_calls > 0))
                    if include_usage:
                        yield chunk(None, usage=event.usage())
                elif event[0] == "tool_call":
                    yield chunk({"tool_calls": [{"index": tool_calls, **event[1]}]})
                    tool_calls += 1
                else:
                    yield chunk({"content" if event[0] == "content" else "reasoning_content": event[1]})
    except Exception as error:  # the status line is sent: report it in the stream, as OpenAI does
        log.exception("generation failed")
        yield f"data: {json.dumps({'error': ApiError(500, str(error), type='server_error').body}, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

def create_app(service: ChatService) -> FastAPI:
    app = FastAPI(title="MiniMind OpenAI-compatible API")
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": started, "owned_by": "minimind"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        job = await asyncio.to_thread(service.prepare, body)  # rendering long conversations takes a moment
        ticket = service.admission.admit()
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            try:
                return await complete(service, job, ticket, request, reply_id, created)
            finally:
                ticket.abandon()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def abandon() -> None:  # async: runs on the event loop, which owns the admission counts
            ticket.abandon()

        return StreamingResponse(stream_chunks(service, job, ticket, request, reply_id, created, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(abandon))

    return app


def served_name(model) -> str:
    """`full_sft_512` for out/full_sft_512.pth, the directory's name for an HF directory."""
    path = Path(str(model.name_or_path))
    return path.stem if path.suffix == ".pth" else path.name or "minimind"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8998, help="(default: 8998)")
    server.add_argument("--served_model_name", default=None,
                        help="the model id in /v1/models and in replies (default: the weight file or directory name)")
    server.add_argument("--max_concurrency", type=int, default=4, help="generations running at once (default: 4)")
    server.add_argument("--max_queue", type=int, default=64,
                        help="requests waiting for a turn; beyond that the server answers 503 (default: 64)")
    defaults = parser.add_argument_group("defaults for requests that leave these out")
    defaults.add_argument("--max_tokens", type=int, default=Defaults.max_tokens, help=f"(default: {Defaults.max_tokens})")
    defaults.add_argument("--temperature", type=float, default=Defaults.temperature, help=f"0 = greedy (default: {Defaults.temperature})")
    defaults.add_argument("--top_p", type=float, default=Defaults.top_p, help=f"(default: {Defaults.top_p})")
    args = parser.parse_args(argv)
    if args.max_concurrency < 1 or args.max_queue < 0:
        parser.error("--max_concurrency must be at least 1 and --max_queue at least 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer = load_from_args(args)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    log.info("loaded %s", describe(model))
    service = ChatService(model, tokenizer, args.served_model_name or served_name(model),
                          Defaults(args.max_tokens, args.temperature, args.top_p, args.system_prompt),
                          Admission(args.max_concurrency, args.max_queue))
    log.info("serving '%s' on http://%s:%d/v1 (%d at once, %d waiting)", service.name, args.host, args.port,
             args.max_concurrency, args.max_queue)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
