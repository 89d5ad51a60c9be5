"""`r1v world build | show`: build the miniature world's backbones, or print a built world's figures."""

from __future__ import annotations

import argparse
import json

from r1v.core.config import ConfigError, format_errors
from r1v.core.overrides import apply_overrides


def cmd_build(args: argparse.Namespace) -> int:
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    from pydantic import ValidationError

    from r1v.world.build import WorldBuildConfig, build_world, reasoning_source, rebuild_reasoning, verify_world

    if (args.only is None) != (args.source is None):
        raise ConfigError("r1v world build: --only reasoning and --from WORLD go together")
    try:
        # a reasoning-only rebuild starts from its source's build config: the parts it reuses were made with it
        raw = verify_world(args.source)["build_config"] if args.source else {}
        c = WorldBuildConfig.model_validate(apply_overrides(raw, args.overrides))
        if args.source:
            reasoning_source(args.source, c)
    except ValidationError as e:
        raise ConfigError(format_errors("r1v world build", "", e)) from None
    except ValueError as e:  # a source that fails its checksums or ships no base, an override of what it reuses
        raise ConfigError(f"r1v world build: {e}") from None
    manifest = rebuild_reasoning(args.out, args.source, c) if args.source else build_world(args.out, c)
    print(json.dumps({k: manifest[k] for k in ("text_accuracy", "chains", "vision", "seconds")}, indent=2))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    # imported on use, to keep torch, transformers, pyarrow out of light paths
    from r1v.world.build import verify_world
    from r1v.world.load import world_dir

    manifest = verify_world(world_dir(args.world))
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print(f"{len(manifest['files'])} files, checksums verified")
    return 0


def add_world_parser(sub) -> None:
    w = sub.add_parser("world", help="the miniature world: build its backbones or show the shipped ones")
    ws = w.add_subparsers(dest="world_command", required=True)
    b = ws.add_parser("build", help="build the backbones (tokenizer, base LM, instruct and reasoning children, "
                                    "vision tower) from a seed, or only the reasoning child; minutes on 2 cores")
    b.add_argument("--out", required=True, help="output directory (replaced atomically)")
    b.add_argument("--only", choices=["reasoning"], help="rebuild only the reasoning child, from the base LM of "
                   "--from; copy the tokenizer, base, instruct child and vision tower")
    b.add_argument("--from", dest="source", metavar="WORLD", help="the built world --only reuses (it must ship "
                   "base_llm/); its build config is the starting point of the overrides")
    b.add_argument("overrides", nargs="*", help="build config overrides, e.g. seed=1 base_steps=600 overthink={}")
    b.set_defaults(fn=cmd_build)
    s = ws.add_parser("show", help="verify a built world's checksums and print its build config and figures")
    s.add_argument("--world", help="world directory (default: the one shipped in r1v)")
    s.set_defaults(fn=cmd_show)
