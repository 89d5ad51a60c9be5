"""`r1v serve`: the chat server as a Ray Serve application.

- `ChatDeployment`, a Serve deployment with a FastAPI ingress: each replica holds a `ChatService` (one engine of
  the generation service in its process); its `generate` is a `serve.batch` method, so concurrent requests are
  gathered into shared engine calls. Replicas (fixed or autoscaled) and resources come from the config.
- `serve_model` starts it all on one machine's (or a joined) Ray cluster: Serve's HTTP proxy on 127.0.0.1 at an
  internal port, and r1v's front (`r1v.serve.front`) on the configured host and port, which is what clients
  reach; it blocks until SIGINT/SIGTERM.
- `local_app` puts a `ChatService` behind the same routes without Ray (tests, debugging).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from r1v.serve.chat import ChatService, Job
from r1v.serve.config import ServeConfig
from r1v.serve.front import Front, bind, server
from r1v.serve.limits import INTERNAL, ServeError, require_key

log = logging.getLogger("r1v.serve")

APP_NAME = "r1v"
REPLICA_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------ routes


def make_api() -> FastAPI:
    """A FastAPI app with OpenAI-style answers for unknown routes, wrong methods and unhandled errors; no docs
    routes (nothing but the API is served)."""
    api = FastAPI(title="r1v", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no route {request.url.path}", 405: "method not allowed"}.get(exc.status_code, "request refused")
        return JSONResponse(ServeError(exc.status_code, msg).body(), status_code=exc.status_code)

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse(ServeError(500, INTERNAL).body(), status_code=500)

    return api


def _answer(status: int, body: Any) -> Response:
    if isinstance(body, dict):
        return JSONResponse(body, status_code=status)
    return StreamingResponse(body, status_code=status, media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


async def _stream(request: Request) -> AsyncIterator[bytes]:
    """The request body; a client that disconnects mid-body is a 400 (nobody reads it), not a server error."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ServeError(400, "the client disconnected") from None


async def chat_route(service: ChatService, request: Request) -> Response:
    status, body = await service.chat(request.scope["headers"], _stream(request))
    return _answer(status, body)


def keyed(service: ChatService, request: Request, answer: Callable[[], dict[str, Any]]) -> Response:
    try:
        require_key(service.digests, request.scope["headers"])
    except ServeError as e:
        return JSONResponse(e.body(), status_code=e.status)
    return JSONResponse(answer())


api = make_api()


@serve.deployment(name="chat")
@serve.ingress(api)
class ChatDeployment:
    """One replica: a ChatService whose jobs go through `serve.batch`."""

    def __init__(self, cfg_json: str, model_dir: str, name: str, digests: list[bytes]) -> None:
        cfg = ServeConfig.model_validate_json(cfg_json)
        self.service = ChatService(cfg, model_dir, name, digests)
        self.service.submit = self._submit
        self.generate.set_max_batch_size(cfg.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate(self, jobs: list[Job]) -> list[Any]:
        return await self.service.run_batch(jobs)

    async def _submit(self, job: Job) -> Any:
        res = await self.generate(job)
        if isinstance(res, BaseException):
            raise res
        return res

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await chat_route(self.service, request)

    @api.get("/v1/models")
    def models(self, request: Request) -> Response:
        return keyed(self.service, request, self.service.models)

    @api.get("/r1v/stats")
    def stats(self, request: Request) -> Response:
        return keyed(self.service, request, lambda: dict(self.service.stats))

    @api.get("/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    def check_health(self) -> None:  # Serve's replica health check
        if self.service.executor._shutdown:
            raise RuntimeError("engine executor stopped")


def local_app(service: ChatService) -> FastAPI:
    """The same routes around one ChatService in this process, without Ray (jobs run one at a time)."""
    app = make_api()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await chat_route(service, request)

    @app.get("/v1/models")
    def models(request: Request) -> Response:
        return keyed(service, request, service.models)

    @app.get("/r1v/stats")
    def stats(request: Request) -> Response:
        return keyed(service, request, lambda: dict(service.stats))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


# ------------------------------------------------------------------------------------------------ running


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """The Serve deployment options of `cfg`: replicas (fixed or autoscaled), each replica's resources."""
    r = cfg.replicas
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus,
                              "runtime_env": {"env_vars": REPLICA_ENV}},
        "max_ongoing_requests": r.max_ongoing_requests,
        "health_check_period_s": 10, "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 5,
    }
    if r.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                      "initial_replicas": max(1, r.min_replicas),
                                      "target_ongoing_requests": r.target_ongoing_requests}
    else:
        opts["num_replicas"] = r.num_replicas
    return opts


def deployment(cfg: ServeConfig, model_dir: str, name: str, digests: list[bytes]) -> Any:
    """The bound Serve application for `cfg`."""
    return ChatDeployment.options(**deployment_options(cfg)).bind(cfg.model_dump_json(), model_dir, name, digests)


def build(args: dict[str, Any]) -> Any:
    """The application for a Serve config file or KubeRay RayService (`import_path: r1v.serve.app:build`, see
    cluster/rayservice.yaml): `args` are ServeConfig settings plus `model`, a model directory (a stage's `model`
    output, a manifest included). There the cluster's own Serve proxy faces the clients, without r1v's front: the
    replicas still check keys and every limit, but the proxy buffers request bodies (docs/serving.md). API keys are
    required (the proxy is reachable from the cluster's network); they come from the environment variable or file
    the config names, in the process that builds the application."""
    # imported on use, to keep torch, safetensors out of this module's import
    from r1v.model.convert import hf_view
    from r1v.serve.limits import StartupError, key_digests, load_keys

    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise StartupError("args.model: the model directory to serve")
    cfg = ServeConfig.model_validate(args)
    digests = key_digests(load_keys(cfg))
    if not digests:
        raise StartupError("no API key: set R1V_API_KEY (or api_key_env / api_key_file) where the application is built")
    model_dir = str(hf_view(model))
    return deployment(cfg, model_dir, cfg.name or os.path.basename(os.path.dirname(model_dir.rstrip("/"))),
                      digests)


def _free_port() -> int:
    s = bind("127.0.0.1", 0)
    try:
        return s.getsockname()[1]
    finally:
        s.close()


def start_serve(cfg: ServeConfig, model_dir: str, name: str, digests: list[bytes]) -> str:
    """Start Ray Serve (proxy on 127.0.0.1 only) with the chat application; its base URL once replicas answer."""
    port = cfg.internal_port or _free_port()
    lim = cfg.limits
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": lim.request_timeout_s + lim.image_fetch_timeout_s + 20,
                              "keep_alive_timeout_s": lim.keep_alive_s})
    serve.run(deployment(cfg, model_dir, name, digests), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}"


def init_ray(cfg: ServeConfig, verbose: bool = False) -> bool:
    """Join `ray.address` (or RAY_ADDRESS), else start a local cluster of this process's own; whether it started
    Ray here (then the caller shuts it down)."""
    # imported on use, to keep ray's worker noise switches ahead of its import
    from r1v.core.loopback import loopback_only
    from r1v.core.noise import quiet_libraries

    quiet_libraries(verbose)
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose)
    else:
        loopback_only()  # the server's own cluster
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=verbose)
    return True


def serve_model(cfg: ServeConfig, model_dir: str, name: str, digests: list[bytes], sock: Any = None,
                verbose: bool = False, announce: Callable[[str], None] = print) -> None:
    """Serve `model_dir` as `name` until SIGINT/SIGTERM: Ray (local or joined), the Serve application, the front
    on `sock` (default: bound to cfg.host:cfg.port). `digests` are the API keys' SHA-256
    (`r1v.serve.limits.key_digests`)."""
    import ray

    sock = sock or bind(cfg.host, cfg.port)
    started = init_ray(cfg, verbose)
    try:
        upstream = start_serve(cfg, model_dir, name, digests)
        _wait_ready(upstream)
        front = server(Front(upstream, cfg, digests), cfg)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        announce(f"r1v serve: model {name!r} on http://{shown}:{port}/v1 "
                 f"({'API key required' if digests else 'no API key'}; Ray Serve at {upstream})")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        front.run(sockets=[sock])
    finally:
        sock.close()
        if started:  # our own cluster: stopping it stops Serve and the replicas at once
            ray.shutdown()
        else:  # a joined cluster: remove this application only
            serve.delete(APP_NAME)


def _wait_ready(upstream: str, timeout_s: float = 600.0) -> None:
    """Wait until the application answers /health (its replicas have loaded the model)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(upstream + "/health", timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Serve application did not become ready within {timeout_s:g} s")
        time.sleep(0.5)
