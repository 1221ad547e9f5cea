"""The generator bundle's contents: the weights a run sampled, resolved to local files, and the bundle check.

A generator bundle (``ddkit package --format eccv2024-generator``, :func:`ddkit.package.package_generator`)
runs with nothing but itself: the challenge binds it read-only at ``/bundle`` inside the image, with a clean
environment, ``HF_HUB_OFFLINE=1`` and no model cache. So packaging resolves every Hugging Face id to local
files (offline, from the local HF cache) and copies only what sampling reads, per dataset into
``weights/<dataset>/``:

* the backbone the run actually sampled (the generation manifest's ``checkpoint``; D^3HR and plain DiT
  sample ``model.pretrained`` unless ``generate.checkpoint`` was set, minimax samples ``RUN/minimax``, and
  so does mgd3 with ``generate.modes.weights: minimax``):
  a ddkit checkpoint becomes ``last.pt`` holding only the weights sampling used (the EMA unless
  ``generate.use_ema`` was off) and the ``model_config`` :func:`ddkit.models.load_backbone` needs, not the
  optimizer, training weights, RNG or minimax memories; a diffusers DiT (folder, pipeline or id) becomes
  ``transformer/`` (``config.json`` + the weights file, no other variants);
* the VAE that decodes (``model.vae_decoder``, else ``model.vae``) as ``vae/``, a diffusers
  ``AutoencoderKL`` folder :func:`ddkit.models.vae.load_vae` loads (encoder included: the folder stays a
  loadable model; sampling only runs the decoder);
* ``scheduler/scheduler_config.json``: the pipeline's own, else the schedule ddkit samples with
  (:func:`ddkit.schedule.scheduler_config`);
* for D^3HR, ``d3hr-stats.pt``: the run's class statistics (``RUN/d3hr-cache/d3hr-stats-*.pt``) whose
  cache key names the shipped backbone's weights, the shipped classes and the configured inversion, read
  at run time through ``generate.d3hr.statistics`` (:mod:`ddkit.methods.d3hr.precomputed`) since the
  bundle holds no training images to invert.

The bundle's config names them relative to the bundle (``generate.checkpoint``, ``model.vae_decoder``,
``generate.d3hr.statistics``, a ``generate.quality`` table); the inputs of earlier stages
(:data:`UNREAD_KEYS`: ``model.pretrained``, the encoder ``model.vae``, ...) are cleared, since sampling
from ``generate.checkpoint`` reads none of them. :func:`check_bundle` is what ``ddkit package --check
BUNDLE`` runs on one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ddkit.assets import asset_path
from ddkit.config import ExperimentConfig, from_dict, load_config
from ddkit.errors import ConfigError, DdkitError, PackageError
from ddkit.io import sha256_file
from ddkit.methods.registry import build
from ddkit.package.manifest import MANIFEST, CheckReport, Verdict
from ddkit.schedule import scheduler_config

#: Config keys that name weights or other files a bundle holds (dotted; relative to the bundle).
BUNDLE_PATHS = ("generate.checkpoint", "model.pretrained", "model.vae", "model.vae_decoder", "data.shards",
                "generate.d3hr.statistics", "generate.modes.file", "generate.quality", "data.encode_latents",
                "pretrain.init", "minimax.init")
#: Inputs of earlier stages that generation never reads: cleared in a bundle (they name host paths or ids).
UNREAD_KEYS = ("model.pretrained", "model.vae", "data.encode_latents", "pretrain.init", "minimax.init")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The weights file diffusers' from_pretrained reads (sharded or not); fp16/non-EMA variants are not copied.
_WEIGHTS = re.compile(r"^diffusion_pytorch_model(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")


# ----------------------------------------------------------------------------------------------------------
# Resolving what the run sampled
# ----------------------------------------------------------------------------------------------------------
def sampled_weights(d) -> tuple[str, str]:
    """``(config key, value)`` of the backbone a generation sampled (``d``: :class:`ddkit.package.Distilled`).

    The generation manifest's ``checkpoint`` (what :func:`ddkit.generate.generate` loaded) when recorded,
    else the rule of :func:`ddkit.generate.checkpoint_for` applied to the run's config.
    """
    gen = d.config.get("generate") or {}
    minimax = method_of(d).weights == "minimax"
    key = "generate.checkpoint" if gen.get("checkpoint") else (
        "minimax checkpoint (RUN/minimax)" if minimax else "model.pretrained")
    recorded = d.manifest.get("checkpoint")
    if recorded and not str(recorded).startswith("<"):
        return key, str(recorded)
    if gen.get("checkpoint"):
        return key, str(gen["checkpoint"])
    if minimax:
        return key, str(d.gen_dir.parent / "minimax")
    return key, str((d.config.get("model") or {}).get("pretrained") or d.gen_dir.parent / "pretrain")


def method_of(d):
    """The :class:`ddkit.methods.base.GenerationMethod` that made ``d`` (its manifest's ``method``, built on
    the generation's config).

    Raises:
        ConfigError: an unknown method.
    """

    cfg = from_dict(ExperimentConfig, d.config, str(d.gen_dir / "config.yaml"))
    return build(d.manifest.get("method") or d.gen_dir.name.removeprefix("gen-"), cfg)


def hf_snapshot(repo_id: str, key: str) -> Path:
    """The local snapshot folder of a Hugging Face repo, offline (``local_files_only``).

    Raises:
        PackageError: not in the local HF cache (one line naming ``key`` and the id).
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError, RepositoryNotFoundError, OSError...
        raise PackageError(
            f"{key}: Hugging Face id {repo_id!r} is not in the local HF cache (packaging is offline; "
            f"download it first, e.g. `hf download {repo_id}`): {type(e).__name__}"
        ) from None


def local_source(value: str, key: str, run_dir: Path) -> Path:
    """``value`` as a local path: itself, relative to ``run_dir``, a ``ddkit:NAME`` asset, or the local
    snapshot of a Hugging Face id.

    Raises:
        PackageError: none of these exists (an id missing from the cache names ``key`` and the id).
    """

    value = str(asset_path(value))
    for cand in (Path(value).expanduser(), run_dir / value):
        if cand.exists():
            return cand.absolute()
    if _HF_ID.match(value):
        return hf_snapshot(value, key)
    raise PackageError(f"{key}: {value} not found (neither a local path nor a Hugging Face id)")


def copy_model_files(folder: Path, dest: Path) -> None:
    """Copy a diffusers model folder's ``config.json`` and weights (symlinks in an HF cache followed).

    Raises:
        PackageError: no config or no weights file.
    """
    files = sorted(p for p in folder.iterdir() if _WEIGHTS.match(p.name)) if folder.is_dir() else []
    if any(p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json") for p in files):
        files = [p for p in files if ".safetensors" in p.name]
    if not (folder / "config.json").is_file() or not files:
        raise PackageError(f"{folder}: not a diffusers model folder (config.json + diffusion_pytorch_model.*)")
    dest.mkdir(parents=True)
    for p in [folder / "config.json", *files]:
        shutil.copy(p, dest / p.name)


def pack_backbone(value: str, key: str, run_dir: Path, dest: Path, *, use_ema: bool) -> Path:
    """Copy the sampled backbone into ``dest`` (a directory); return the bundled file or folder.

    Raises:
        PackageError: nothing loadable at ``value``.
    """
    from ddkit.models.checkpoint import resolve_checkpoint

    src = local_source(value, key, run_dir)
    ckpt = resolve_checkpoint(src)
    if ckpt is not None:
        return sampling_checkpoint(ckpt, dest / "last.pt", use_ema=use_ema)
    folder = src if (src / "config.json").is_file() else src / "transformer"
    copy_model_files(folder, dest / "transformer")
    return dest / "transformer"


def sampling_checkpoint(ckpt: Path, out: Path, *, use_ema: bool) -> Path:
    """Write ``out``: the weights sampling takes from ddkit checkpoint ``ckpt`` and its ``model_config``.

    Holds ``model`` (the EMA state dict, or the training weights when ``use_ema`` is off or the checkpoint
    has no EMA: what :func:`ddkit.models.load_backbone` would take), ``model_config``, and ``weights``,
    ``step``, ``stage``, ``source`` for the record. An original-DiT ``.pt`` is copied unchanged.

    Raises:
        PackageError: not a ddkit (or original-DiT) checkpoint.
    """
    import torch

    from ddkit.models.checkpoint import as_checkpoint, read_torch_file
    from ddkit.models.dit_original import original_state

    try:
        blob = read_torch_file(ckpt)
        if original_state(blob) is not None:
            shutil.copy(ckpt, out)
            return out
        state = as_checkpoint(blob, ckpt)
    except DdkitError as e:
        raise PackageError(str(e)) from None
    ema = use_ema and state.get("ema") is not None
    small = {"model": state["ema"] if ema else state["model"], "model_config": state["model_config"],
             "weights": "ema" if ema else "model", "step": state.get("step"), "stage": state.get("stage"),
             "source": str(ckpt)}
    torch.save(small, out)
    return out


def vae_folder(value: str, key: str, run_dir: Path) -> Path:
    """The ``AutoencoderKL`` folder ``value`` names (a VAE folder, a pipeline's ``vae/``, or an id's)."""
    src = local_source(value, key, run_dir)
    return src / "vae" if (src / "vae" / "config.json").is_file() else src


def write_scheduler(pretrained: str | None, run_dir: Path, num_train_timesteps: int, dest: Path) -> None:
    """``dest/scheduler_config.json``: the pipeline's own when ``pretrained`` is one, else ddkit's schedule."""

    dest.mkdir(parents=True)
    if pretrained:
        try:
            own = local_source(pretrained, "model.pretrained", run_dir) / "scheduler" / "scheduler_config.json"
        except PackageError:
            own = None
        if own is not None and own.is_file():
            shutil.copy(own, dest / "scheduler_config.json")
            return
    cfg = {"_class_name": "DDPMScheduler", **scheduler_config(num_train_timesteps)}
    (dest / "scheduler_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """``cfg["a"]["b"]["c"] = value`` for ``"a.b.c"``, creating sections."""
    *secs, last = dotted.split(".")
    for s in secs:
        if not isinstance(cfg.get(s), dict):
            cfg[s] = {}
        cfg = cfg[s]
    cfg[last] = value


def pack_weights(d, cfg_dict: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    """Copy what sampling needs for one dataset into ``tmp/weights/<name>/`` and point ``cfg_dict`` at it.

    Args:
        d: the run's :class:`ddkit.package.Distilled`.
        cfg_dict: the bundle config (a deep copy of the run's), changed in place.
        tmp: the bundle being written.
        name: the challenge dataset.

    Returns:
        The sources, for the manifest: ``{"checkpoint_source", "vae_source", "statistics_source"}``.

    Raises:
        PackageError: weights missing (an HF id not in the local cache names the key and the id), no
            D^3HR statistics for a D^3HR run, or no class modes for an MGD^3 run.
    """

    run_dir = d.gen_dir.parent
    cfg = from_dict(ExperimentConfig, d.config, str(d.gen_dir / "config.yaml"))
    wdir = tmp / "weights" / name
    wdir.mkdir(parents=True)
    rel = lambda p: str(p.relative_to(tmp))  # noqa: E731
    key, value = sampled_weights(d)
    weights = pack_backbone(value, key, run_dir, wdir, use_ema=cfg.generate.use_ema)
    set_key(cfg_dict, "generate.checkpoint", rel(weights))
    sources: dict[str, Any] = {"checkpoint_source": value, "vae_source": None, "statistics_source": None}
    decoder = cfg.model.vae_decoder or cfg.model.vae
    if decoder:
        key = "model.vae_decoder" if cfg.model.vae_decoder else "model.vae"
        copy_model_files(vae_folder(decoder, key, run_dir), wdir / "vae")
        set_key(cfg_dict, "model.vae_decoder", rel(wdir / "vae"))
        sources["vae_source"] = decoder
    # Sampling from generate.checkpoint reads none of these (the encoder only made the run's latents).
    for k in UNREAD_KEYS:
        set_key(cfg_dict, k, None)
    if cfg.generate.quality != "dsr":  # a measured (steps, ipc) -> accuracy table the planner reads
        table = local_source(cfg.generate.quality, "generate.quality", run_dir)
        shutil.copy(table, wdir / f"quality{table.suffix}")
        set_key(cfg_dict, "generate.quality", rel(wdir / f"quality{table.suffix}"))
    write_scheduler(cfg.model.pretrained, run_dir, cfg.model.num_train_timesteps, wdir / "scheduler")
    # What the method prepared from real data (D^3HR's statistics, MGD^3's modes): the bundle has none.
    for key, (src, name) in method_of(d).bundle_files(d, weights).items():
        dest = wdir / name
        shutil.copy(src, dest)
        set_key(cfg_dict, key, rel(dest))
        sources["statistics_source"] = str(src)
    return sources


# ----------------------------------------------------------------------------------------------------------
# Checking a bundle
# ----------------------------------------------------------------------------------------------------------
def check_bundle(path: str | Path, man: dict[str, Any], *, require_image: bool = True):
    """Validate a generator bundle (``ddkit package --check BUNDLE``): a :class:`ddkit.package.CheckReport`.

    Verdicts: ``sha256`` (every file the manifest lists is present and unchanged, and nothing else is
    there but an image built later), ``generate`` (the entry point exists, is executable and parses with
    ``sh -n``), ``ddkit.sif`` (the image; only with ``require_image``: ``package`` writes a bundle before
    the image is built), and
    per dataset ``configs/<dataset>.yaml``: the config loads, ``generate.checkpoint`` is set, every path in
    :data:`BUNDLE_PATHS` it names lies inside the bundle and exists (no Hugging Face id, no absolute
    path), the shard index ``dataset.json`` is there, and a D^3HR config names its statistics file.
    """

    path = Path(path)
    report = CheckReport(path, "eccv2024-generator")
    files = man.get("files") or {}
    bad = next((f"{r} listed in manifest.json is missing" for r in files if not (path / r).is_file()), None)
    bad = bad or next((f"{r} differs from manifest.json" for r, h in files.items() if sha256_file(path / r) != h),
                      None)
    # ddkit.sif may be built into the bundle after packaging (manifest "image": null)
    extra = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()
                   and str(p.relative_to(path)) not in files and str(p.relative_to(path)) not in (MANIFEST, "ddkit.sif"))
    bad = bad or (f"{extra[0]} is not listed in manifest.json" if extra else None)
    report.verdicts.append(Verdict("sha256", bool(files) and bad is None, bad or f"{len(files)} files match"))
    entry = path / "generate"
    ok = entry.is_file() and os.access(entry, os.X_OK)
    syntax = subprocess.run(["sh", "-n", str(entry)], capture_output=True, text=True) if ok else None
    msg = ("missing or not executable" if not ok else f"sh -n: {syntax.stderr.strip()}" if syntax.returncode
           else "executable entry point")
    report.verdicts.append(Verdict("generate", ok and syntax.returncode == 0, msg))
    if require_image:
        sif = path / "ddkit.sif"
        report.verdicts.append(Verdict("ddkit.sif", sif.is_file(), "image present" if sif.is_file() else
                                       "missing: ddkit container build --out BUNDLE/ddkit.sif, or --image"))
    for name, entry_man in sorted((man.get("datasets") or {}).items()):
        report.verdicts.append(_check_dataset(path, name, entry_man or {}))
    if not man.get("datasets"):
        report.verdicts.append(Verdict("datasets", False, "the manifest lists no dataset"))
    return report


def _check_dataset(bundle: Path, name: str, entry: dict[str, Any]):
    where = f"configs/{name}.yaml"
    if not (bundle / where).is_file():
        return Verdict(where, False, "missing")
    try:
        cfg = load_config(bundle / where)
    except ConfigError as e:
        return Verdict(where, False, f"does not load: {e}")
    values = {k: _dotted(cfg, k) for k in BUNDLE_PATHS}
    if not values["generate.checkpoint"]:
        return Verdict(where, False, "generate.checkpoint is not set: the bundle must name the weights it samples")
    root = bundle.resolve()
    for key, v in values.items():
        if not v or (key == "generate.quality" and v == "dsr"):
            continue
        target = (root / v).resolve()
        if Path(v).is_absolute() or not target.is_relative_to(root):
            return Verdict(where, False, f"{key}={v} lies outside the bundle")
        if not target.exists():
            hint = " (a Hugging Face id: not self-contained)" if _HF_ID.match(v) else ""
            return Verdict(where, False, f"{key}={v} not found in the bundle{hint}")
    shards = values["data.shards"]
    if not shards or not (root / shards / "dataset.json").is_file():
        return Verdict(where, False, "data.shards: no shard index (dataset.json) in the bundle")

    problem = build(cfg.generate.method, cfg).bundle_problem(cfg, values)
    if problem:
        return Verdict(where, False, problem)
    return Verdict(where, True, f"{cfg.generate.method}, weights {values['generate.checkpoint']}")


def _dotted(obj: Any, dotted: str) -> Any:
    for s in dotted.split("."):
        obj = getattr(obj, s)
    return obj
