"""`r1v model convert --to hf|internvl-chat SRC --out DST`: checkpoints between r1v's HF layout and the
InternVL-chat layout of the released Skywork-R1V weights."""

from __future__ import annotations

import argparse
import sys


def cmd_convert(args: argparse.Namespace) -> int:
    # imported on use, to keep torch, safetensors, numpy out of light paths
    from r1v.model.convert import ConversionError, to_hf, to_internvl_chat

    shard = int(args.max_shard_gb * 2**30)
    try:
        if args.to == "hf":
            if args.variant or args.template:
                raise ConversionError("--variant and --template apply to --to internvl-chat only")
            out = to_hf(args.src, args.out, max_shard_bytes=shard)
        else:
            out = to_internvl_chat(
                args.src, args.out, variant=args.variant, template=args.template, max_shard_bytes=shard
            )
    except ConversionError as e:
        print(f"r1v: error: {e}", file=sys.stderr)
        return 2
    print(f"r1v: wrote {out}")
    return 0


def add_model_parser(sub) -> None:
    m = sub.add_parser("model", help="model checkpoints: convert between the HF and InternVL-chat layouts")
    ms = m.add_subparsers(dest="model_command", required=True)
    c = ms.add_parser("convert", help="convert a checkpoint key by key (shapes checked, written atomically)")
    c.add_argument("src", help="source checkpoint directory")
    c.add_argument("--to", required=True, choices=["hf", "internvl-chat"], help="layout to write")
    c.add_argument("--out", required=True, help="output directory (replaced atomically)")
    c.add_argument(
        "--variant",
        choices=["internvl", "skywork"],
        help="internvl-chat flavour: InternVLChatModel or SkyworkR1VChatModel (default: the one the "
        "source was converted from, else internvl)",
    )
    c.add_argument("--template", help="internvl-chat `template` field (default: the source's, else internvl2_5)")
    c.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5)")
    c.set_defaults(fn=cmd_convert)
