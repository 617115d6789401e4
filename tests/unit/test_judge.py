"""LLM-as-judge: score parsing, rubric rendering, and judging against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from loopback import JsonHandler, loopback_server
from tunelab.errors import ConfigError, DataError
from tunelab.evaluate import judge
from tunelab.evaluate.judge import (
    JudgeConfig,
    JudgeRequestError,
    judge_samples,
    load_rubric,
    parse_score,
    render_rubric,
)

# ---------------------------------------------------------------------------------------------------- parse_score


@pytest.mark.parametrize(
    ("text", "max_score", "expected"),
    [
        ("Score: 7", 10, 7.0),
        ("score：7/10", 10, 7.0),
        ("**Score**: 7.5", 10, 7.5),
        ("评分：8", 10, 8.0),
        ("回答基本正确，但遗漏了一个条件。\n评分：8分", 10, 8.0),
        ("得分：10/10", 10, 10.0),
        ("Score：８", 10, 8.0),  # full-width colon and digit
        ("The reasoning is sound.\n7/10", 10, 7.0),
        ("Mostly right.\n\n**8/10**", 10, 8.0),
        ("Mostly right.\n6", 10, 6.0),
        ('{"score": 7}', 10, 7.0),
        ('{"reason": "close", "score": "9"}', 10, 9.0),
        ("Rating = 6 out of 10", 10, 6.0),
        ("Score: **9**", 10, 9.0),
        ("Score: 0", 10, 0.0),
        ("A score: 3 would be too harsh; it deserves more.\nScore: 8", 10, 8.0),  # the last marker decides
        ("Score: 4/5", 5, 4.0),
        # Nothing parsable, or the value is not on the scale.
        ("", 10, None),
        ("The answer is fine.", 10, None),
        ("I have 3 concerns about this answer.", 10, None),
        ("Score: N", 10, None),
        ("评分：很好", 10, None),
        ("Score: 11", 10, None),
        ("Score: -1", 10, None),
        ("Score: 4/5", 10, None),  # a denominator that is not max_score
        ("Score: 7\nOn reflection, Score: 15", 10, None),  # an invalid last marker does not fall back to 7
        ("see step 1/2", 10, None),
        ("Published 2024/10", 10, None),
    ],
)
def test_parse_score(text: str, max_score: int, expected: float | None) -> None:
    assert parse_score(text, max_score) == expected


# ---------------------------------------------------------------------------------------------------- rubric


def test_bundled_rubric_has_every_placeholder_and_asks_for_the_score_line() -> None:
    template = load_rubric(None)
    for name in ("{question}", "{reference}", "{prediction}", "{max_score}"):
        assert name in template
    assert template.rstrip().endswith("Score: N")


def test_braces_in_answers_are_inserted_verbatim() -> None:
    prompt = render_rubric(
        "Q={question} R={reference} P={prediction} of {max_score}",
        question="def f(): return {}",
        reference='{"a": 1}',
        prediction="{max_score} {reference} {0} {",
        max_score=10,
    )
    assert prompt == 'Q=def f(): return {} R={"a": 1} P={max_score} {reference} {0} { of 10'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Grade {answer} against {reference}", "unknown placeholder(s) {answer}; allowed: {question}, {reference}"),
        ("Grade against {reference}", "has no {prediction} placeholder"),
        ('Reply as {{"score": N}} for {prediction}, or {', "write literal braces as {{ and }}"),
    ],
)
def test_bad_rubric_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rubric.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_rubric(path)
    assert str(info.value).startswith(f"judge.rubric: {path}: ")
    assert message in str(info.value)


def test_missing_rubric_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"judge.rubric: cannot read .*nope.txt: No such file"):
        load_rubric(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------------- config


def test_config_forbids_unknown_keys_such_as_an_inline_key() -> None:
    with pytest.raises(ValidationError, match=r"api_key\n\s+Extra inputs are not permitted"):
        JudgeConfig(base_url="http://127.0.0.1:8000/v1", model="m", api_key="sk-secret")


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("127.0.0.1:8000/v1", "must start with http:// or https://"),
        ("http://127.0.0.1:8000/v1/chat/completions/", "give the API base"),
    ],
)
def test_config_rejects_bad_base_url(base_url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JudgeConfig(base_url=base_url, model="m")


def test_chat_url_appends_the_endpoint_once() -> None:
    assert JudgeConfig(base_url="http://h:1/v1/", model="m").chat_url == "http://h:1/v1/chat/completions"


# ---------------------------------------------------------------------------------------------------- fake server


@dataclass
class FakeServer:
    """Replies are scripted per token found in the prompt: a list of (status, text, delay_s); the last repeats."""

    url: str
    script: dict[str, list[tuple[int, str, float]]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hits(self, token: str) -> int:
        return sum(token in r["body"]["messages"][0]["content"] for r in self.requests)


class _Handler(JsonHandler):
    def do_POST(self) -> None:  # the name http.server dispatches to
        fake: FakeServer = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        with fake.lock:
            fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            steps = next(steps for token, steps in fake.script.items() if token in content)
            status, text, delay_s = steps.pop(0) if len(steps) > 1 else steps[0]
        time.sleep(delay_s)
        if status == 200:
            payload = {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            }
        else:
            payload = {"error": {"message": text}}
        self.send_json(status, payload)


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    with loopback_server(_Handler, monkeypatch) as server:
        fake = FakeServer(url=f"http://127.0.0.1:{server.server_address[1]}/v1")
        server.fake = fake  # type: ignore[attr-defined]
        yield fake


def _config(url: str, **overrides: Any) -> JudgeConfig:
    settings: dict[str, Any] = {"model": "judge-m", "max_retries": 2, "retry_backoff_s": 0.01, "concurrency": 4}
    return JudgeConfig(base_url=url, **{**settings, **overrides})


def _sample(prediction: str) -> dict[str, str]:
    return {"question": "What is the capital of France?", "reference": "Paris", "prediction": prediction}


def test_judge_samples_counts_scored_unparsable_and_failed(fake_server: FakeServer) -> None:
    fake_server.script = {
        "PRED-SLOW-RIGHT": [(200, "Correct.\nScore: 9", 0.3)],  # answers last, yet must stay first
        "PRED-WRONG": [(200, "城市错误。\n评分：2", 0.0)],
        "PRED-RAMBLE": [(200, "An interesting answer, hard to say.", 0.0)],
        "PRED-FLAKY": [(500, "overloaded", 0.0), (200, "**Score**: 6", 0.0)],
        "PRED-DOWN": [(503, "down for maintenance", 0.0)],
        "PRED-BAD-REQUEST": [(400, "model 'judge-m' does not exist", 0.0)],
    }
    tokens = list(fake_server.script)

    result = judge_samples([_sample(t) for t in tokens], _config(fake_server.url))

    assert [j.status for j in result.judgements] == ["scored", "scored", "unparsable", "scored", "failed", "failed"]
    assert [j.score for j in result.judgements] == [9.0, 2.0, None, 6.0, None, None]
    assert [j.attempts for j in result.judgements] == [1, 1, 1, 2, 3, 1]  # 5xx retried, 400 not
    assert result.judgements[2].raw == "An interesting answer, hard to say."
    assert result.judgements[4].error is not None and "HTTP 503" in result.judgements[4].error
    assert "does not exist" in (result.judgements[5].error or "")
    assert result.summary() == {
        "mean_score": pytest.approx((0.9 + 0.2 + 0.6) / 3),
        "n_samples": 6,
        "n_scored": 3,
        "n_unparsable": 1,
        "n_failed": 2,
    }
    assert [fake_server.hits(t) for t in tokens] == [1, 1, 1, 2, 3, 1]


def test_request_body_and_auth_header_when_the_key_variable_is_set(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELAB_TEST_JUDGE_KEY", "sk-test-123")
    fake_server.script = {"PRED": [(200, "Score: 5", 0.0)]}

    result = judge_samples(
        [_sample("PRED {prediction}")], _config(fake_server.url + "/", api_key_env="TUNELAB_TEST_JUDGE_KEY")
    )

    assert result.n_scored == 1
    (request,) = fake_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-test-123"
    body = request["body"]
    assert (body["model"], body["temperature"], len(body["messages"])) == ("judge-m", 0.0, 1)
    assert body["messages"][0]["role"] == "user"
    assert "PRED {prediction}" in body["messages"][0]["content"]
    assert "What is the capital of France?" in body["messages"][0]["content"]


def test_no_auth_header_when_the_key_variable_is_unset(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNELAB_TEST_JUDGE_KEY", raising=False)
    fake_server.script = {"PRED": [(200, "Score: 5", 0.0)]}

    judge_samples([_sample("PRED")], _config(fake_server.url, api_key_env="TUNELAB_TEST_JUDGE_KEY"))

    assert "Authorization" not in fake_server.requests[0]["headers"]


def test_unreachable_server_is_retried_then_reported_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    result = judge_samples([_sample("x")], _config(f"http://127.0.0.1:{port}/v1", max_retries=1))

    (only,) = result.judgements
    assert (only.status, only.attempts) == ("failed", 2)
    assert only.error is not None and only.error.startswith(f"cannot reach http://127.0.0.1:{port}/v1/chat/completions")
    assert result.summary()["mean_score"] is None


# ---------------------------------------------------------------------------------------------------- fake transport


class ScriptedTransport:
    """A transport function's stand-in: each call takes the next outcome (an exception is raised)."""

    def __init__(self, outcomes: list[Mapping[str, Any] | Exception]) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[str, Mapping[str, str], Mapping[str, Any], float]] = []

    def __call__(
        self, url: str, headers: Mapping[str, str], body: Mapping[str, Any], timeout_s: float
    ) -> Mapping[str, Any]:
        self.calls.append((url, headers, body, timeout_s))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def _reply(text: Any) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_a_fake_transport_function_gets_retries_for_retryable_errors() -> None:
    transport = ScriptedTransport(
        [JudgeRequestError("HTTP 429", retryable=True), ConnectionResetError("reset"), _reply("Score: 10")]
    )
    config = _config("http://judge.invalid/v1", concurrency=1, timeout_s=7.5)

    result = judge_samples([_sample("p")], config, transport=transport)

    assert [j.score for j in result.judgements] == [10.0]
    assert result.judgements[0].attempts == 3
    assert [c[0] for c in transport.calls] == ["http://judge.invalid/v1/chat/completions"] * 3
    assert transport.calls[0][3] == 7.5


@pytest.mark.parametrize(
    ("response", "message"),
    [
        ({"error": {"message": "context too long"}}, "response has no choices[0].message.content: "),
        (_reply(None), "message content is NoneType, not text"),
    ],
)
def test_malformed_responses_fail_without_retry(response: dict[str, Any], message: str) -> None:
    transport = ScriptedTransport([response])

    result = judge_samples([_sample("p")], _config("http://judge.invalid/v1"), transport=transport)

    (only,) = result.judgements
    assert (only.status, only.attempts, result.n_failed) == ("failed", 1, 1)
    assert only.error is not None and only.error.startswith(message)


def test_bad_sample_raises_before_any_request() -> None:
    transport = ScriptedTransport([])
    samples = [_sample("ok"), {"question": "q", "reference": "r"}]

    with pytest.raises(DataError, match=r"^samples\[1\]: prediction: missing"):
        judge_samples(samples, _config("http://judge.invalid/v1"), transport=transport)
    with pytest.raises(DataError, match=r"^samples\[0\]: reference: must be a string, got int"):
        judge_samples([{**_sample("p"), "reference": 4}], _config("http://judge.invalid/v1"), transport=transport)
    assert transport.calls == []


def test_no_samples_gives_an_empty_result() -> None:
    result = judge_samples([], _config("http://judge.invalid/v1"), transport=ScriptedTransport([]))
    assert result.summary() == {"mean_score": None, "n_samples": 0, "n_scored": 0, "n_unparsable": 0, "n_failed": 0}


def test_public_surface_is_sorted() -> None:
    assert judge.__all__ == sorted(judge.__all__)
    assert all(hasattr(judge, name) for name in judge.__all__)
