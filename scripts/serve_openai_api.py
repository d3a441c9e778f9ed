"""An OpenAI-compatible Chat Completions server, so that the `openai` SDK, curl, Open-WebUI or FastGPT
can talk to a trained MiniMind (or to any chat model the shared loader opens).

    python scripts/serve_openai_api.py                                    # out/full_sft_512.pth on http://127.0.0.1:8998/v1
    python scripts/serve_openai_api.py --load_from out/reason_512.pth --max_batch_size 32
    python scripts/serve_openai_api.py --load_from path/to/Qwen2.5-0.5B-Instruct --host 0.0.0.0
    python scripts/chat_openai_api.py                                     # chat with it in the terminal

    curl http://127.0.0.1:8998/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"model": "minimind", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 64}'

Endpoints: POST /v1/chat/completions, GET /v1/models, and GET /health (ready, and generation counts).
The model's `<think>...</think>` text comes back as `reasoning_content`; its `<tool_call>{...}</tool_call>`
blocks come back as `tool_calls` when the request offers `tools` (model/chat_format.py reads both as the
reply streams). A conversation longer than the context loses its oldest whole turns; one whose last
turn alone does not fit is refused with a 400.

How much of the history goes into the prompt is `--history_mode` (model/chat_format.py's `fit_history`),
or the request's own `"history_mode"` (an extension, like `chat_template_kwargs`): `full` (every turn that
fits), `query_utterance` (the earlier user messages most relevant to the last one, one per line before it
in its message) or `none` (the system prompt and the last turn). An unknown value is a 400 naming the field.
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
from collections import deque
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from model.chat_format import (DEFAULT_HISTORY_UTTERANCES, HISTORY_MODES, THINK_OPEN, Event, PromptTooLong, ReplyParser,
                               fit_history, render_prompt)
from model.cli import add_history_args, add_sampling_args
from model.generate import Decoder, Sequence
from model.loader import add_model_args, chat_sequence, context_length, describe, load_from_args

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

def holds_lone_surrogate(value: Any) -> bool:
    """Whether a JSON value holds a lone UTF-16 surrogate ("\\ud800"): valid JSON, but not text, so
    no tokenizer can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(holds_lone_surrogate(key) or holds_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return any(holds_lone_surrogate(item) for item in value)
    return False


class ApiModel(BaseModel):
    # strict: "0.5" is not a number and "yes" not a boolean, as for OpenAI; unknown fields pass.
    model_config = ConfigDict(strict=True, extra="allow")

    @field_validator("*")
    @classmethod
    def text_is_text(cls, value: Any) -> Any:
        if holds_lone_surrogate(value):
            raise ValueError("the text holds a lone UTF-16 surrogate, which is not a character")
        return value


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
    history_mode: Literal[HISTORY_MODES] | None = None  # ours: how much of the history to send (None = the server's default)

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
# Generation: one scheduler thread owns the model and decodes every running request in one batch
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    """A validated request, its conversation fitted to the context and rendered to token ids."""
    prompt_ids: list[int]
    tools: list[dict] | None
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


@dataclass(eq=False)
class Reply:
    """An admitted request as the scheduler and its HTTP response share it: the scheduler puts text
    pieces on `queue`, then Finished (or the exception that stopped it); the response sets
    `cancelled` when its client leaves."""
    sequence: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            self.cancelled = True


class Scheduler:
    """Continuous batching: the one owner of the model. Each turn of its loop, requests whose client
    left give up their slot; waiting requests take the free slots and are prefilled together in one
    forward pass; then one forward pass decodes one token for every running request, and each
    request's new text goes to its queue. A request therefore joins the batch one step after it
    arrives and leaves it the step it ends, instead of waiting for a whole batch to finish.

    At most `max_batch_size` requests run and `max_waiting` more wait; `submit` refuses beyond that
    (429). The KV cache is allocated once, `max_batch_size` x `capacity` tokens."""

    def __init__(self, model, max_batch_size: int, max_waiting: int, capacity: int):
        self.decoder = Decoder(model, slots=max_batch_size, capacity=capacity)
        self.max_waiting = max_waiting
        self.waiting: deque[Reply] = deque()
        self.active: list[Reply] = []  # prefilled: running, or ended and not yet published
        self.admitted = 0
        self.counts = {"finished": 0, "cancelled": 0, "completion_tokens": 0}
        self.wake = threading.Condition()
        threading.Thread(target=self._run, name="scheduler", daemon=True).start()

    def submit(self, sequence: Sequence) -> Reply:
        """Queue `sequence` for the next turn (from the event loop)."""
        with self.wake:
            if self.admitted >= self.decoder.slots + self.max_waiting:
                raise ApiError(429, f"The server is busy ({len(self.decoder.running)} requests generating, "
                                    f"{len(self.waiting)} waiting). Try again shortly.",
                               type="server_error", code="server_overloaded")
            reply = Reply(sequence, asyncio.get_running_loop())
            self.admitted += 1
            self.waiting.append(reply)
            self.wake.notify()
        return reply

    def cancel(self, reply: Reply) -> None:
        """The client left: its slot is freed before the next step (a no-op once it has ended)."""
        with self.wake:
            reply.cancelled = True
            self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.active:
                    self.wake.wait()
                for reply in [r for r in self.waiting if r.cancelled]:
                    self.waiting.remove(reply)
                    self._retire(reply, "cancelled")
                joining = [self.waiting.popleft() for _ in range(min(self.decoder.free_slots, len(self.waiting)))]
            for reply in [r for r in self.active if r.cancelled]:
                self.decoder.finish(reply.sequence)
            try:
                self.active += joining
                self.decoder.add([reply.sequence for reply in joining])
                self._publish()
                self.decoder.step()
                self._publish()
            except Exception as error:  # every request of the batch gets it; the model stays usable
                log.exception("generation failed")
                for reply in self.active:
                    self.decoder.finish(reply.sequence)
                    reply.put(error)
                    self._retire(reply, None)
                self.active = []

    def _publish(self) -> None:
        """Hand each active request its new text; those that ended get Finished and leave."""
        still_active = []
        for reply in self.active:
            sequence = reply.sequence
            piece = sequence.text.take()
            if piece:
                reply.put(piece)
            if sequence.finish_reason is None:
                still_active.append(reply)
                continue
            reply.put(Finished(sequence.finish_reason, len(sequence.prompt), len(sequence.completion)))
            self._retire(reply, sequence.finish_reason)
        self.active = still_active

    def _retire(self, reply: Reply, reason: str | None) -> None:
        with self.wake:
            self.admitted -= 1
        if reason is None:
            return
        tokens, seconds = len(reply.sequence.completion), time.perf_counter() - reply.started
        self.counts["cancelled" if reason == "cancelled" else "finished"] += 1
        self.counts["completion_tokens"] += tokens
        log.info("%d prompt + %d completion tokens, %s, %.1f tokens/s", len(reply.sequence.prompt), tokens, reason,
                 tokens / max(seconds, 1e-9))

    def health(self) -> dict:
        return {"running": len(self.decoder.running), "waiting": len(self.waiting),
                "free_slots": self.decoder.free_slots, "max_batch_size": self.decoder.slots, **self.counts}


@dataclass
class Defaults:
    """What a request that leaves a setting out gets."""
    max_tokens: int = 1024
    temperature: float = 0.85
    top_p: float = 0.85
    system_prompt: str | None = None
    history_mode: str = "full"
    history_utterances: int = DEFAULT_HISTORY_UTTERANCES


class ChatService:
    """Checks requests against the model and streams their replies from the scheduler."""

    def __init__(self, model, tokenizer, name: str, defaults: Defaults, max_batch_size: int = 16,
                 max_waiting: int = 64, max_model_len: int = 4096):
        self.model, self.tokenizer, self.name, self.defaults = model, tokenizer, name, defaults
        self.context = min(context_length(model), max_model_len)
        self.scheduler = Scheduler(model, max_batch_size, max_waiting, self.context)

    def prepare(self, body: ChatCompletionRequest) -> Job:
        """The request checked against the model, and its history chosen as its `history_mode` says
        (else the server's) and fitted to the context, the oldest going first. Raises ApiError (400)."""
        max_new_tokens = body.max_completion_tokens or body.max_tokens or self.defaults.max_tokens
        if max_new_tokens >= self.context:
            raise ApiError(400, f"max_tokens ({max_new_tokens}) leaves no room for a prompt in this server's "
                                f"{self.context}-token context", param="max_tokens", code="invalid_value")
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools and body.tool_choice != "none" else None
        enable_thinking = body.thinking()
        messages = [message.for_template() for message in body.messages]
        if self.defaults.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.defaults.system_prompt})
        history_mode = body.history_mode or self.defaults.history_mode
        try:
            fitted = fit_history(self.tokenizer, messages, self.context - max_new_tokens, enable_thinking=enable_thinking,
                                 tools=tools, history_mode=history_mode,
                                 history_utterances=self.defaults.history_utterances)
            prompt = render_prompt(self.tokenizer, fitted, enable_thinking=enable_thinking, tools=tools)
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        except PromptTooLong as error:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens and max_tokens is "
                                f"{max_new_tokens}: {error}. Shorten the last message or lower max_tokens.",
                           param="messages", code="context_length_exceeded") from None
        except Exception as error:  # anything the chat template or the tokenizer cannot take is the request's fault
            param = "tools" if tools else "messages"
            raise ApiError(400, f"Invalid value for '{param}': the chat template or tokenizer cannot take it "
                                f"({type(error).__name__}: {error})", param=param, code="invalid_value") from None
        if len(fitted) < len(messages):
            log.info("history_mode %s: %d of %d messages sent", history_mode, len(fitted), len(messages))
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return Job(prompt_ids=ids, tools=tools, max_new_tokens=max_new_tokens,
                   temperature=self.defaults.temperature if body.temperature is None else body.temperature,
                   top_p=self.defaults.top_p if body.top_p is None else body.top_p, seed=body.seed,
                   stop=[text for text in stop if text],
                   starts_thinking=prompt.rstrip().endswith(THINK_OPEN))  # templates that open the think block themselves

    def submit(self, job: Job) -> Reply:
        return self.scheduler.submit(chat_sequence(
            self.model, self.tokenizer, job.prompt_ids, max_new_tokens=job.max_new_tokens, temperature=job.temperature,
            top_p=job.top_p, seed=job.seed, stop=job.stop))

    async def events(self, job: Job, reply: Reply, request: Request) -> AsyncIterator[Event | Finished]:
        """The reply's parsed events (model/chat_format.py reads <think> and <tool_call>), then
        Finished. The client leaving (a cancelled response, or a disconnect seen between events)
        frees the request's slot before the scheduler's next step."""
        parser = ReplyParser(parse_tools=job.tools is not None, starts_thinking=job.starts_thinking)
        try:
            while True:
                item = await reply.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Finished):
                    for event in parser.finish():
                        yield event
                    yield item
                    return
                for event in parser.feed(item):
                    yield event
                if await request.is_disconnected():
                    return
        finally:
            self.scheduler.cancel(reply)

    def health(self) -> dict:
        return {"status": "ok", "model": self.name, **self.scheduler.health()}


# ---------------------------------------------------------------------------------------------
# Responses: a whole chat.completion, or chat.completion.chunk events
# ---------------------------------------------------------------------------------------------

def finish_reason(finished: Finished, tool_calls: bool) -> str:
    return "tool_calls" if tool_calls and finished.finish_reason == "stop" else finished.finish_reason


async def complete(service: ChatService, job: Job, reply: Reply, request: Request, reply_id: str, created: int) -> Response:
    texts: dict[str, list[str]] = {"content": [], "reasoning": []}
    tool_calls: list[dict] = []
    finished = None
    async with aclosing(service.events(job, reply, request)) as events:
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


async def stream_chunks(service: ChatService, job: Job, reply: Reply, request: Request, reply_id: str, created: int,
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
        async with aclosing(service.events(job, reply, request)) as events:
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
        reply = service.submit(job)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            try:
                return await complete(service, job, reply, request, reply_id, created)
            finally:
                service.scheduler.cancel(reply)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def cancel() -> None:  # for a response that never started; a no-op once the reply ended
            service.scheduler.cancel(reply)

        return StreamingResponse(stream_chunks(service, job, reply, request, reply_id, created, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(cancel))

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
    server.add_argument("--max_batch_size", type=int, default=16,
                        help="requests decoded together, each step one forward pass for all (default: 16)")
    server.add_argument("--max_queue", type=int, default=64,
                        help="requests waiting for a slot; beyond that the server answers 429 (default: 64)")
    server.add_argument("--max_model_len", type=int, default=4096,
                        help="tokens per request, prompt + reply (at most the model's context); with "
                             "--max_batch_size it bounds the KV cache (default: 4096)")
    defaults = parser.add_argument_group("defaults for requests that leave these out")
    add_sampling_args(defaults, max_new_tokens=Defaults.max_tokens, temperature=Defaults.temperature, top_p=Defaults.top_p)
    add_history_args(defaults, full="every past turn that fits the context", none="the system prompt and the last turn",
                     default=Defaults.history_mode)
    args = parser.parse_args(argv)
    if args.max_batch_size < 1 or args.max_queue < 0 or args.max_model_len < 2:
        parser.error("--max_batch_size must be at least 1, --max_queue at least 0, --max_model_len at least 2")
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
                          Defaults(args.max_new_tokens, args.temperature, args.top_p, args.system_prompt, args.history_mode,
                                   args.history_utterances),
                          args.max_batch_size, args.max_queue, args.max_model_len)
    cache = service.scheduler.decoder.cache
    log.info("KV cache: %d slots x %d tokens = %.1f MiB (--max_batch_size x --max_model_len)", args.max_batch_size,
             cache.capacity, cache.nbytes / 2**20)
    log.info("serving '%s' on http://%s:%d/v1 (%d at once, %d waiting)", service.name, args.host, args.port,
             args.max_batch_size, args.max_queue)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
