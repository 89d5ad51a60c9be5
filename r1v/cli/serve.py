"""`r1v serve MODEL_OR_RUN_OR_STAGE [--config FILE] [key.path=value ...]`: an OpenAI-compatible chat server for a
model directory, a run's last trained model, or a stage's model (`RUN/stages/NAME`), on Ray Serve.

The argument is resolved as `r1v export` resolves it (`r1v.cli.export.model_dir_of`); a projector-only stage's
model (a manifest) is served as it is, without an export. Settings: `r1v.serve.config.ServeConfig`
(docs/serving.md). API keys come from an environment variable or a file only, never from the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pydantic
import yaml

from r1v.cli.export import ExportError, model_dir_of
from r1v.core.config import ConfigError, format_errors
from r1v.core.overrides import apply_overrides
from r1v.serve.config import ServeConfig


def load_config(path: str | None, overrides: list[str]) -> ServeConfig:
    """The ServeConfig of an optional YAML file plus `a.b=c` overrides; a ConfigError naming file and key."""
    raw = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a serve config is a mapping")
    raw = apply_overrides(raw, overrides)
    try:
        return ServeConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ConfigError(_errors(path or "command line", e)) from None


def _errors(source: str, e: pydantic.ValidationError) -> str:
    """The config's errors, one a line; the values of unknown keys and of the api_key_* settings are not repeated
    (a key put there by mistake must not reach a terminal or a log)."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden" or loc.startswith("api_key"):
            hint = (" (API keys are read only from the environment variable api_key_env names, R1V_API_KEY by "
                    "default, or from api_key_file)" if "key" in loc.lower() else "")
            lines.append(f"{source}: {loc}: {err['msg']}{hint}")
        else:
            lines.append(format_errors(source, "", pydantic.ValidationError.from_exception_data(e.title, [err])))
    return "\n".join(lines)


def resolve(src: str, stage: str | None = None) -> tuple[str, str]:
    """(model directory, default served name) for a model, stage or run directory."""
    model = model_dir_of(src, stage)
    base = Path(src).resolve()
    name = f"{base.name}-{stage}" if stage else base.name
    return str(model.resolve()), name


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        model_dir, default_name = resolve(args.src, args.stage)
    except (ConfigError, ExportError, FileNotFoundError) as e:
        print(f"r1v serve: error: {e}", file=sys.stderr)
        return 2
    # imported on use, to keep torch, transformers, ray, fastapi out of light paths
    from r1v.model.convert import hf_view
    from r1v.serve.limits import StartupError, check_startup, key_digests, load_keys

    try:
        digests = key_digests(load_keys(cfg))
        check_startup(cfg, digests)  # a non-loopback host without a key: refused before anything starts
    except StartupError as e:
        print(f"r1v serve: error: {e}", file=sys.stderr)
        return 2
    # imported on use, to keep ray, fastapi, torch out of light paths
    from r1v.serve.app import serve_model
    from r1v.serve.front import bind

    try:
        sock = bind(cfg.host, cfg.port)  # first: a taken port or a foreign address fails before anything starts
    except OSError as e:
        print(f"r1v serve: error: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    model_dir = str(hf_view(model_dir))  # an InternVL-chat checkpoint converted once, here, not in each replica
    try:
        serve_model(cfg, model_dir, cfg.name or default_name, digests, sock, verbose=args.verbose,
                    announce=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        pass
    return 0


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a model, run or stage as an OpenAI-compatible chat API (Ray Serve)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("src", help="model directory, run directory (its last model stage, or --stage) or stage directory")
    s.add_argument("overrides", nargs="*", help="config overrides key.path=value (e.g. port=8001 "
                   "limits.max_images=2 replicas.num_replicas=2)")
    s.add_argument("--config", help="serve config YAML (r1v.serve.config.ServeConfig)")
    s.add_argument("--stage", help="with a run directory: the stage whose model to serve")
    s.add_argument("-v", "--verbose", action="store_true", help="print Ray's and the replicas' logs")
    s.set_defaults(fn=cmd_serve)
