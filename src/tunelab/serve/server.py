"""``tunelab serve``: load the models, bind the socket, run uvicorn (or hand everything to vLLM)."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import socket
from typing import Any

from tunelab.errors import ConfigError, RunError

API_KEY_ENV = "TUNELAB_API_KEY"
READY_LINE = "tunelab serve: listening on"


def require_serve_extra() -> None:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise RunError(f"tunelab serve needs {' and '.join(missing)}: pip install 'tunelab[serve]'")


def serve(args: argparse.Namespace, console: Any) -> int:
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue: must be 0 or more, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: must be 0..65535, got {args.port}")
    if args.engine == "vllm":
        from tunelab.serve.vllm import run_vllm

        return run_vllm(args, api_key, console)
    require_serve_extra()
    import torch
    import uvicorn

    from tunelab.serve.app import ServeLimits, build_app
    from tunelab.serve.engine import ModelPool

    if not _is_loopback(args.host) and api_key is None:
        console.print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
                      markup=False, highlight=False)
    sock = _bind(args.host, args.port)  # before loading: a busy port fails fast
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pool = ModelPool(args.model, args.adapter, base_id=args.served_model_name, template=args.template,
                     dtype=args.dtype, device=args.device)
    limits = ServeLimits(max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                         max_batch_size=args.max_batch_size, max_tokens_limit=args.max_tokens_limit,
                         max_request_bytes=args.max_request_bytes, api_key=api_key)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    ready = f"{READY_LINE} {url} (models: {', '.join(pool.ids)})"
    # Keep idle connections open longer than clients keep them in their pools (httpx, under the openai client,
    # drops them after 5 s; uvicorn's default is also 5 s): otherwise the server may close a connection just as a
    # client sends a request on it, and that request fails with a connection error.
    config = uvicorn.Config(build_app(pool, limits), log_level=args.log_level, timeout_graceful_shutdown=5,
                            timeout_keep_alive=75)
    _AnnouncingServer(config, ready).run(sockets=[sock])
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RunError(f"--host {host} --port {port}: cannot bind: {exc.strerror or exc}") from None
    return sock


def _announcing_server_class() -> type:
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        """Prints one line with the URL once the socket accepts connections (scripts and tests wait for it)."""

        def __init__(self, config: Any, line: str) -> None:
            super().__init__(config)
            self.line = line

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                print(self.line, flush=True)

    return AnnouncingServer


def _AnnouncingServer(config: Any, line: str) -> Any:
    return _announcing_server_class()(config, line)
