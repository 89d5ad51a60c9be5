"""`r1v export RUN_OR_STAGE_OR_MODEL_DIR --out DIR [--layout hf|internvl-chat] [--stage NAME]`: a complete
checkpoint on demand.

Stages that train only the projector write it plus a manifest of the frozen parts (`r1v.model.manifest`); this
writes the whole model, tensor by tensor in the dtypes they are stored in: the HF layout (loads with transformers'
InternVLForConditionalGeneration and vLLM) or the InternVL-chat / Skywork-R1V layout (`r1v.model.convert`).

The source is a model directory (manifest or full), a stage directory (`RUN/stages/NAME`: its `model` output) or a
run directory: its last finished stage (in workflow order) whose `model` output is a VLM, or `--stage NAME`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from r1v.core.fs import read_json
from r1v.model.manifest import is_manifest_dir
from r1v.workflow.runner import Runner, topo_order


class ExportError(ValueError):
    """The source names no model to export; the message says what was looked for."""


def _stage_model(state: dict, where: str) -> Path:
    model = (state.get("outputs") or {}).get("model")
    if state.get("status") != "done" or not model:
        raise ExportError(f"{where}: status {state.get('status')!r}, model output {model!r}: no finished model")
    return Path(model)


def model_dir_of(src: str | Path, stage: str | None = None) -> Path:
    """The model directory that `src` (model, stage or run directory) stands for."""
    p = Path(src)
    if (p / "run.json").is_file():
        # imported on use, to keep torch out of light paths
        from r1v.generation.engines import is_vlm_dir

        runner = Runner.open(p)
        order = topo_order(runner.wf)
        if stage is not None:
            if stage not in order:
                raise ExportError(f"{p}: no stage {stage!r} (stages: {order})")
            return _stage_model(runner.state(stage), f"{p} stage {stage!r}")
        for name in reversed(order):
            st = runner.state(name)
            model = (st.get("outputs") or {}).get("model")
            if st.get("status") == "done" and model and Path(model, "config.json").is_file() and is_vlm_dir(model):
                return Path(model)
        raise ExportError(f"{p}: no finished stage has a VLM `model` output")
    if stage is not None:
        raise ExportError(f"--stage applies to a run directory, and {p} is not one (no run.json)")
    if (p / "config.json").is_file():
        return p
    if (p / "state.json").is_file():
        return _stage_model(read_json(p / "state.json") or {}, f"stage directory {p}")
    raise FileNotFoundError(f"{p}: neither a model (config.json), a stage (state.json) nor a run (run.json) directory")


def export(src: str | Path, out: str | Path, layout: str = "hf", stage: str | None = None,
           variant: str | None = None, template: str | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write the model `src` stands for as a complete checkpoint in `layout` at `out` (atomically)."""
    # imported on use, to keep torch, safetensors, numpy out of light paths
    from r1v.model.convert import DEFAULT_SHARD_BYTES, detect_layout, to_internvl_chat
    from r1v.model.full_export import export_full

    shard = max_shard_bytes or DEFAULT_SHARD_BYTES
    model = model_dir_of(src, stage)
    if layout == "hf":
        if variant or template:
            raise ExportError("--variant and --template apply to --layout internvl-chat only")
        return export_full(model, out, shard)
    if layout != "internvl-chat":
        raise ExportError(f"layout must be 'hf' or 'internvl-chat', got {layout!r}")
    if not is_manifest_dir(model) and detect_layout(model) == "hf":
        return to_internvl_chat(model, out, variant=variant, template=template, max_shard_bytes=shard)
    target = Path(out).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.hf-", dir=target.parent))
    try:  # the full HF checkpoint first, then converted key by key
        hf = export_full(model, tmp / "hf", shard)
        return to_internvl_chat(hf, target, variant=variant, template=template, max_shard_bytes=shard)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        out = export(args.src, args.out, args.layout, args.stage, args.variant, args.template,
                     int(args.max_shard_gb * 2**30))
    except ValueError as e:  # ExportError, ConversionError, ManifestError (a changed or missing part)
        print(f"r1v: error: {e}", file=sys.stderr)
        return 2
    print(f"r1v: wrote {out}")
    return 0


def add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="write a complete checkpoint of a run's, stage's or model directory's model")
    e.add_argument("src", help="run directory (its last model stage, or --stage), stage directory or model directory")
    e.add_argument("--out", required=True, help="output directory (replaced atomically)")
    e.add_argument("--layout", choices=["hf", "internvl-chat"], default="hf", help="checkpoint layout (default hf)")
    e.add_argument("--stage", help="with a run directory: the stage whose model to export")
    e.add_argument("--variant", choices=["internvl", "skywork"],
                   help="internvl-chat flavour: InternVLChatModel or SkyworkR1VChatModel (default internvl)")
    e.add_argument("--template", help="internvl-chat `template` field (default internvl2_5)")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5)")
    e.set_defaults(fn=cmd_export)
