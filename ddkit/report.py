"""``report.md``: the results table, the sample grids and budget plots, and where the time went.

Everything it shows is read back from the run directory (``eval/results.json``, ``gen-*/manifest.json``,
``pipeline.json``), so the report can be rebuilt at any time with ``ddkit run CONFIG --stage report``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddkit.config import TRAIN_STAGES, ExperimentConfig
from ddkit.errors import ConfigError
from ddkit.io import DONE, atomic_write_text, read_json
from ddkit.methods import registry

BASELINES = {"random_real": "random real", "full": "full real data"}


def label(name: str) -> str:
    """The row label of a set: a method's own (:attr:`ddkit.methods.base.GenerationMethod.label`), a
    baseline's, else the name."""

    if name in BASELINES:
        return BASELINES[name]
    try:
        return registry.label(name)
    except ConfigError:
        return name


def result_sets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-set entries of ``results.json`` (``{"sets": {...}}`` or a flat mapping)."""
    sets = results.get("sets", results)
    return {k: v for k, v in sets.items() if isinstance(v, dict) and "mean" in v}


def results_table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (label, IPC, accuracy "mean ± std" in %, runs): the registry's methods in order, then other sets,
    then the baselines."""
    sets = result_sets(results)

    known = [k for k in registry.names() if k in sets]
    order = known + [k for k in sets if k not in known and k not in BASELINES] + [k for k in BASELINES if k in sets]
    rows = []
    for k in order:
        r = sets[k]
        rows.append(
            (
                label(k),
                str(r.get("ipc", "")),
                f"{r['mean']:.2f} ± {r['std']:.2f}",
                str(len(r.get("runs", [])) or ""),
            )
        )
    return rows


def write_report(cfg: ExperimentConfig) -> Path:
    """Write ``RUN/report.md`` from what the run directory holds; returns its path."""
    run = Path(cfg.run_dir)
    lines = [f"# ddkit report: {cfg.name}", ""]
    lines += [
        f"Dataset `{cfg.data.dataset}`, backbone `{cfg.model.arch}`, methods {', '.join(cfg.methods)}; "
        f"evaluation protocol `{cfg.evaluate.protocol}` with {cfg.evaluate.network or 'its default network'}, "
        f"{cfg.evaluate.repeats} repeat(s).",
        "",
    ]
    eval_path = run / "eval" / "results.json"
    if eval_path.exists():
        results = read_json(eval_path)
        lines += ["## Results (test accuracy, %)", "", "| set | IPC | accuracy | runs |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in results_table(results)]
        lines.append("")
    gen_lines, pictures = _generation_lines(run, cfg)
    lines += gen_lines
    if (run / "bench" / "ipc_curve.png").exists():
        lines += ["## Accuracy against IPC (`bench/distill.py`)", "", "![accuracy vs IPC](bench/ipc_curve.png)", ""]
    if pictures:
        lines += ["## Samples and budget", "", *pictures, ""]
    lines += _precision_lines(run, cfg)
    timings_path = run / "pipeline.json"
    if timings_path.exists():
        t = read_json(timings_path)
        lines += ["## Stage wall times (s, last run of each)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
        lines.append("")
    lines += ["Reproduce: `ddkit run configs/" + f"{cfg.name}.yaml`", ""]
    return atomic_write_text(run / "report.md", "\n".join(lines))


def _generation_lines(run: Path, cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """The "Generation" table (one row per method's ``manifest.json``) with the selection notes, and the
    links to each method's pictures (shown in their own section)."""
    lines = [
        "## Generation",
        "",
        "Each method calibrates and plans against its own budget, so steps can differ between methods on a "
        "loaded machine: the table says what each got and why (the plan's reason).",
        "",
        "| method | steps | IPC | images | wall s | budget s | budget used | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pictures: list[str] = []
    selection_notes: list[str] = []
    for method in cfg.methods:
        gen = run / f"gen-{method}"
        man_path = gen / "manifest.json"
        if not man_path.exists():
            continue
        m = read_json(man_path)
        steps = m.get("steps")
        if isinstance(steps, dict):  # {"planned", "min", "max", "per_image"}: show the range actually run
            lo, hi = steps.get("min"), steps.get("max")
            steps = lo if lo == hi else f"{lo}–{hi}"
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                method,
                _fmt(steps),
                _fmt(m.get("ipc")),
                _fmt(m.get("images")),
                _fmt(m.get("elapsed_seconds")),
                _fmt(m.get("time_limit")),
                _fmt(m.get("budget_share_used")),
                (m.get("plan") or {}).get("reason", ""),
            )
        )
        sel = m.get("selection")
        if sel:
            selection_notes.append(
                f"- `{method}`: {sel['ratio']:g}x candidates ({sel['pool_ipc']} per class), kept {m.get('ipc')} by "
                f"{sel['criterion']}; encoder confidence of the intended class: kept "
                f"{_fmt(sel.get('kept_mean_confidence'))}, rejected {_fmt(sel.get('rejected_mean_confidence'))}"
            )
        for png in ("grid.png", "selection.png", "budget.png"):
            if (gen / png).exists():
                pictures.append(f"![{method} {png[:-4]}](gen-{method}/{png})")
    lines.append("")
    if selection_notes:
        lines += ["Selection (`selection.png`: per class the kept images, a gap, then rejected ones):", "",
                  *selection_notes, ""]
    return lines, pictures


def _precision_lines(run: Path, cfg: ExperimentConfig) -> list[str]:
    """The "Precision and threads" table: each stage's resolved precision, why, the measured fp32/bf16
    step-time ratio (:mod:`ddkit.hardware`) and its torch thread count, read from the stage records."""

    rows = []
    sources = [(s, run / s / DONE, ("precision",), ("hardware",)) for s in TRAIN_STAGES]
    sources += [(f"generate {m}", run / f"gen-{m}" / "manifest.json", ("precision",), ("hardware",)) for m in cfg.methods]
    sources.append(("evaluate", run / "eval" / "results.json", ("meta", "precision"), ("meta", "hardware")))
    for stage, path, pkey, hkey in sources:
        if not path.is_file():
            continue
        rec = read_json(path)
        p, h = _dig(rec, pkey), _dig(rec, hkey) or {}
        if not isinstance(p, dict):
            continue
        ratio = p.get("ratio")
        rows.append(
            f"| {stage} | {p.get('precision')} ({p.get('requested')}) | {p.get('reason', '')} | "
            f"{'–' if ratio is None else f'{ratio:.2f}'} | {_fmt(h.get('threads'))} of {_fmt(h.get('cpus'))} |"
        )
    if not rows:
        return []
    head = ["## Precision and threads", "", "| stage | precision (requested) | why | fp32/bf16 step time | threads of usable CPUs |",
            "|---|---|---|---|---|"]
    return [*head, *rows, ""]


def _dig(rec: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        rec = rec.get(k) if isinstance(rec, dict) else None
    return rec


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
