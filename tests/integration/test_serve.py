"""`tunelab serve` as clients use it: a real uvicorn process on 127.0.0.1, driven by the official openai client.

Two servers for the module, both with the base model + one trained LoRA adapter and an API key: ``server`` has one
generation slot and one queue place, so the 429 and cancellation paths are reachable; ``batch_server`` admits 8
requests at once, so concurrent requests share one decoding batch. Answers are checked against generation done
here with plain transformers on the same prompts, and concurrent answers against the same requests sent one by one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import shared_lora_run
from loopback import PROXY_VARIABLES
from tunelab.data.record import Turn
from tunelab.data.tokenize import encode_prompt
from tunelab.evaluate.generate import load_for_eval, stop_token_ids
from tunelab.serve.generation import IncrementalDetokenizer, StopStringBuffer
from tunelab.serve.server import READY_LINE

openai = pytest.importorskip("openai")



KEY = "sk-test-key"
QUESTION = "What is 2 plus 3?"
MAX_BODY = 20_000


@pytest.fixture(scope="module")
def calc_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_lora_run(tiny_model, tmp_path_factory)


@pytest.fixture(scope="module")
def server(tiny_model: Path, calc_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from _serve(tiny_model, calc_run, tmp_path_factory, "--max-concurrency", "1", "--max-queue", "1")


@pytest.fixture(scope="module")
def batch_server(
    tiny_model: Path, calc_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    yield from _serve(tiny_model, calc_run, tmp_path_factory, "--max-concurrency", "8", "--max-batch-size", "8")


def _serve(tiny_model: Path, calc_run: Path, factory: pytest.TempPathFactory, *flags: str) -> Iterator[dict[str, Any]]:
    patch = pytest.MonkeyPatch()
    for var in PROXY_VARIABLES:
        patch.delenv(var, raising=False)  # 127.0.0.1 must not go through a proxy
    log = factory.mktemp("serve_log") / "server.log"
    command = [sys.executable, "-m", "tunelab.cli", "serve", "--model", str(tiny_model), "--served-model-name",
               "tiny-base", "--adapter", f"calc={calc_run}", "--port", "0", "--api-key", KEY,
               "--max-tokens-limit", "2000", "--max-request-bytes", str(MAX_BODY), *flags]
    with log.open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url = _wait_for_ready(process, log, timeout=90)
        yield {"url": url, "process": process, "log": log}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        patch.undo()


def _wait_for_ready(process: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith(READY_LINE):
                return line.split()[4]
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    pytest.fail(f"server not ready in {timeout}s:\n{log.read_text()[-3000:]}")


def client(server: dict[str, Any], key: str = KEY, **kwargs: Any) -> Any:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, **kwargs)


def raw(server: dict[str, Any], path: str, body: bytes | None = None, *, key: str | None = KEY,
        method: str | None = None) -> tuple[int, dict[str, Any]]:
    """A plain HTTP request (no client-side validation), returning the status and the JSON body."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server["url"] + path, data=body, headers=headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def health(server: dict[str, Any]) -> dict[str, Any]:
    return raw(server, "/health", key=None)[1]


@pytest.fixture(scope="module")
def reference(tiny_model: Path, calc_run: Path) -> dict[str, Any]:
    """Greedy answers computed here with plain ``model.generate`` on tunelab's prompt ids (the training template)."""
    out = {}
    for name, adapter in (("calc", calc_run), ("tiny-base", None)):
        loaded = load_for_eval(str(tiny_model), str(adapter) if adapter else None, dtype="fp32")
        prompt = encode_prompt(loaded.template, loaded.tokenizer, None, [Turn("user", QUESTION)])
        stops = stop_token_ids(loaded)
        with torch.no_grad():
            output = loaded.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                           max_new_tokens=12, do_sample=False, eos_token_id=stops,
                                           pad_token_id=loaded.tokenizer.pad_token_id)
        new = output[0, len(prompt):].tolist()
        ended = new[-1] in stops
        text = loaded.tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=False)
        out[name] = {"prompt_tokens": len(prompt), "tokens": len(new), "text": text, "ended": ended}
    assert out["calc"]["ended"] and out["calc"]["text"].strip(), out  # the adapter answers and stops
    return out


# ----------------------------------------------------------------------------------------------- generation


def test_models_lists_the_base_and_each_adapter(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny-base", "calc"]


def test_chat_completion_matches_generate_and_counts_tokens(server, reference):
    want = reference["calc"]
    response = client(server).chat.completions.create(
        model="calc", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12)
    choice = response.choices[0]
    assert choice.message.content == want["text"]
    assert choice.finish_reason == "stop"
    assert response.usage.prompt_tokens == want["prompt_tokens"]
    assert response.usage.completion_tokens == want["tokens"]  # the end-of-turn token included
    assert response.usage.total_tokens == want["prompt_tokens"] + want["tokens"]


def test_model_field_selects_the_adapter_or_the_base(server, reference):
    base = client(server).chat.completions.create(
        model="tiny-base", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12)
    assert base.choices[0].message.content == reference["tiny-base"]["text"]
    assert base.choices[0].message.content != reference["calc"]["text"]
    assert base.choices[0].finish_reason == ("stop" if reference["tiny-base"]["ended"] else "length")
    assert base.usage.completion_tokens == reference["tiny-base"]["tokens"]


def test_streaming_chat_gives_the_same_answer_in_pieces(server, reference):
    stream = client(server).chat.completions.create(
        model="calc", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(pieces) == reference["calc"]["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference["calc"]["tokens"]


def test_length_limit_and_stop_strings(server, reference):
    openai_client = client(server)
    cut = openai_client.chat.completions.create(
        model="tiny-base", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    answer = reference["calc"]["text"]
    stopped = openai_client.chat.completions.create(
        model="calc", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12,
        stop=[answer[1:], "never"])
    assert stopped.choices[0].message.content == answer[:1]
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_stream_and_not(server):
    openai_client = client(server)
    whole = openai_client.completions.create(model="calc", prompt="1 2 3", temperature=0, max_tokens=6)
    pieces = openai_client.completions.create(model="calc", prompt="1 2 3", temperature=0, max_tokens=6,
                                              stream=True)
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert whole.usage.completion_tokens <= 6 and whole.usage.prompt_tokens > 0


# ----------------------------------------------------------------------------------------------- bad requests


def test_api_key_guards_everything_but_health(server):
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, key="wrong").models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    status, body = raw(server, "/v1/chat/completions", b"{}", key=None)
    assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
    assert raw(server, "/health", key=None)[0] == 200


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"model": "calc", "messages": [', 400, "not valid JSON"),
    (b'[1, 2]', 400, "must be a JSON object"),
    (b'{"model": "calc"}', 400, "messages: Field required"),
    (b'{"model": "calc", "messages": [{"role": "user", "content": "hi"}], "temprature": 0}', 400,
     "temprature: unrecognized request argument"),
    (b'{"model": "calc", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}', 400,
     "max_tokens is 5000; this server allows at most 2000"),
    (b'{"model": "calc", "messages": [{"role": "user", "content": "hi"}], "n": 9}', 400,
     "n is 9; this server decodes at most 8 answer(s) at once (--max-batch-size 8)"),
    (b'{"model": "calc", "messages": [{"role": "user", "content": "hi"}], "logprobs": true}', 400,
     "logprobs are not supported"),
    (b'{"model": "calc", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400,
     "tools are not supported"),
    (b'{"model": "calc", "messages": [{"role": "assistant", "content": "hi"}]}', 400, "last message"),
    (b'{"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}', 404, "'gpt-4' does not exist"),
])
def test_bad_requests_get_openai_error_json(server, body, status, message):
    got, payload = raw(server, "/v1/chat/completions", body)
    assert got == status, payload
    assert set(payload["error"]) >= {"message", "type", "code"} and message in payload["error"]["message"]


def test_too_large_unknown_route_and_wrong_method(server):
    big = json.dumps({"model": "calc", "prompt": "x" * MAX_BODY}).encode()
    status, payload = raw(server, "/v1/completions", big)
    assert status == 413 and payload["error"]["code"] == "request_too_large"
    assert raw(server, "/v1/nothing")[0] == 404
    assert raw(server, "/v1/completions", method="GET")[1]["error"]["code"] == "method_not_allowed"
    with pytest.raises(openai.BadRequestError, match="max_tokens is 9000"):
        client(server).completions.create(model="calc", prompt="1", max_tokens=9000)


# ----------------------------------------------------------------------------------------------- load limits


def _long_stream(openai_client: Any) -> Any:
    """A streaming request that runs until cancelled: the base model at min_tokens = max_tokens."""
    return openai_client.chat.completions.create(
        model="tiny-base", messages=[{"role": "user", "content": "go on"}], temperature=0, max_tokens=1900,
        extra_body={"min_tokens": 1900}, stream=True)


def _wait(server: dict[str, Any], condition: Any, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(server)
        if condition(state):
            return state
        time.sleep(0.05)
    pytest.fail(f"server state never matched: {health(server)}")


def test_queue_full_gets_429_and_disconnects_cancel_generation(server):
    openai_client = client(server)
    before = health(server)
    running = _long_stream(openai_client)
    next(iter(running))  # the first chunk: it holds the only slot now
    waiting: dict[str, Any] = {}

    def wait_for_slot() -> None:  # create() returns once the server answers, i.e. once it has a slot
        waiting["stream"] = _long_stream(openai_client)
        waiting["chunks"] = _take(waiting["stream"], 2)

    reader = threading.Thread(target=wait_for_slot, daemon=True)
    reader.start()
    _wait(server, lambda s: s["queued"] == 1)
    with pytest.raises(openai.RateLimitError) as caught:
        openai_client.chat.completions.create(model="calc", messages=[{"role": "user", "content": QUESTION}])
    assert caught.value.status_code == 429 and caught.value.body["code"] == "rate_limit_exceeded"

    running.close()  # client goes away mid-stream: its generation stops, the waiting one starts
    _wait(server, lambda s: s["cancelled"] == before["cancelled"] + 1)
    reader.join(timeout=20)
    assert len(waiting["chunks"]) == 2
    waiting["stream"].close()
    state = _wait(server, lambda s: s["cancelled"] == before["cancelled"] + 2 and s["running"] == 0)
    assert state["rejected"] == before["rejected"] + 1

    started = time.monotonic()
    answer = openai_client.chat.completions.create(
        model="calc", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12)
    assert answer.choices[0].finish_reason == "stop" and time.monotonic() - started < 10


def test_non_streaming_client_timeout_cancels_generation(server):
    before = health(server)
    impatient = client(server, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "go"}],
                                          max_tokens=1900, extra_body={"min_tokens": 1900}, temperature=0)
    _wait(server, lambda s: s["cancelled"] == before["cancelled"] + 1 and s["running"] == 0)


def _take(stream: Any, n: int) -> list[Any]:
    out = []
    for chunk in stream:
        out.append(chunk)
        if len(out) == n:
            break
    return out


# ----------------------------------------------------------------------------------------------- batching


def _chat(openai_client: Any, question: str, model: str = "calc", **options: Any) -> tuple[str, str, int]:
    response = openai_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **{"temperature": 0, **options})
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason, response.usage.completion_tokens


def test_n_choices_are_rows_of_one_batch(server, reference):
    openai_client = client(server)
    want = reference["calc"]
    response = openai_client.chat.completions.create(
        model="calc", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=12, n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [(c.message.content, c.finish_reason) for c in response.choices] == [(want["text"], "stop")] * 3
    assert response.usage.prompt_tokens == want["prompt_tokens"]  # the prompt is counted once
    assert response.usage.completion_tokens == 3 * want["tokens"]

    def sampled() -> list[str]:
        answer = openai_client.completions.create(model="tiny-base", prompt="1 2 3", temperature=1.0, seed=5,
                                                  max_tokens=8, n=2)
        return [c.text for c in answer.choices]

    first = sampled()
    assert first == sampled() and first[0] != first[1]  # the seed fixes the sampling; each choice has its own


def test_n_choices_stream_with_their_index(server):
    openai_client = client(server)
    whole = openai_client.completions.create(model="calc", prompt="1 2 3", temperature=0, max_tokens=6)
    chunks = list(openai_client.completions.create(model="calc", prompt="1 2 3", temperature=0, max_tokens=6, n=2,
                                                   stream=True, stream_options={"include_usage": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == whole.choices[0].text
        assert [c.finish_reason for c in mine if c.finish_reason] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == 2 * whole.usage.completion_tokens


def test_concurrent_requests_share_a_batch_and_answer_as_if_alone(batch_server):
    """Greedy answers of requests decoded together, each with its own max_tokens and stop strings, equal the same
    requests sent one at a time; a short one finishes early while long ones go on."""
    openai_client = client(batch_server)
    questions = ["What is 2 plus 3?", "计算 4 加 5", "hi", "Add two blue hoodies in size M to my cart.",
                 "这款运动鞋还有货吗？", "What is the price of the black jacket?"]
    long_text = _chat(openai_client, questions[4], model="tiny-base", max_tokens=12)[0]
    requests = [
        (questions[0], "calc", {"max_tokens": 12}),
        (questions[1], "calc", {"max_tokens": 2}),  # finishes early
        (questions[2], "calc", {"max_tokens": 24, "extra_body": {"min_tokens": 24}}),  # goes on longest
        (questions[3], "calc", {"max_tokens": 10}),
        (questions[4], "tiny-base", {"max_tokens": 12, "stop": [long_text[4:7]]}),  # its own stop string
        (questions[5], "calc", {"max_tokens": 16}),
    ]
    alone = [_chat(openai_client, q, model, **options) for q, model, options in requests]
    before = health(batch_server)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _chat(openai_client, r[0], r[1], **r[2]), requests))
    assert together == alone
    assert alone[1][1:] == ("length", 2) and alone[2][1:] == ("length", 24)
    assert alone[4][0] == long_text[: long_text.find(long_text[4:7])] and alone[4][1] == "stop"
    state = health(batch_server)
    assert state["completed"] == before["completed"] + len(requests) and state["failed"] == before["failed"]
    assert state["peak_batch_rows"] >= 2  # they really were decoded together


def test_a_client_leaving_mid_stream_leaves_the_others_intact(batch_server):
    openai_client = client(batch_server)
    options = {"max_tokens": 100, "extra_body": {"min_tokens": 100}}
    questions = ["计算 4 加 5", "What is the price of the black jacket?"]
    alone = [_chat(openai_client, q, "tiny-base", **options) for q in questions]
    before = health(batch_server)
    started = [threading.Event() for _ in questions]

    def read(index: int) -> tuple[str, str | None, int]:
        stream = openai_client.chat.completions.create(
            model="tiny-base", messages=[{"role": "user", "content": questions[index]}], temperature=0,
            stream=True, stream_options={"include_usage": True}, **options)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content:
                started[index].set()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finishes[0] if finishes else None, chunks[-1].usage.completion_tokens

    leaving = _long_stream(openai_client)  # 1900 tokens: still generating when the readers get text
    assert len(_take(leaving, 3)) == 3
    with ThreadPoolExecutor(len(questions)) as pool:
        readers = [pool.submit(read, i) for i in range(len(questions))]
        assert all(event.wait(timeout=30) for event in started)  # all three rows are in the batch now
        leaving.close()
        results = [r.result(timeout=60) for r in readers]
    assert results == alone and all(r[1:] == ("length", 100) for r in results)
    state = _wait(batch_server, lambda s: s["running"] == 0)
    assert state["cancelled"] == before["cancelled"] + 1 and state["failed"] == before["failed"]


def test_requests_for_different_adapters_take_turns(batch_server, reference):
    openai_client = client(batch_server)
    models = ["calc", "tiny-base"] * 3
    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: _chat(openai_client, QUESTION, m, max_tokens=12), models))
    for model, (text, finish, tokens) in zip(models, answers, strict=True):
        assert (text, tokens) == (reference[model]["text"], reference[model]["tokens"]), model
        assert finish == ("stop" if reference[model]["ended"] else "length")


# ----------------------------------------------------------------------------------------------- pieces


def test_stop_string_buffer_holds_back_partial_stops():
    buffer = StopStringBuffer(["<|im_end|>", "\n\n### Instruction:"])
    shown = [buffer.push(piece) for piece in ("Hi", " there<", "|im", "_end|>", "more")]
    assert shown == ["Hi", " there", "", "", ""] and buffer.stopped and buffer.text == "Hi there"
    loose = StopStringBuffer(["<|im_end|>"])
    assert [loose.push("a<b"), loose.push("<|x"), loose.flush()] == ["a<b", "<|x", ""]


def test_incremental_detokenizer_joins_to_the_full_decode(tokenizer):
    text = "帮我把红色的卫衣加入购物车，要L码。 Add two blue hoodies! 12 + 7 = 19"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) + detokenizer.rest() == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


# ----------------------------------------------------------------------------------------------- vLLM hand-off


def test_vllm_engine_translates_the_command_line(tiny_model, calc_run, capsys):
    from tunelab.cli import build_parser, main
    from tunelab.serve.vllm import chat_template_file, vllm_command

    args = build_parser().parse_args(["serve", "--model", str(tiny_model), "--adapter", f"calc={calc_run}",
                                      "--port", "8001", "--max-concurrency", "16", "--dtype", "bf16"])
    template, described = chat_template_file(args)
    assert template is not None and "chatml" in described  # the run's named template, as a Jinja file
    assert "<|im_start|>assistant" in template.read_text()
    command = vllm_command(args, "sk-x", template)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = " ".join(command[3:])
    for part in (f"--model {tiny_model}", "--port 8001", "--dtype bfloat16", "--max-num-seqs 16", "--api-key sk-x",
                 "--enable-lora", "--max-lora-rank 8", f"--lora-modules calc={calc_run}",
                 f"--chat-template {template}"):
        assert part in flags, part
    if importlib.util.find_spec("vllm") is None:
        assert main(["serve", "--model", str(tiny_model), "--engine", "vllm"]) == 1
        assert "vLLM is not installed" in capsys.readouterr().err


def test_vllm_engine_hands_the_process_over_to_vllm(tiny_model, calc_run, tmp_path):
    """End to end with a stand-in ``vllm`` package (the real one needs CUDA): `tunelab serve --engine vllm` replaces
    its own process with vLLM's OpenAI server, passing the translated flags and a chat template file that exists."""
    fake = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    fake.mkdir(parents=True)
    for folder in (fake.parent.parent, fake.parent, fake):
        (folder / "__init__.py").write_text("")
    record = tmp_path / "argv.json"
    (fake / "api_server.py").write_text(
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "template = open(args[args.index('--chat-template') + 1], encoding='utf-8').read()\n"
        f"open({str(record)!r}, 'w', encoding='utf-8').write(json.dumps({{'argv': args, 'template': template}}))\n")
    launcher = ("import sys, torch; torch.cuda.is_available = lambda: True\n"  # vLLM's check, not its kernels
                "from tunelab.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", launcher, "serve", "--model", str(tiny_model), "--adapter",
                             f"calc={calc_run}", "--port", "8002", "--engine", "vllm", "--api-key", "sk-y"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr
    assert "handing over to vLLM" in shown and "sk-y" not in shown  # the key is masked
    handed = json.loads(record.read_text("utf-8"))
    flags = " ".join(handed["argv"])
    for part in (f"--model {tiny_model}", "--port 8002", "--api-key sk-y", f"--lora-modules calc={calc_run}"):
        assert part in flags, part
    assert "<|im_start|>assistant" in handed["template"]


def test_missing_serve_extra_names_the_install_command(tiny_model, monkeypatch, capsys):
    from tunelab.cli import main
    from tunelab.serve import server as serve_module

    real = importlib.util.find_spec
    monkeypatch.setattr(serve_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--model", str(tiny_model)]) == 1
    assert "needs fastapi: pip install 'tunelab[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "chat", "serve"])
def test_ship_commands_have_help(command, capsys):
    from tunelab.cli import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0 and "usage: tunelab " + command in capsys.readouterr().out
