"""LLM-as-judge scoring through any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp, OpenAI, ...).

Each sample (question, reference, prediction) is rendered into a rubric and sent to the judge model; the score is
read from the judge's last ``Score: N`` line. Judgements that fail (network, HTTP errors after retries) or that
cannot be parsed are counted and reported on their own, never dropped and never scored as 0: a judge that fails on
the hard samples would otherwise make a model look better (dropped) or worse (zeroed) than it is.

The HTTP call goes through a *transport*, a plain callable ``(url, headers, body, timeout_s) -> response JSON``;
``post_json`` (standard-library ``urllib``) is the default, so judging needs no extra dependency, and tests or other
clients pass their own. A transport reports a failure by raising ``JudgeRequestError`` (``retryable`` says whether
trying again may help) or ``OSError``, which counts as a retryable connection failure.
"""

from __future__ import annotations

import json
import os
import re
import string
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from tunelab.errors import ConfigError, DataError

__all__ = [
    "JudgeConfig",
    "JudgeRequestError",
    "JudgeResult",
    "Judgement",
    "Transport",
    "judge_samples",
    "load_rubric",
    "parse_score",
    "post_json",
    "render_rubric",
]

RUBRIC_FIELDS = ("question", "reference", "prediction", "max_score")
SAMPLE_FIELDS = ("question", "reference", "prediction")
# A server's Retry-After is obeyed, but never for longer than this: one bad header must not stall a whole run.
MAX_RETRY_AFTER_S = 60.0


class JudgeConfig(BaseModel):
    """Where the judge model is served and how it is asked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    base_url: str
    """Base URL of an OpenAI-compatible API, e.g. ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended."""
    model: str
    """Model name the server expects in the request body."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (the key itself is never stored in a config);
    when the variable is unset or empty no ``Authorization`` header is sent, as local servers expect."""
    rubric: Path | None = None
    """Prompt template with ``{question}``, ``{reference}``, ``{prediction}`` and ``{max_score}``;
    ``null`` uses the bundled bilingual rubric. Literal braces are written ``{{`` and ``}}``."""
    max_score: int = Field(10, ge=1)
    """Top of the judge's scale (0 to ``max_score``); results are also reported normalised to 0-1."""
    timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for one judge response."""
    max_retries: int = Field(3, ge=0)
    """Extra attempts after a connection error, HTTP 429 or 5xx; other HTTP errors are not retried."""
    retry_backoff_s: float = Field(1.0, ge=0)
    """Wait before the first retry; doubled before each further one (a server's Retry-After wins if longer)."""
    concurrency: int = Field(4, ge=1)
    """Requests in flight at once."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature of the judge; 0 makes scores as repeatable as the server allows."""

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        if value.rstrip("/").endswith("/chat/completions"):
            raise ValueError(f"give the API base (e.g. http://127.0.0.1:8000/v1), not the endpoint: {value!r}")
        return value

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


# ---------------------------------------------------------------------------------------------------- rubric


def load_rubric(path: Path | None = None) -> str:
    """The rubric template at ``path`` (the bundled one when ``None``), checked for unknown or missing placeholders.

    Checking here means a typo such as ``{answer}`` fails before any request is sent, instead of reaching the judge
    as literal text in every prompt.
    """
    if path is None:
        template = resources.files("tunelab.resources").joinpath("judge_rubric.txt").read_text(encoding="utf-8")
        source = "bundled judge_rubric.txt"
    else:
        try:
            template = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"judge.rubric: cannot read {path}: {exc.strerror or exc}") from exc
        source = str(path)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:  # a lone "{" or "}"
        raise ConfigError(f"judge.rubric: {source}: {exc}; write literal braces as {{{{ and }}}}") from exc
    unknown = sorted(fields - set(RUBRIC_FIELDS))
    if unknown:
        raise ConfigError(
            f"judge.rubric: {source}: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
            f"allowed: {', '.join('{' + n + '}' for n in RUBRIC_FIELDS)} (write literal braces as {{{{ and }}}})"
        )
    if "prediction" not in fields:
        raise ConfigError(f"judge.rubric: {source}: has no {{prediction}} placeholder, so the judge would never see it")
    return template


def render_rubric(template: str, *, question: str, reference: str, prediction: str, max_score: int) -> str:
    """The prompt for one sample.

    ``format_map`` parses only the template; the substituted answers are inserted as they are, so braces in them
    (code, JSON, LaTeX) are neither parsed nor an error.
    """
    values = {"question": question, "reference": reference, "prediction": prediction, "max_score": max_score}
    return template.format_map(values)


# ---------------------------------------------------------------------------------------------------- parsing

_NUMBER = r"(-?\d+(?:\.\d+)?)"
_OUT_OF = r"\s*(?:/|out\s+of)\s*"
# "Score: 7", "**Score**: 7.5", "评分：8分", '{"score": 7}', "Rating = 6/10". Between the word and the number we
# allow markdown emphasis and JSON quotes; the full-width colon is folded to ":" by NFKC before matching.
_MARKER = re.compile(
    r"(?:score|rating|评分|得分|分数|打分)[\s*_\"'`]*[:=][\s*_\"'`]*" + _NUMBER + r"(?:" + _OUT_OF + _NUMBER + r")?",
    re.IGNORECASE,
)
_FRACTION = re.compile(_NUMBER + _OUT_OF + _NUMBER, re.IGNORECASE)
_BARE_NUMBER = re.compile(r"^" + _NUMBER + r"\s*分?$")


def parse_score(text: str, max_score: float) -> float | None:
    """The score in a judge's reply, or ``None`` when there is no valid one.

    The last explicit marker decides (``Score: 7``, ``score：7/10``, ``**Score**: 7.5``, ``评分：8``,
    ``{"score": 7}``): judges often think aloud about other scores before giving theirs. Only when there is no
    marker is the last non-empty line read, as ``7/10`` or a lone number. A value outside ``[0, max_score]``, or a
    fraction whose denominator is not ``max_score``, gives ``None`` rather than falling back to an earlier number,
    which would more likely be part of the reasoning than the verdict.
    """
    # NFKC folds full-width digits, colons and slashes ("８／１０", "：") into ASCII.
    text = unicodedata.normalize("NFKC", text)
    markers = list(_MARKER.finditer(text))
    if markers:
        value, denominator = markers[-1].groups()
        return _checked_score(value, denominator, max_score)
    lines = [line.strip().strip("*_#`>").strip().rstrip(".。") for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return None
    last = lines[-1]
    fractions = list(_FRACTION.finditer(last))
    if fractions:
        value, denominator = fractions[-1].groups()
        return _checked_score(value, denominator, max_score)
    bare = _BARE_NUMBER.match(last)
    return _checked_score(bare.group(1), None, max_score) if bare else None


def _checked_score(value: str, denominator: str | None, max_score: float) -> float | None:
    if denominator is not None and float(denominator) != float(max_score):
        return None
    score = float(value)
    return score if 0.0 <= score <= max_score else None


# ---------------------------------------------------------------------------------------------------- transport


class JudgeRequestError(Exception):
    """One judge request failed; ``retryable`` says whether the same request may succeed later."""

    def __init__(self, message: str, *, retryable: bool, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class Transport(Protocol):
    """Sends one chat-completions request and returns the decoded JSON response."""

    def __call__(
        self, url: str, headers: Mapping[str, str], body: Mapping[str, Any], timeout_s: float
    ) -> Mapping[str, Any]: ...


def post_json(url: str, headers: Mapping[str, str], body: Mapping[str, Any], timeout_s: float) -> Mapping[str, Any]:
    """POST ``body`` as JSON with ``urllib``; HTTP 429 and 5xx raise a retryable ``JudgeRequestError``."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
        headers={"Content-Type": "application/json", "Accept": "application/json", **headers},
        method="POST",
    )
    # A fresh opener reads the proxy variables (and no_proxy) now; urlopen's global opener keeps the first ones seen.
    opener = urllib.request.build_opener()
    try:
        with opener.open(request, timeout=timeout_s) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:  # before URLError/OSError: it is a subclass of both
        detail = exc.read(300).decode("utf-8", "replace").strip()
        hint = " (is the key in the variable named by judge.api_key_env?)" if exc.code in (401, 403) else ""
        raise JudgeRequestError(
            f"HTTP {exc.code} from {url}: {detail or exc.reason}{hint}",
            retryable=exc.code == 429 or exc.code >= 500,
            retry_after_s=_retry_after_s(exc.headers.get("Retry-After") if exc.headers else None),
        ) from exc
    except urllib.error.URLError as exc:
        raise JudgeRequestError(f"cannot reach {url}: {exc.reason}", retryable=True) from exc
    except OSError as exc:  # timeouts and resets while reading the body
        raise JudgeRequestError(f"connection to {url} failed: {exc}", retryable=True) from exc
    try:
        decoded = json.loads(payload)
    except ValueError as exc:
        raise JudgeRequestError(f"response from {url} is not JSON: {payload[:200]!r}", retryable=False) from exc
    if not isinstance(decoded, dict):
        raise JudgeRequestError(f"response from {url} is not a JSON object", retryable=False)
    return decoded


def _retry_after_s(header: str | None) -> float | None:
    # Only the delay-seconds form; the HTTP-date form is rare on these servers and then the backoff applies.
    try:
        return min(float(header), MAX_RETRY_AFTER_S) if header is not None else None
    except ValueError:
        return None


def _message_text(response: Mapping[str, Any]) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        error = response.get("error") if isinstance(response, Mapping) else None
        detail = f": {error}" if error is not None else ""
        raise JudgeRequestError(f"response has no choices[0].message.content{detail}", retryable=False) from exc
    if not isinstance(content, str):
        raise JudgeRequestError(f"message content is {type(content).__name__}, not text", retryable=False)
    return content


# ---------------------------------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Judgement:
    """The judge's verdict on one sample: ``error`` is set when the call failed, ``score`` when it parsed."""

    score: float | None
    """Score on the judge's 0..max_score scale; ``None`` when the call failed or the reply had no valid score."""
    raw: str | None
    """The judge's reply text; ``None`` when the call failed."""
    error: str | None
    """Why the call failed, after ``attempts`` tries; ``None`` when a reply came back."""
    attempts: int

    @property
    def status(self) -> Literal["scored", "unparsable", "failed"]:
        if self.error is not None:
            return "failed"
        return "unparsable" if self.score is None else "scored"


@dataclass(frozen=True)
class JudgeResult:
    """Judgements in the order of the samples, and their summary."""

    judgements: list[Judgement]
    max_score: int

    @property
    def n_scored(self) -> int:
        return sum(j.status == "scored" for j in self.judgements)

    @property
    def n_unparsable(self) -> int:
        return sum(j.status == "unparsable" for j in self.judgements)

    @property
    def n_failed(self) -> int:
        return sum(j.status == "failed" for j in self.judgements)

    @property
    def scores(self) -> list[float | None]:
        """Per-sample scores normalised to 0-1, ``None`` where there is none."""
        return [None if j.score is None else j.score / self.max_score for j in self.judgements]

    @property
    def mean_score(self) -> float | None:
        """Mean normalised score over the scored samples only; ``None`` when none was scored."""
        scored = [s for s in self.scores if s is not None]
        return sum(scored) / len(scored) if scored else None

    def summary(self) -> dict[str, float | int | None]:
        return {
            "mean_score": self.mean_score,
            "n_samples": len(self.judgements),
            "n_scored": self.n_scored,
            "n_unparsable": self.n_unparsable,
            "n_failed": self.n_failed,
        }


def judge_samples(
    samples: Sequence[Mapping[str, str]], config: JudgeConfig, transport: Transport | None = None
) -> JudgeResult:
    """Ask the judge about every sample (``question``, ``reference``, ``prediction``), ``config.concurrency`` at once.

    Bad samples and a bad rubric raise before any request is sent; failed and unparsable judgements are returned
    in the result, not raised.
    """
    _check_samples(samples)
    template = load_rubric(config.rubric)
    prompts = [
        render_rubric(
            template,
            question=s["question"],
            reference=s["reference"],
            prediction=s["prediction"],
            max_score=config.max_score,
        )
        for s in samples
    ]
    send = post_json if transport is None else transport
    headers = _auth_headers(config.api_key_env)
    judgements: list[Judgement | None] = [None] * len(prompts)
    if prompts:
        with (
            ThreadPoolExecutor(max_workers=min(config.concurrency, len(prompts))) as pool,
            tqdm(total=len(prompts), desc="judge", unit="sample", disable=None) as bar,
        ):
            futures = {pool.submit(_judge_one, p, config, headers, send): i for i, p in enumerate(prompts)}
            for future in as_completed(futures):
                judgements[futures[future]] = future.result()
                bar.update(1)
    return JudgeResult(judgements=[j for j in judgements if j is not None], max_score=config.max_score)


def _check_samples(samples: Sequence[Mapping[str, str]]) -> None:
    for index, sample in enumerate(samples):
        for field in SAMPLE_FIELDS:
            if field not in sample:
                raise DataError(f"samples[{index}]", field, f"missing (a sample needs {', '.join(SAMPLE_FIELDS)})")
            if not isinstance(sample[field], str):
                raise DataError(f"samples[{index}]", field, f"must be a string, got {type(sample[field]).__name__}")


def _auth_headers(api_key_env: str) -> dict[str, str]:
    key = os.environ.get(api_key_env, "")
    # An empty variable counts as unset: "Bearer " with nothing after it is rejected by servers that check keys.
    return {"Authorization": f"Bearer {key}"} if key != "" else {}


def _judge_one(prompt: str, config: JudgeConfig, headers: Mapping[str, str], send: Transport) -> Judgement:
    body = {"model": config.model, "messages": [{"role": "user", "content": prompt}], "temperature": config.temperature}
    attempts = 0
    while True:
        attempts += 1
        try:
            text = _message_text(send(config.chat_url, headers, body, config.timeout_s))
        except JudgeRequestError as exc:
            error = exc
        except OSError as exc:  # from a custom transport that does not wrap its connection errors
            error = JudgeRequestError(f"connection failed: {exc}", retryable=True)
        else:
            return Judgement(score=parse_score(text, config.max_score), raw=text, error=None, attempts=attempts)
        if not error.retryable or attempts > config.max_retries:
            return Judgement(score=None, raw=None, error=str(error), attempts=attempts)
        delay = config.retry_backoff_s * 2 ** (attempts - 1)
        time.sleep(delay if error.retry_after_s is None else max(delay, error.retry_after_s))
