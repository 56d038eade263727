"""The stability report of a sweep: report.md, a self-contained report.html (plots inlined as base64
PNG), the tables as .md/.csv/.tex and the plots as .png, in one folder.

build_report(info, runs, out_dir) is pure apart from writing that folder (no MLflow); report_for_target
and report_for_sweep_dir read MLflow (smet_lab.report.io), build, and log the folder as the parent
run's artifact `report/`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import re
from pathlib import Path

import pandas as pd

from smet_lab.report.data import SEED, SweepInfo, fmt_value, with_missing, with_positive_jump
from smet_lab.report.glossary import glossary
from smet_lab.report.detectors import lag_table
from smet_lab.report.folder import is_run_folder
from smet_lab.report.plots import FIGURES, png_bytes, report_figures
from smet_lab.report.tables import (FLAG, cell_stats, headline, partial_note, pivot_numbers, pivot_table, to_html,
                                    to_latex, to_markdown, trial_notes, trial_numbers, trial_table)

OUTPUTS = ("report.md", "report.html", "trials.csv", "trials.md", "trials.tex", "pivot.csv", "pivot.md", "pivot.tex")
FIGURE_FILES = tuple(name for name, _, _ in FIGURES)
CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.headline { font-size: 1.1em; background: #eef6ee; border-left: 4px solid #2a7a2a; padding: .6em 1em; }
.partial { background: #fff4e0; border-left: 4px solid #d08000; padding: .6em 1em; font-weight: bold; }
.meta { color: #555; font-size: .9em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
.scroll { overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; white-space: normal; vertical-align: bottom; } td:first-child, th:first-child { text-align: left; }
tr.diverged td { background: #fde8e8; } tr.failed td { background: #f8d7da; }
tr.missing td, tr.running td, tr.killed td { background: #f0f0f0; color: #777; } tr.flagged td { background: #fff8e0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
dt { font-weight: bold; margin-top: .5em; } dd { margin-left: 1.5em; }
"""


def report_keys(info: SweepInfo, runs: pd.DataFrame) -> list:
    keys = [k for k in info.swept if k != SEED]
    if not keys and "method" in runs:
        keys = ["method"]
    return keys


def default_out_dir(info: SweepInfo) -> Path:
    """<sweep_dir>/report when the sweep's folder is on this machine (a run's: <run>/report), else
    reports/<name>/ (several runs: reports/runs-<hash of their folders>/, the same for the same runs)."""
    if info.sweep_dir and Path(info.sweep_dir).is_dir():
        return Path(info.sweep_dir) / "report"
    if len(info.run_dirs) == 1:
        return Path(info.run_dirs[0]) / "report"
    if info.run_dirs:
        return Path("reports") / f"runs-{hashlib.sha1(' '.join(sorted(info.run_dirs)).encode()).hexdigest()[:8]}"
    return Path("reports") / re.sub(r"[^\w.-]+", "_", info.name)


def build_report(info: SweepInfo, runs: pd.DataFrame, out_dir, now: dt.datetime | None = None) -> Path:
    """Write the report of `runs` (a runs DataFrame, smet_lab.report.data) into out_dir; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*OUTPUTS, *FIGURE_FILES):  # a rebuilt report must not keep a stale plot
        (out / name).unlink(missing_ok=True)
    runs = with_positive_jump(with_missing(runs, info))  # the trial table shows what the ranking uses
    keys = report_keys(info, runs)
    stats = cell_stats(runs, keys, seeds_asked=info.seeds_asked)
    asked = int(stats["asked"].max()) if len(stats) else (info.seeds_asked or 1)
    sections = {
        "headline": headline(stats, keys, runs),
        "partial": partial_note(info, runs),
        "trials": trial_table(runs, keys),
        "trial_classes": [str(s).lower() for s in trial_numbers(runs, keys)["status"]],
        "notes": trial_notes(runs, keys),
        "pivot": pivot_table(stats, keys),
        "pivot_classes": ["flagged" if f else "" for f in stats["flagged"]] if len(stats) else [],
        "pivot_note": (f"Mean ± std (ddof=1) over the FINISHED runs of each cell; diverged, failed and unfinished "
                       f"runs are never averaged in (column 'not averaged'; they are listed in the trial table). "
                       f"{FLAG} marks a cell with fewer finished seeds than the {asked} asked for."),
        "one_seed": asked <= 1,  # its mean ± std table would repeat the trial table: a line says so instead
        "meta": _meta(info, runs, now),
        "detectors": lag_table(runs),
    }
    trial_numbers(runs, keys).to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(to_markdown(sections["trials"]))
    (out / "trials.tex").write_text(to_latex(sections["trials"], caption=f"Sweep {info.name}: trials",
                                             label="tab:" + re.sub(r"[^\w]+", "-", info.name) + "-trials"))
    pivot_numbers(stats, keys).to_csv(out / "pivot.csv", index=False)
    (out / "pivot.md").write_text(to_markdown(sections["pivot"]) + "\n" + sections["pivot_note"] + "\n")
    label = "tab:" + re.sub(r"[^\w]+", "-", info.name) + "-pivot"
    (out / "pivot.tex").write_text(to_latex(sections["pivot"], caption=f"Sweep {info.name}: mean ± std over seeds",
                                            label=label, notes=[sections["pivot_note"]]))
    figures = []
    for name, caption, fig in report_figures(runs, info):
        data = png_bytes(fig)
        (out / name).write_bytes(data)
        figures.append((name, caption, data))
    sections["glossary"] = glossary([name for name, _, _ in figures])
    (out / "report.md").write_text(render_markdown(info, sections, figures))
    (out / "report.html").write_text(render_html(info, sections, figures))
    return out


def one_seed_note(info: SweepInfo) -> str:
    more = ("sweep.seeds=[0,1,2] runs each cell three times and gives" if info.kind == "sweep" else
            "Running each setting again with train.seed=1 and train.seed=2 gives")
    return (f"One seed per cell: the trial table above is each cell's value, with no spread to average. {more} "
            "mean ± std here (pivot.csv has the one-seed table).")


DETECTORS_NOTE = ("Every detection of the three detectors in the ended runs (loss events counted at their peak), "
                  "and when it came: within train.probe_window steps after a topology update, and the median "
                  "number of steps since the last update (— before the first update or without detections).")


def _title(info: SweepInfo, code) -> str:
    """What the report is of, its name set by `code` (Markdown backticks or HTML <code>)."""
    if info.kind == "runs":
        return f"{len(info.run_dirs)} runs"
    what = "the single runs of experiment" if info.kind == "experiment" else info.kind  # sweep, run
    return f"{what} {code(info.name)}"


def _meta(info: SweepInfo, runs: pd.DataFrame, now) -> list[tuple[str, str]]:
    now = now or dt.datetime.now(dt.timezone.utc)
    ended = int(runs["status"].isin(["FINISHED", "DIVERGED", "FAILED"]).sum()) if len(runs) else 0
    total = max(info.n_trials or 0, len(runs))
    if info.run_dirs:  # single runs' folders: no sweep, parent run or tracking URI to name
        items = [("run folder" if len(info.run_dirs) == 1 else "run folders", ", ".join(info.run_dirs)),
                 ("runs ended", f"{ended}/{total}"),
                 ("differing keys", ", ".join(k for k in info.swept if runs[k].map(repr).nunique() > 1) or "—"),
                 ("rules", _rules(runs))]
    else:
        no_parent = ("— (read from the sweep's folder)" if info.from_folder
                     else "— (runs of an experiment without a sweep parent)")
        items = [("sweep", info.name)] if info.kind == "sweep" else []
        items += [("experiment", info.experiment or "—"),
                  ("parent run", info.parent_run_id or no_parent),
                  ("sweep status" if info.from_folder else "parent status", info.status or "—"),
                  ("trials ended", f"{ended}/{total}"),
                  ("seeds asked", "[" + ", ".join(fmt_value(s) for s in info.seeds) + "]" if info.seeds else "—"),
                  ("swept keys", ", ".join(info.swept) or "—"), ("sweep metric", f"{info.metric} ({info.mode})"),
                  ("rules", _rules(runs)),
                  ("tracking URI", info.uri or "—"), ("sweep folder", info.sweep_dir or "—")]
    if info.left_out:
        after_ended = next(i for i, (key, _) in enumerate(items) if key.endswith(" ended")) + 1
        items.insert(after_ended, ("runs left out", f"{info.left_out} older run(s) of a setting and seed that a "
                                                    "newer run repeats (each setting and seed counts once: the newest)"))
    return items + [("generated", now.strftime("%Y-%m-%d %H:%M:%S %Z"))]


# The rule options a reader needs to know what ran (a user's registered rule shows up here by name).
RULE_KEYS = ("sparsity.growth", "sparsity.prune", "sparsity.prune_schedule", "sparsity.distribution",
             "optim.regrow.warmup_kind", "extensions")


def _rules(runs: pd.DataFrame) -> str:
    """'key=value' for each rule key (several values joined by ' | '), from the runs' params."""
    parts = []
    for key in RULE_KEYS:
        if key in runs:
            values = sorted({fmt_value(v) for v in runs[key].dropna()})
            if values and values != ["[]"]:
                parts.append(f"{key}={' | '.join(values)}")
    return ", ".join(parts) or "—"


def render_markdown(info: SweepInfo, s: dict, figures) -> str:
    lines = [f"# Stability report: {_title(info, lambda name: f'`{name}`')}", ""]
    if s["partial"]:
        lines += [f"> **{s['partial']}**", ""]
    lines += [f"**{s['headline']}**", ""]
    lines += [f"- {k}: {v}" for k, v in s["meta"]] + [""]
    lines += ["## Trials", "", to_markdown(s["trials"])]
    if s["notes"]:
        lines += ["Not finished:", ""] + [f"- {n}" for n in s["notes"]] + [""]
    lines += ["## Mean ± std over seeds", ""]
    lines += [one_seed_note(info), ""] if s["one_seed"] else [to_markdown(s["pivot"]), s["pivot_note"], ""]
    if len(s["detectors"]):
        lines += ["## Spike detectors and topology updates", "", to_markdown(s["detectors"]), DETECTORS_NOTE, ""]
    lines += ["## Plots", ""]
    if not figures:
        lines += ["No plot: no run has a history yet.", ""]
    for name, caption, _ in figures:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    lines += ["## Glossary", ""] + [f"- **{term}**: {text}" for term, text in s["glossary"]] + [""]
    lines += ["Files: report.html (this report, self-contained), trials.csv/.md/.tex, pivot.csv/.md/.tex, "
              + ", ".join(n for n, _, _ in figures) + ".", ""]
    return "\n".join(lines)


def render_html(info: SweepInfo, s: dict, figures) -> str:
    e = html.escape
    parts = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>Stability report: {e(info.name)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
             f"<h1>Stability report: {_title(info, lambda name: f'<code>{e(name)}</code>')}</h1>"]
    if s["partial"]:
        parts.append(f'<p class="partial">{e(s["partial"])}</p>')
    parts.append(f'<p class="headline">{e(s["headline"])}</p>')
    parts.append('<ul class="meta">' + "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in s["meta"]) + "</ul>")
    parts += ["<h2>Trials</h2>", f'<div class="scroll">{to_html(s["trials"], s["trial_classes"])}</div>']
    if s["notes"]:
        parts.append("<p>Not finished:</p><ul>" + "".join(f"<li>{e(n)}</li>" for n in s["notes"]) + "</ul>")
    parts.append("<h2>Mean ± std over seeds</h2>")
    parts += [f"<p>{e(one_seed_note(info))}</p>"] if s["one_seed"] else [
        f'<div class="scroll">{to_html(s["pivot"], s["pivot_classes"])}</div>', f'<p class="meta">{e(s["pivot_note"])}</p>']
    if len(s["detectors"]):
        parts += ["<h2>Spike detectors and topology updates</h2>", f'<div class="scroll">{to_html(s["detectors"])}</div>',
                  f'<p class="meta">{e(DETECTORS_NOTE)}</p>']
    parts += ["<h2>Plots</h2>"]
    if not figures:
        parts.append("<p>No plot: no run has a history yet.</p>")
    for name, caption, data in figures:
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{b64}" alt="{e(caption)}">'
                     f"<figcaption>{e(caption)} ({e(name)})</figcaption></figure>")
    parts += ["<h2>Glossary</h2>", "<dl>" + "".join(f"<dt>{e(t)}</dt><dd>{e(d)}</dd>" for t, d in s["glossary"])
              + "</dl>", "</body>", "</html>", ""]
    return "\n".join(parts)


# ------------------------------------------------------------ from MLflow or the sweep's folder
def report_for_target(uri: str, target, out_dir=None, log: bool = True, warn=print) -> tuple[SweepInfo, Path]:
    """Read `target` (sweep name, experiment, parent run id or sweep folder; or single runs' output
    folders, one or a list) from MLflow or its folder, build its report (default folder: default_out_dir)
    and log it to the parent run as `report/`."""
    from smet_lab.report.io import load_run_dirs, load_sweep_runs, log_report

    targets = [target] if isinstance(target, (str, Path)) else list(target)
    if len(targets) > 1 or is_run_folder(targets[0]):
        info, runs = load_run_dirs(targets, warn)
    else:
        info, runs = load_sweep_runs(uri, str(targets[0]), warn)
    out = build_report(info, runs, Path(out_dir) if out_dir else default_out_dir(info))
    if log and info.parent_run_id:
        log_report(info.uri, info.parent_run_id, out)
    return info, out


def report_for_sweep_dir(uri: str | None, experiment: str, sweep_dir, status: str | None = None,
                         log: bool = True) -> Path:
    """The sweep runner's hook: the report of the sweep stored in sweep_dir into <sweep_dir>/report/,
    logged to its parent run (uri None: tracking=none, read from the folder). `status` stands for the
    parent's status, which the runner is about to set."""
    from smet_lab.report.io import load_sweep_dir, log_report

    info, runs = load_sweep_dir(uri, experiment, str(sweep_dir))
    if status:
        info.status = status
    out = build_report(info, runs, Path(sweep_dir) / "report")
    if log and info.parent_run_id:
        log_report(info.uri, info.parent_run_id, out)
    return out
