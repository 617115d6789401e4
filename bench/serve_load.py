"""Bounded load against a local `tunelab serve`: concurrent streaming chat requests with the official openai client.

Builds the tiny demo-shaped model (random weights, tokenizer trained on the bundled corpus), starts
`tunelab serve --port 0` on 127.0.0.1 for each --max-concurrency value, and sends ROUNDS rounds of REQUESTS
concurrent streaming requests. Every request asks for exactly --tokens tokens (``min_tokens`` = ``max_tokens``),
so each has the same work and a complete answer is checkable: the stream must start with the assistant role,
carry text, end with one ``finish_reason`` (``length``), and report usage of exactly --tokens completion tokens.
Prints requests/s, completion tokens/s, p50/p95 latency and time to first token, and the error count (the exit
status is 1 unless it is 0 and every answer is complete).

    python bench/serve_load.py [--requests 64] [--rounds 3] [--tokens 32] [--concurrency 1,4,8] [--threads 1]

Bounded: at most requests x rounds x len(concurrency) requests, each round under --round-timeout seconds, all on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

READY = "tunelab serve: listening on"
QUESTIONS = ["帮我把红色的卫衣加入购物车，要L码。", "What is the price of the black jacket?", "这款运动鞋还有货吗？",
             "Add two blue hoodies in size M to my cart."]


@dataclass
class Outcome:
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Result:
    concurrency: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0


def build_model(out: Path) -> Path:
    from tunelab.demo.tiny import save_tiny

    corpus = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    return save_tiny(out, corpus.splitlines(), vocab_size=3000, hidden_size=64, num_layers=2)


def start_server(
    model: Path, concurrency: int, queue: int, threads: int | None, log: Path
) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tunelab.cli", "serve", "--model", str(model), "--served-model-name", "tiny",
               "--port", "0", "--max-concurrency", str(concurrency), "--max-queue", str(queue)]
    command += ["--threads", str(threads)] if threads else []
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    with log.open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    deadline = time.monotonic() + 120
    assert process.stdout is not None
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline()
            if line.startswith(READY):
                return process, line.split()[4]
    process.kill()
    raise SystemExit(f"server did not start:\n{log.read_text()[-2000:]}")


async def one_request(client, index: int, tokens: int) -> Outcome:
    outcome = Outcome()
    started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"min_tokens": tokens})
        roles, finishes, text, usage = [], [], [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.delta.role)
                if choice.delta.content:
                    if outcome.ttft is None:
                        outcome.ttft = time.perf_counter() - started
                    text.append(choice.delta.content)
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        outcome.latency = time.perf_counter() - started
        outcome.tokens = usage.completion_tokens if usage else 0
        problems = [what for what, bad in (
            ("no assistant role first", roles != ["assistant"]), ("no text", not "".join(text)),
            (f"finish_reason {finishes}", finishes != ["length"]),
            (f"usage {usage}", usage is None or usage.completion_tokens != tokens or usage.prompt_tokens < 1),
        ) if bad]
        outcome.error = "; ".join(problems) or None
    except Exception as exc:  # counted and shown, never hidden
        outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.latency = time.perf_counter() - started
    return outcome


async def run_rounds(url: str, requests: int, rounds: int, tokens: int, timeout: float, result: Result) -> None:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    await one_request(client, 0, tokens)  # warm-up, not counted
    for _ in range(rounds):
        started = time.perf_counter()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one_request(client, i, tokens) for i in range(requests))), timeout)
        result.wall += time.perf_counter() - started
        result.outcomes += outcomes
    await client.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(results: list[Result], args: argparse.Namespace) -> int:
    print(f"\ndevice: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
          f"torch {torch.__version__}, server --threads {args.threads or 'default'}; {args.requests} concurrent "
          f"streaming requests x {args.rounds} rounds, {args.tokens} tokens each; load average before: "
          f"{args.load_before:.1f}\n")
    print("| --max-concurrency | requests | errors | requests/s | tokens/s | latency p50 / p95 (s) "
          "| TTFT p50 / p95 (s) |")
    print("|---:|---:|---:|---:|---:|---|---|")
    failed = 0
    for r in results:
        errors = [o.error for o in r.outcomes if o.error]
        failed += len(errors)
        latency = [o.latency for o in r.outcomes if not o.error]
        ttft = [o.ttft for o in r.outcomes if o.ttft is not None]
        tokens = sum(o.tokens for o in r.outcomes)
        print(f"| {r.concurrency} | {len(r.outcomes)} | {len(errors)} | {len(r.outcomes) / r.wall:.1f} | "
              f"{tokens / r.wall:.0f} | {percentile(latency, 50):.2f} / {percentile(latency, 95):.2f} | "
              f"{percentile(ttft, 50):.2f} / {percentile(ttft, 95):.2f} |")
        for error in sorted(set(errors))[:5]:
            print(f"    error: {error}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated --max-concurrency values")
    parser.add_argument("--round-timeout", type=float, default=300)
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's --threads (default 1; 0 = torch's choice). A model this small gains nothing "
                             "from intra-op threads, and on a busy 2-core machine their spin-waiting made one stream "
                             "17x slower (38 vs 2.2 ms/token)")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    results = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model = build_model(Path(tmp) / "tiny")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            process, url = start_server(model, concurrency, args.requests, args.threads,
                                        Path(tmp) / f"server-{concurrency}.log")
            try:
                result = Result(concurrency)
                asyncio.run(run_rounds(url, args.requests, args.rounds, args.tokens, args.round_timeout, result))
                results.append(result)
                print(f"--max-concurrency {concurrency}: {len(result.outcomes)} requests in {result.wall:.1f}s",
                      flush=True)
            finally:
                process.terminate()
                process.wait(timeout=30)
    return report(results, args)


if __name__ == "__main__":
    sys.exit(main())
