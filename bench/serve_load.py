"""Bounded load against a local `tunelab serve`: the batching engine against one `generate` per request.

Builds the tiny demo-shaped model (random weights, tokenizer trained on the bundled corpus) and starts two
`tunelab serve --port 0` processes on 127.0.0.1 with the same --max-concurrency: one batching
(`--max-batch-size` --batch-size) and one in the previous mode (`--max-batch-size 1`: each request runs its own
`generate` in a thread). Each gets one warm-up request, then ROUNDS rounds of REQUESTS concurrent streaming chat
requests go to one server and then the other, the order alternating every round, so both see the same machine
load. Every request asks for exactly --tokens tokens (``min_tokens`` = ``max_tokens``), so each has the same work
and a complete answer is checkable: the stream must start with the assistant role, carry text, end with one
``finish_reason`` (``length``), and report usage of exactly --tokens completion tokens. Prints, per mode,
requests/s, completion tokens/s, p50/p95 latency and time to first token, and the error count, then the ratios
(the exit status is 1 unless every answer is complete).

    python bench/serve_load.py [--requests 64] [--rounds 4] [--tokens 32] [--concurrency 8] [--batch-size 8]
                               [--threads 1]

Bounded: 2 x requests x rounds requests, each round under --round-timeout seconds, all on 127.0.0.1.
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
    mode: str
    batch_size: int
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.outcomes) / self.wall

    def latency(self, q: int) -> float:
        return percentile([o.latency for o in self.outcomes if not o.error], q)

    def ttft(self, q: int) -> float:
        return percentile([o.ttft for o in self.outcomes if o.ttft is not None], q)


def build_model(out: Path) -> Path:
    from tunelab.demo.tiny import save_tiny

    corpus = Path(str(resources.files("tunelab.resources").joinpath("demo_corpus.txt"))).read_text("utf-8")
    return save_tiny(out, corpus.splitlines(), vocab_size=3000, hidden_size=64, num_layers=2)


def start_server(
    model: Path, concurrency: int, batch_size: int, queue: int, threads: int | None, log: Path
) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tunelab.cli", "serve", "--model", str(model), "--served-model-name", "tiny",
               "--port", "0", "--max-concurrency", str(concurrency), "--max-batch-size", str(batch_size),
               "--max-queue", str(queue)]
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


async def run_rounds(urls: list[str], results: list[Result], args: argparse.Namespace) -> None:
    """Warm each server up, then alternate: round r goes to the servers in turn, starting with server r mod 2."""
    import openai

    clients = [openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=args.round_timeout)
               for url in urls]
    for client in clients:
        await one_request(client, 0, args.tokens)  # warm-up, not counted
    for round_index in range(args.rounds):
        order = range(len(clients)) if round_index % 2 == 0 else reversed(range(len(clients)))
        for i in order:
            started = time.perf_counter()
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(one_request(clients[i], k, args.tokens) for k in range(args.requests))),
                args.round_timeout)
            results[i].wall += time.perf_counter() - started
            results[i].outcomes += outcomes
            print(f"round {round_index + 1}, {results[i].mode}: {len(outcomes)} requests in "
                  f"{time.perf_counter() - started:.1f}s", flush=True)
    for client in clients:
        await client.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(results: list[Result], args: argparse.Namespace) -> int:
    print(f"\ndevice: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
          f"torch {torch.__version__}, server --threads {args.threads or 'default'}, --max-concurrency "
          f"{args.concurrency}; {args.requests} concurrent streaming requests x {args.rounds} rounds per mode, "
          f"{args.tokens} tokens each; load average before: {args.load_before:.1f}, after: "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| mode | --max-batch-size | requests | errors | requests/s | tokens/s | latency p50 / p95 (s) "
          "| TTFT p50 / p95 (s) |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    failed = 0
    for r in results:
        errors = [o.error for o in r.outcomes if o.error]
        failed += len(errors)
        tokens = sum(o.tokens for o in r.outcomes)
        print(f"| {r.mode} | {r.batch_size} | {len(r.outcomes)} | {len(errors)} | {r.requests_per_s:.1f} | "
              f"{tokens / r.wall:.0f} | {r.latency(50):.2f} / {r.latency(95):.2f} | "
              f"{r.ttft(50):.2f} / {r.ttft(95):.2f} |")
        for error in sorted(set(errors))[:5]:
            print(f"    error: {error}")
    batched, single = results
    print(f"\nbatched / one generate per request: requests/s x{batched.requests_per_s / single.requests_per_s:.2f}, "
          f"latency p50 x{batched.latency(50) / single.latency(50):.2f}, "
          f"p95 x{batched.latency(95) / single.latency(95):.2f}, TTFT p50 x{batched.ttft(50) / single.ttft(50):.2f}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode, alternating (default 4)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8, help="both servers' --max-concurrency (default 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="the batching server's --max-batch-size")
    parser.add_argument("--round-timeout", type=float, default=300)
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's --threads (default 1; 0 = torch's choice). A model this small gains nothing "
                             "from intra-op threads, and on a busy 2-core machine their spin-waiting made one stream "
                             "17x slower (38 vs 2.2 ms/token)")
    args = parser.parse_args()
    args.load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    results = [Result("batched", args.batch_size), Result("one generate per request", 1)]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model = build_model(Path(tmp) / "tiny")
        processes, urls = [], []
        try:
            for result in results:
                process, url = start_server(model, args.concurrency, result.batch_size, args.requests, args.threads,
                                            Path(tmp) / f"server-{result.batch_size}.log")
                processes.append(process)
                urls.append(url)
            asyncio.run(run_rounds(urls, results, args))
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=30)
    return report(results, args)


if __name__ == "__main__":
    sys.exit(main())
