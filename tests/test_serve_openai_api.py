"""scripts/serve_openai_api.py, driven as a user drives it: real uvicorn processes on free ports,
asked with the official `openai` client (and curl). Three models are served: a random tiny MiniMind
(.pth + sidecar), a tiny MiniMind trained here to answer one question with a think block and a tool
call (HF directory), and a random tiny Qwen2 with the bundled tokenizer (any transformers chat model).
Answers are checked against transformers' own `generate` and the tokenizer's own counts."""
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from model.chat_format import render_prompt
from model.loader import load_model_and_tokenizer
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from scripts import chat_openai_api, serve_openai_api
from conftest import save_tiny_qwen2
from model.weights import save_weights

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE = REPO_ROOT / "scripts" / "serve_openai_api.py"
CHAT = REPO_ROOT / "scripts" / "chat_openai_api.py"
QUESTION = [{"role": "user", "content": "你好，请介绍一下你自己。"}]

# What the scripted model was trained to answer to exactly this question with these tools.
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
WEATHER_QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER_REPLY = ('<think>\nI call the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                 '\n</tool_call>')


# --- models and servers -------------------------------------------------------------------------

@contextmanager
def one_torch_thread():
    """Training beside three server processes on a small machine: one thread each beats contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_random_minimind(directory: Path) -> Path:
    """A random tiny MiniMind as the trainers save it. Wider initial weights than usual, so that
    greedy decoding writes varied text rather than one token over and over."""
    torch.manual_seed(0)
    path = directory / "full_sft_64.pth"
    save_weights(MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"], initializer_range=0.2)), path)
    return path


def train_scripted_minimind(directory: Path, tokenizer) -> Path:
    """A tiny MiniMind that has learnt one reply by heart: trained until greedy decoding of the
    weather question (with the weather tool) gives WEATHER_REPLY and then the end of the turn."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**PRESETS["tiny"]))
    prompt = tokenizer(render_prompt(tokenizer, WEATHER_QUESTION, tools=WEATHER_TOOLS), add_special_tokens=False).input_ids
    reply = tokenizer(WEATHER_REPLY + tokenizer.eos_token, add_special_tokens=False).input_ids
    input_ids, target = torch.tensor([prompt + reply]), torch.tensor(reply)
    labels = torch.tensor([[-100] * len(prompt) + reply])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with one_torch_thread():
        for _ in range(400):
            output = model(input_ids=input_ids, labels=labels)
            if output.loss.item() < 0.05 and bool((output.logits[0, len(prompt) - 1:-1].argmax(-1) == target).all()):
                break
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
        else:
            raise AssertionError(f"the scripted model did not learn its reply (loss {output.loss.item():.3f})")
    path = directory / "scripted-minimind"
    model.eval().save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python scripts/serve_openai_api.py --load_from ...` in a process of its own."""

    def __init__(self, load_from: Path, *flags: str):
        self.port = free_port()
        self.log = load_from.parent / f"{load_from.name}.log"
        self.process = subprocess.Popen(
            [sys.executable, str(SERVE), "--load_from", str(load_from), "--device", "cpu", "--port", str(self.port), *flags],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"

    def ready(self, timeout: float = 180) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start in {timeout} s:\n{self.log.read_text()}")

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
            return json.load(response)

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key="unused", max_retries=0)

    def post(self, body: bytes | dict) -> tuple[int, dict]:
        """A raw POST to /v1/chat/completions: the status and the JSON body."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "model")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("served")
    return {"random": save_random_minimind(directory), "qwen2": save_tiny_qwen2(directory / "tiny-qwen2")}


@pytest.fixture(scope="module")
def servers(models, tokenizer):
    """All three servers start at once (they load while the scripted model trains here)."""
    started = {"random": Server(models["random"], "--max_batch_size", "16", "--max_queue", "64"),
               "one_slot": Server(models["random"], "--max_batch_size", "1", "--max_queue", "1"),
               "qwen2": Server(models["qwen2"])}
    try:
        started["scripted"] = Server(train_scripted_minimind(models["random"].parent, tokenizer))
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def random_server(servers) -> Server:
    return servers["random"].ready()


@pytest.fixture(scope="module")
def one_slot_server(servers) -> Server:
    return servers["one_slot"].ready()


@pytest.fixture(scope="module")
def scripted_server(servers) -> Server:
    return servers["scripted"].ready()


@pytest.fixture(scope="module")
def qwen2_server(servers) -> Server:
    return servers["qwen2"].ready()


@pytest.fixture(scope="module")
def reference(models):
    """The served .pth, loaded here: transformers' generate on it is what the server must answer."""
    model, _ = load_model_and_tokenizer(str(models["random"]), device="cpu")
    return model


def greedy(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[str, list[int]]:
    """transformers' greedy answer: its text and its token ids (the end-of-turn token left out)."""
    ids = tokenizer(render_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False).input_ids
    with one_torch_thread():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    generated = [token for token in output[0, ids.shape[1]:].tolist() if token != tokenizer.eos_token_id]
    return tokenizer.decode(generated, skip_special_tokens=True), generated


def prompt_tokens(tokenizer, messages: list[dict], **template) -> int:
    return len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template),
                         add_special_tokens=False).input_ids)


# --- answers ------------------------------------------------------------------------------------

def test_models_lists_the_served_model(random_server):
    assert [model.id for model in random_server.client().models.list().data] == ["full_sft_64"]


def test_answer_is_transformers_greedy_answer_with_its_token_counts(random_server, reference, tokenizer):
    reply = random_server.client().chat.completions.create(model="minimind", messages=QUESTION, max_tokens=24, temperature=0)
    text, ids = greedy(reference, tokenizer, QUESTION, 24)
    assert len(ids) == 24  # the random model does not end its turn this early
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == prompt_tokens(tokenizer, QUESTION)
    assert reply.usage.completion_tokens == 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "full_sft_64"
    assert abs(reply.created - time.time()) < 600
    newer_name = random_server.client().chat.completions.create(model="m", messages=QUESTION, max_completion_tokens=5, temperature=0)
    assert newer_name.usage.completion_tokens == 5 and newer_name.choices[0].finish_reason == "length"


def test_stream_gives_the_same_answer_in_chunks_of_one_id(random_server):
    client = random_server.client()
    whole = client.chat.completions.create(model="minimind", messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="minimind", messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({chunk.id for chunk in chunks}) == 1 and all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1]) == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])
    plain = list(client.chat.completions.create(model="minimind", messages=QUESTION, max_tokens=4, temperature=0, stream=True))
    assert plain[-1].choices[0].finish_reason == "length"  # no usage chunk unless asked for


def test_stop_strings_end_the_answer_before_them(random_server):
    client = random_server.client()
    full = client.chat.completions.create(model="minimind", messages=QUESTION, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    cut = next(k for k in range(len(text) // 2, len(text) - 2) if text.find(text[k:k + 2]) == k and text[k:k + 2].strip())
    for stop in (text[cut:cut + 2], ["never appears", text[cut:cut + 2]]):
        reply = client.chat.completions.create(model="minimind", messages=QUESTION, max_tokens=24, temperature=0, stop=stop)
        assert reply.choices[0].message.content == text[:cut]
        assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 24
    streamed = client.chat.completions.create(model="minimind", messages=QUESTION, max_tokens=24, temperature=0,
                                              stop=text[cut:cut + 2], stream=True)
    chunks = list(streamed)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_each_get_their_own_answer(random_server):
    """Greedy streams equal the answer each prompt gets alone; seeded sampled streams repeat one
    another although unseeded sampling runs beside them (no shared generator, cache or state)."""
    prompts = [[{"role": "user", "content": f"问题 {i}: {topic}"}] for i, topic in enumerate(["猫", "天空", "数学", "旅行"])]
    client = random_server.client()
    alone = [client.chat.completions.create(model="m", messages=p, max_tokens=12, temperature=0).choices[0].message.content
             for p in prompts]
    seeded = dict(temperature=1.0, top_p=1.0, seed=11)
    alone_seeded = client.chat.completions.create(model="m", messages=prompts[0], max_tokens=12, **seeded).choices[0].message.content
    requests = [(p, {"temperature": 0}) for p in prompts for _ in range(2)] + [(prompts[0], seeded)] * 4 \
        + [(p, {"temperature": 1.0}) for p in prompts]

    async def stream(async_client, messages, settings) -> tuple[set, str, str]:
        chunks = [chunk async for chunk in await async_client.chat.completions.create(
            model="m", messages=messages, max_tokens=12, stream=True, **settings)]
        return ({chunk.id for chunk in chunks}, "".join(chunk.choices[0].delta.content or "" for chunk in chunks),
                chunks[-1].choices[0].finish_reason)

    async def all_at_once():
        async with AsyncOpenAI(base_url=random_server.base_url, api_key="unused", max_retries=0) as async_client:
            return await asyncio.gather(*(stream(async_client, m, s) for m, s in requests))

    results = asyncio.run(all_at_once())
    assert len(results) == 16 and all(len(ids) == 1 for ids, _, _ in results)
    assert len({next(iter(ids)) for ids, _, _ in results}) == 16
    assert all(finish == "length" for _, _, finish in results)
    assert [text for _, text, _ in results[:8]] == [answer for answer in alone for _ in range(2)]
    assert [text for _, text, _ in results[8:12]] == [alone_seeded] * 4
    assert random_server.health()["running"] == 0


def test_a_client_that_leaves_mid_stream_stops_its_generation(random_server):
    """The server counts a generation as cancelled only when it ended before max_tokens and
    without the end-of-turn token, i.e. when the disconnect stopped it."""
    before = random_server.health()
    with random_server.client().chat.completions.create(model="m", messages=QUESTION, max_tokens=2000, temperature=0,
                                                        stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break
    deadline = time.monotonic() + 30
    while (health := random_server.health())["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health["cancelled"] == before["cancelled"] + 1 and health["finished"] == before["finished"]
    assert health["completion_tokens"] - before["completion_tokens"] < 2000
    assert health["running"] == 0


def test_a_client_that_leaves_frees_its_slot_for_the_next_request(one_slot_server):
    """One slot and one place in the queue: a third request is refused (429) while the first runs
    and the second waits; the first client leaving lets the second start at once."""
    client = one_slot_server.client()
    with client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2000, temperature=0, stream=True) as first:
        next(iter(first))
        waiting = AsyncOpenAI(base_url=one_slot_server.base_url, api_key="unused", max_retries=0)

        async def second_and_third() -> tuple[float, int]:
            second = asyncio.create_task(waiting.chat.completions.create(model="m", messages=QUESTION, max_tokens=4,
                                                                         temperature=0))
            while one_slot_server.health()["waiting"] == 0:
                await asyncio.sleep(0.05)
            with pytest.raises(openai.RateLimitError) as refused:
                await waiting.chat.completions.create(model="m", messages=QUESTION, max_tokens=4, temperature=0)
            await asyncio.sleep(1.0)
            assert not second.done()  # it waits for the one slot
            first.close()
            left = time.monotonic()
            reply = await second
            return time.monotonic() - left, refused.value.status_code, reply.usage.completion_tokens

        seconds, status, tokens = asyncio.run(second_and_third())
    assert status == 429 and tokens == 4
    assert seconds < 5  # the 2000-token first reply would take far longer
    health = one_slot_server.health()
    assert (health["running"], health["waiting"], health["free_slots"]) == (0, 0, 1)


def test_64_requests_with_random_disconnects_leak_no_slot(random_server, reference, tokenizer):
    """Half the clients leave after a random number of chunks; afterwards every slot is free, every
    request was counted once, and a greedy answer is still transformers' answer."""
    rng = random.Random(0)
    before = random_server.health()
    plans = [(rng.randint(4, 40), rng.choice([None, 0, 1, 3, 8])) for _ in range(64)]

    async def one(async_client, max_tokens: int, leave_after: int | None) -> None:
        stream = await async_client.chat.completions.create(model="m", messages=QUESTION, max_tokens=max_tokens,
                                                            temperature=1.0, stream=True)
        async with stream:
            chunks = 0
            async for _ in stream:
                chunks += 1
                if leave_after is not None and chunks > leave_after:
                    break

    async def all_at_once():
        async with AsyncOpenAI(base_url=random_server.base_url, api_key="unused", max_retries=0) as async_client:
            await asyncio.gather(*(one(async_client, *plan) for plan in plans))

    asyncio.run(all_at_once())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = random_server.health()
        counted = health["finished"] + health["cancelled"] - before["finished"] - before["cancelled"]
        if counted == 64 and health["running"] == 0:
            break
        time.sleep(0.1)
    assert counted == 64 and (health["running"], health["waiting"], health["free_slots"]) == (0, 0, 16)
    assert health["cancelled"] > before["cancelled"]
    reply = random_server.client().chat.completions.create(model="m", messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == greedy(reference, tokenizer, QUESTION, 12)[0]


# --- the context --------------------------------------------------------------------------------

def test_long_conversations_lose_whole_old_turns(random_server, tokenizer):
    """The tiny model has 2048 positions: twelve ~280-token turns do not fit, so the oldest whole
    turns go and the prompt is exactly system + the last k turns + the question."""
    turns = [[{"role": "user", "content": f"第{i}个问题：" + "天空为什么是蓝色的？" * 25},
              {"role": "assistant", "content": f"第{i}个回答：" + "因为瑞利散射。" * 30}] for i in range(12)]
    question = [{"role": "user", "content": "最后一个问题？"}]
    messages = [message for turn in turns for message in turn] + question
    reply = random_server.client().chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    kept = {prompt_tokens(tokenizer, [m for turn in turns[k:] for m in turn] + question): 12 - k for k in range(13)}
    assert reply.usage.prompt_tokens in kept and 0 < kept[reply.usage.prompt_tokens] < 12
    assert reply.usage.prompt_tokens + 8 <= 2048


def test_a_last_turn_longer_than_the_context_is_refused(random_server):
    status, body = random_server.post({"messages": [{"role": "user", "content": "apple banana cherry " * 1000}],
                                       "max_tokens": 8})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "messages"
    assert "2048" in body["error"]["message"]
    status, body = random_server.post({"messages": QUESTION, "max_tokens": 4096})
    assert status == 400 and body["error"]["param"] == "max_tokens"


# The booking dialogue: the query shares no term with the history, so pairing keeps both user utterances.
BOOKING = [{"role": "user", "content": "我想订一张去上海的机票。"}, {"role": "assistant", "content": "好的，请告诉我出发地和日期。"},
           {"role": "user", "content": "从北京出发，明天。"}, {"role": "user", "content": "多少钱？"}]
BOOKING_PAIRED = [{"role": "user", "content": "我想订一张去上海的机票。\n从北京出发，明天。\n多少钱？"}]


def test_the_history_mode_field_chooses_what_history_is_sent(random_server, tokenizer):
    def sent_tokens(**extra) -> int:
        status, body = random_server.post({"messages": BOOKING, "max_tokens": 1, **extra})
        assert status == 200, body
        return body["usage"]["prompt_tokens"]

    assert sent_tokens() == sent_tokens(history_mode="full") == prompt_tokens(tokenizer, BOOKING)
    assert sent_tokens(history_mode="query_utterance") == prompt_tokens(tokenizer, BOOKING_PAIRED)
    assert sent_tokens(history_mode="none") == prompt_tokens(tokenizer, BOOKING[-1:])
    status, body = random_server.post({"messages": BOOKING, "history_mode": "recent"})
    assert status == 400 and body["error"]["param"] == "history_mode" and "'history_mode'" in body["error"]["message"]


def test_the_servers_history_mode_is_the_default_a_request_overrides(models, tokenizer):
    server = Server(models["random"], "--history_mode", "query_utterance")
    try:
        server.ready()
        paired = server.client().chat.completions.create(model="m", messages=BOOKING, max_tokens=1)
        assert paired.usage.prompt_tokens == prompt_tokens(tokenizer, BOOKING_PAIRED)
        full = server.client().chat.completions.create(model="m", messages=BOOKING, max_tokens=1,
                                                       extra_body={"history_mode": "full"})
        assert full.usage.prompt_tokens == prompt_tokens(tokenizer, BOOKING)
    finally:
        server.stop()


# --- bad requests -------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": QUESTION, "max_tokens": -1}, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": "12"}, "max_tokens"),
    ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
    ({"messages": QUESTION, "stream": "yes"}, "stream"),
    ({"messages": QUESTION, "stop": 7}, "stop"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "history_mode": "recent"}, "history_mode"),
    # a lone UTF-16 surrogate is valid JSON but no text a tokenizer can encode
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0].text"),
    ({"messages": QUESTION, "stop": ["\ud800"]}, "stop"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f", "description": "\ud800"}}]},
     "tools[0].function.description"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"\ud800": 1}}}]},
     "tools[0].function.parameters"),
])
def test_bad_requests_get_a_400_with_an_openai_error_body(random_server, body, param):
    status, answer = random_server.post(body)
    assert status == 400
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert answer["error"]["message"]


def test_errors_reach_the_openai_client_and_unknown_fields_pass(random_server):
    client = random_server.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "hi"}])
    assert raised.value.status_code == 400 and raised.value.param == "messages[0].role"
    status, answer = random_server.post(b'{"messages": [')
    assert status == 400 and "JSON" in answer["error"]["message"]
    reply = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2, temperature=0, user="me",
                                           presence_penalty=0.0, extra_body={"a_field_we_do_not_know": 1})
    assert reply.choices[0].finish_reason == "length"


# --- reasoning and tool calls -------------------------------------------------------------------

def test_think_block_and_tool_call_come_back_parsed(scripted_server):
    reply = scripted_server.client().chat.completions.create(model="m", messages=WEATHER_QUESTION, tools=WEATHER_TOOLS,
                                                             max_tokens=100, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "I call the tool." and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_think_block_and_tool_call_stream_parsed(scripted_server):
    chunks = list(scripted_server.client().chat.completions.create(
        model="m", messages=WEATHER_QUESTION, tools=WEATHER_TOOLS, max_tokens=100, temperature=0, stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert "".join(getattr(delta, "reasoning_content", None) or "" for delta in deltas) == "I call the tool."
    assert "".join(delta.content or "" for delta in deltas) == ""
    [call] = [call for delta in deltas for call in delta.tool_calls or []]
    assert call.index == 0 and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_and_thinking_switch_render_through_the_template(scripted_server, tokenizer):
    client = scripted_server.client()
    follow_up = WEATHER_QUESTION + [
        {"role": "assistant", "content": None, "reasoning_content": "I call the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model="m", messages=follow_up, tools=WEATHER_TOOLS, max_tokens=2, temperature=0)
    as_template_reads_it = [dict(m, content=m["content"] or "") for m in follow_up]
    assert reply.usage.prompt_tokens == prompt_tokens(tokenizer, as_template_reads_it, tools=WEATHER_TOOLS)
    reply = client.chat.completions.create(model="m", messages=WEATHER_QUESTION, max_tokens=2, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.usage.prompt_tokens == prompt_tokens(tokenizer, WEATHER_QUESTION, enable_thinking=False)


# --- other models, curl, the client, --help -----------------------------------------------------

def test_a_qwen2_directory_is_served(qwen2_server, tokenizer):
    client = qwen2_server.client()
    assert [model.id for model in client.models.list().data] == ["tiny-qwen2"]
    reply = client.chat.completions.create(model="tiny-qwen2", messages=QUESTION, max_tokens=6, temperature=0)
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_tokens(tokenizer, QUESTION)


def test_the_readme_curl_examples_work(random_server):
    request = '{"model": "minimind", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 64}'
    answer = subprocess.run(["curl", "-s", f"{random_server.base_url}/chat/completions", "-H", "Content-Type: application/json",
                             "-d", request], capture_output=True, text=True, timeout=60)
    reply = json.loads(answer.stdout)
    assert reply["object"] == "chat.completion" and isinstance(reply["choices"][0]["message"]["content"], str)
    streaming = request.replace('"max_tokens": 64', '"max_tokens": 8, "stream": true')
    answer = subprocess.run(["curl", "-sN", f"{random_server.base_url}/chat/completions", "-H",
                             "Content-Type: application/json", "-d", streaming], capture_output=True, text=True, timeout=60)
    events = answer.stdout.split("\n\n")
    assert events[0].startswith("data: {") and events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_the_chat_client_keeps_a_conversation(random_server):
    result = subprocess.run([sys.executable, str(CHAT), "--base_url", random_server.base_url, "--max_tokens", "6",
                             "--temperature", "0"], input="你好\n\n再见\n", capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("🤖: ") == 2 and result.stdout.count("👶: ") == 4


@pytest.mark.parametrize("argv, thinking, stream", [([], None, 1), (["--open_thinking", "--stream", "0"], 1, 0),
                                                    (["--enable_thinking", "0", "--stream"], 0, 1)])
def test_the_chat_client_thinking_flag_and_its_alias(argv, thinking, stream):
    args = chat_openai_api.parse_args(argv)
    assert (args.open_thinking, args.stream) == (thinking, stream)


@pytest.mark.parametrize("script, flag", [(serve_openai_api, "--max_batch_size"), (chat_openai_api, "--base_url")])
def test_help(script, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        script.parse_args(["--help"])
    assert exited.value.code == 0 and flag in capsys.readouterr().out
