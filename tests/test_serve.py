"""`dsv4 serve` through the official openai client: completions and chat, streamed and not, 32+ concurrent requests,
a client that disconnects, and every bad input answered with a 4xx OpenAI error while the server keeps serving."""
from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serving import Server

PROMPT = "def add(a, b):\n"


# `server`, at exact with a chat template, is tests/conftest.py's, shared with tests/test_serve_determinism.py.
@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """The embedded default model with no arguments but one slot, a queue of one and KV memory for 3 blocks (768
    positions, the context being 1024)."""
    with Server(tmp_path_factory.mktemp("logs") / "serve.log", "--max-batch", "1", "--max-queue", "1",
                "--kv-cache-memory", "160KiB") as s:
        yield s


def test_models_lists_the_served_model(server):
    assert [m.id for m in server.client.models.list().data] == ["chatty"]


def test_completion_has_text_usage_and_logprobs(server):
    r = server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=6, logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(PROMPT) + 1 and r.usage.completion_tokens == 6   # bytes + BOS
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.token_logprobs) == 6 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)


def test_streamed_completion_is_the_whole_one_in_pieces(server):
    whole = server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_string_ends_the_text_before_it(server):
    free = server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[3:5]
    cut = server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    streamed = server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=12, temperature=0,
                                                stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_prompt_as_token_ids_is_the_text(server):
    by_text = server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=4, temperature=0)
    by_ids = server.client.completions.create(model="chatty", prompt=list(PROMPT.encode()), max_tokens=4,
                                              temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_seeded_sampling_repeats_and_seeds_differ(server):
    def sample(seed):
        return server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=6, temperature=1.5,
                                                seed=seed).choices[0].text
    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(3)}) > 1


def test_chat_applies_the_checkpoint_template(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = server.client.chat.completions.create(model="chatty", messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=1)
    rendered = "<system>be brief\n<user>hi\n<assistant>"            # BOS text dropped: dsv4 adds the BOS id
    completion = server.client.completions.create(model="chatty", prompt=rendered, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == len(rendered) + 1
    assert len(chat.choices[0].logprobs.content) == 5
    streamed = list(server.client.chat.completions.create(model="chatty", messages=messages, max_tokens=5,
                                                          temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_many_concurrent_requests_are_neither_lost_nor_mixed_up(server):
    prompts = [f"x{i} = {i}\n" for i in range(36)]

    def ask(prompt):
        return server.client.completions.create(model="chatty", prompt=prompt, max_tokens=2, temperature=0)

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    alone = [ask(prompts[0]), ask(prompts[-1])]
    assert all(r.usage.prompt_tokens == len(p) + 1 and r.usage.completion_tokens == 2
               for r, p in zip(together, prompts))
    assert [r.choices[0].text for r in (together[0], together[-1])] == [r.choices[0].text for r in alone]


@pytest.mark.parametrize("args, param", [
    (dict(max_tokens="ten"), "max_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=5000), "max_tokens"),
    (dict(prompt="x" * 1100), "prompt"),
    (dict(prompt=[1, 2, 99999]), "prompt"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(n=2), "n"),
    (dict(logprobs=9), "logprobs"),
])
def test_bad_completion_input_is_a_400_naming_it(server, args, param):
    args = dict(model="chatty", prompt=PROMPT, max_tokens=2) | args
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(**args)
    assert e.value.body["param"] == param and e.value.body["message"]
    assert server.client.completions.create(model="chatty", prompt=PROMPT, max_tokens=1).choices[0].text is not None


def test_unknown_model_is_a_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert "gpt-4" in e.value.body["message"] and e.value.body["code"] == "model_not_found"


def test_malformed_json_is_a_400_and_an_unknown_path_a_404(server):
    status, body = server.post("/v1/completions", b'{"model": "chatty", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", b'[1, 2]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = server.post("/v1/embeddings", b'{}')
    assert status == 404 and body["error"]["message"]


def test_bad_chat_messages_are_a_400(server):
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"role": "user"}]):
        with pytest.raises(openai.BadRequestError):
            server.client.chat.completions.create(model="chatty", messages=messages, max_tokens=2)


def test_chat_without_a_template_is_a_clear_400(narrow):
    with pytest.raises(openai.BadRequestError) as e:
        narrow.client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in e.value.body["message"]


def test_embedded_model_serves_completions_without_a_model_argument(narrow):
    r = narrow.client.completions.create(model="default", prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_a_request_that_can_never_fit_the_kv_memory_is_refused_at_once(narrow):
    assert narrow.health()["total_blocks"] == 3
    with pytest.raises(openai.BadRequestError) as e:
        narrow.client.completions.create(model="default", prompt=PROMPT, max_tokens=900)
    assert "KV cache blocks" in e.value.body["message"] and narrow.health()["waiting"] == 0


def cancelled(health: dict) -> int:
    return health["finished"].get("cancelled", 0)


def test_disconnecting_client_frees_its_slot_and_blocks(narrow):
    total, before = narrow.health()["total_blocks"], cancelled(narrow.health())
    stream = narrow.client.completions.create(model="default", prompt=PROMPT, max_tokens=600, stream=True)
    next(iter(stream))
    assert narrow.health()["running"] == 1 and narrow.health()["free_blocks"] < total
    stream.close()
    health = narrow.wait_until(lambda h: h["running"] == 0, "the request ended")
    assert cancelled(health) == before + 1 and health["free_blocks"] == total
    assert narrow.client.completions.create(model="default", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_a_client_gone_before_its_whole_answer_frees_its_slot_and_blocks(narrow):
    total, before = narrow.health()["total_blocks"], cancelled(narrow.health())
    conn = http.client.HTTPConnection("127.0.0.1", narrow.port)
    conn.request("POST", "/v1/completions", json.dumps({"model": "default", "prompt": PROMPT, "max_tokens": 600}),
                 {"Content-Type": "application/json"})
    narrow.wait_until(lambda h: h["running"] == 1, "the request running")
    conn.close()
    health = narrow.wait_until(lambda h: h["running"] == 0, "the request ended")
    assert cancelled(health) == before + 1 and health["free_blocks"] == total


def test_requests_over_the_queue_bound_get_a_429(narrow):
    running = narrow.client.completions.create(model="default", prompt=PROMPT, max_tokens=600, stream=True)
    next(iter(running))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(narrow.client.completions.create, model="default", prompt=PROMPT, max_tokens=2)
        narrow.wait_until(lambda h: h["waiting"] == 1, "one request waiting")
        with pytest.raises(openai.RateLimitError) as e:
            narrow.client.completions.create(model="default", prompt=PROMPT, max_tokens=2)
        assert "too many requests" in e.value.body["message"]
        running.close()
        assert waiting.result().usage.completion_tokens == 2
