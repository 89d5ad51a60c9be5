"""The config of `r1v serve`: one typed tree (pydantic, core only), read from an optional YAML file and `a.b=c`
overrides. docs/serving.md explains each part; the defaults are the safe ones.

API keys are never config values: the config names an environment variable or a file that holds them, so a key
never appears on a command line (visible to every user in `ps`), in a config dump or in a log.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, model_validator

from r1v.core.config import EvalEngineConfig, PreprocessConfig, RayConfig, Strict

DEFAULT_KEY_ENV = "R1V_API_KEY"


class LimitsConfig(Strict):
    """What one request may ask for; each limit refused with a 4xx OpenAI-style error."""

    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="request body size (data-URL images included); "
                                "refused by Content-Length before anything is read, and a body sent without one "
                                "is cut at this size")
    max_messages: int = Field(64, ge=1, description="messages per request")
    max_images: int = Field(8, ge=0, description="images per request")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height of one image, read from its header "
                                  "before it is decoded (decompression bombs never reach the decoder)")
    max_tokens: int | None = Field(None, ge=1, description="completion tokens per choice; None: the model's "
                                   "context. Never more than the context, and prompt + max_tokens must fit in it")
    default_max_tokens: int = Field(1024, ge=1, description="max_tokens of a request that gives none (cut to "
                                    "what fits in the context)")
    max_n: int = Field(8, ge=1, description="choices per request")
    max_total_tokens: int = Field(16384, ge=1, description="n x max_tokens: the tokens one request may generate")
    request_timeout_s: float = Field(300.0, gt=0, description="a request's deadline from its arrival at the "
                                     "replica to its answer (waiting for a batch included): past it, 504")
    body_timeout_s: float = Field(30.0, gt=0, description="the whole body must arrive within this, else 408")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a complete request head within "
                                    "this (after connecting, or after its previous request): slow-header clients "
                                    "are cut off")
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(256, ge=1, description="open connections (and requests in flight) at the front; "
                                 "more get 503")
    allowed_image_hosts: list[str] = Field(default_factory=list, description="hosts (`host` or `host:port`) that "
                                           "`image_url` may fetch from over http(s); empty (the default): only "
                                           "data: URLs, the server never fetches anything. file: URLs are always "
                                           "refused")
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="deadline of one allowed image fetch")


class BatchingConfig(Strict):
    max_batch_size: int = Field(16, ge=1, description="requests gathered into one engine call (`serve.batch`); "
                                "requests with the same sampling settings share its forward passes")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long the first request of a batch waits for "
                                        "others")


class ReplicasConfig(Strict):
    """Ray Serve replicas; each holds one engine (the model) in its process."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count (without autoscaling)")
    autoscaling: bool = Field(False, description="scale between min_replicas and max_replicas on load")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests in flight per replica that autoscaling "
                                           "aims at")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica accepts at once (Serve queues "
                                      "the rest); at least batching.max_batch_size")

    @model_validator(mode="after")
    def _bounds(self) -> ReplicasConfig:
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class ServeConfig(Strict):
    """`r1v serve`: an OpenAI-compatible chat server (Ray Serve) for one model."""

    name: str | None = Field(None, description="the model id clients send (`model`); default: the name of the "
                             "directory given on the command line")
    host: str = Field("127.0.0.1", description="address to listen on; anything but loopback requires API keys")
    port: int = Field(8000, ge=0, le=65535, description="0: a free port (printed at start)")
    internal_port: int = Field(0, ge=0, le=65535, description="Ray Serve's own HTTP proxy, on 127.0.0.1 only, "
                               "behind r1v's front; 0: a free port")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description=f"environment variable holding the API keys (comma or "
                                    f"whitespace separated); None: {DEFAULT_KEY_ENV} if it is set. A variable named "
                                    f"here must be set")
    api_key_file: str | None = Field(None, description="file holding the API keys, one a line (# comments); it "
                                     "must not be readable by other users")
    engine: EvalEngineConfig = Field(EvalEngineConfig(), description="the engine of each replica (`r1v.generation`"
                                     "): kind transformers or vllm, dtype, max_batch, its CPUs and GPUs")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica; None: engine.num_cpus")
    preprocess: PreprocessConfig = Field(PreprocessConfig(max_length=8192), description="image tiling and the "
                                         "longest prompt (max_length, images' tokens included)")
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    replicas: ReplicasConfig = ReplicasConfig()
    ray: RayConfig = Field(RayConfig(num_cpus=None), description="address: join a cluster (run `r1v serve` on its "
                           "head node); None: a local one of num_cpus")

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if self.engine.num_engines != 1:
            raise ValueError("engine.num_engines: each replica holds one engine; scale with replicas.num_replicas")
        if self.replicas.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(f"replicas.max_ongoing_requests {self.replicas.max_ongoing_requests} < "
                             f"batching.max_batch_size {self.batching.max_batch_size}: no batch could fill")
        return self

    def threads(self) -> int:
        """Torch threads of each replica's engine."""
        return self.torch_threads or max(1, int(self.engine.num_cpus))


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
