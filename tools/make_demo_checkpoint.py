"""Reproduce the demo's shipped pretrained DiT-T/4 (``ddkit:mnist-dit-t4``).

    python tools/make_demo_checkpoint.py            # trains (configs/mnist-pretrain.yaml), then exports
    python tools/make_demo_checkpoint.py --export-only

Training is ``ddkit run configs/mnist-pretrain.yaml --stage shard --stage pretrain`` (10,000 fp32 steps at
batch 64: ~40 min on 2 idle Xeon cores, resumable). The export writes the EMA weights as a diffusers
``save_pretrained`` folder into ``ddkit/assets/mnist-dit-t4`` (safetensors, ~8 MB) plus ``ddkit.json``
(steps, config, source checkpoint hash), atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export(stage_dir: Path, out: Path) -> Path:
    """Write the EMA of ``stage_dir``'s checkpoint as a diffusers DiT folder at ``out``."""
    import torch

    from ddkit.config import to_dict
    from ddkit.models import load_backbone, resolve_checkpoint
    from ddkit.models.backbone import make_dit

    ckpt = resolve_checkpoint(stage_dir)
    if ckpt is None:
        raise SystemExit(f"{stage_dir}: no checkpoint; train first")
    model, mcfg = load_backbone(ckpt, use_ema=True)
    # The Backbone ties the per-block conditioning embedders (one shared table, as in DiT); a fresh untied
    # diffusers module takes the same values so safetensors stores plain, unshared tensors.
    dit = make_dit(mcfg, init=False)
    dit.load_state_dict({k: v.clone() for k, v in model.dit.state_dict().items()})
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dit.save_pretrained(tmp, safe_serialization=True)
    meta = {
        "made_by": "tools/make_demo_checkpoint.py",
        "arch": mcfg.arch,
        "steps": int(state["step"]),
        "weights": "ema",
        "source_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "model_config": to_dict(mcfg),
        "train_config": state["config"].get("pretrain"),
        "made_on": state.get("made_on"),  # the data's classes (ddkit.models.provenance)
    }
    (tmp / "ddkit.json").write_text(json.dumps(meta, indent=2) + "\n")
    for f in tmp.iterdir():  # package data: readable by everyone who can read the package
        f.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist-pretrain.yaml"))
    ap.add_argument("--export-only", action="store_true", help="export the existing run's checkpoint")
    ap.add_argument("--out", default=str(ROOT / "ddkit" / "assets" / "mnist-dit-t4"))
    args = ap.parse_args()

    from ddkit.config import load_config
    from ddkit.pipeline import run_pipeline

    cfg = load_config(args.config)
    if not args.export_only:
        run_pipeline(cfg, stages=("shard", "pretrain"))
    print(export(Path(cfg.run_dir) / "pretrain", Path(args.out)))


if __name__ == "__main__":
    main()
