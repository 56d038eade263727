"""Tables from the runs DataFrame (pure functions: DataFrame in, DataFrame or text out).

- trial_table: one row per trial, every status kept (FINISHED, DIVERGED, FAILED, KILLED, RUNNING, MISSING).
- cell_stats: per cell of the swept keys, mean and std (ddof=1) over the FINISHED runs' seeds, the seed
  count, and how many runs were left out of the means and why; a cell with fewer finished seeds than
  the sweep asked for is flagged.
- pivot_table / headline / partial_note: the report's text built on those; the headline ranks and
  compares cells under an explicit noise rule (`separated`).
- to_markdown / to_latex / to_html: renderers for string tables (no tabulate or jinja needed).
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from smet_lab.metrics import (DEFAULT_FMT, FINAL_VAL_LOSS, FINAL_VAL_PPL, PARAMETERS, POSITIVE_PROBE_JUMP,
                              UPDATE_SPIKE_RATE, label_and_format, table_metrics)
from smet_lab.report.data import (DIVERGED, ENDED, FAILED, FINISHED, MISSING, RUNNING, SEED, SweepInfo, cell_label,
                                  fmt_value, sort_runs, with_positive_jump)

FLAG = "*"  # marks a cell with fewer finished seeds than asked
NOT_ENDED_LABEL = {MISSING: "missing", RUNNING: "running", "KILLED": "killed", "SCHEDULED": "scheduled"}


def fmt(value, spec: str = DEFAULT_FMT) -> str:
    """A number with `spec`; missing (None, NaN) as an em dash, text as it is."""
    if isinstance(value, bool):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "—" if value is None else str(value)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return spec.format(x)


def mean_std(mean, std, n: int, spec: str) -> str:
    """"3.21 ± 0.05" (n >= 2), "3.21" (one seed), "—" (none)."""
    if not n or mean is None or not math.isfinite(mean):
        return "—"
    if n >= 2 and std is not None and math.isfinite(std):
        return f"{fmt(mean, spec)} ± {fmt(std, spec.replace('+', ''))}"
    return fmt(mean, spec)


def _metrics(metrics=None) -> list:
    return list(metrics) if metrics is not None else table_metrics()


# ------------------------------------------------------------------------------------------ trials
def trial_numbers(runs: pd.DataFrame, keys: list, metrics=None) -> pd.DataFrame:
    """Per-trial numbers (machine-readable: MLflow keys as headers), every run kept."""
    metrics = _metrics(metrics)
    cols = ["trial", *dict.fromkeys(["method", *keys]), SEED, "status", *metrics, "error", "run_id"]
    frame = sort_runs(runs, keys)
    out = pd.DataFrame({c: frame[c] if c in frame else pd.Series([None] * len(frame), dtype="object") for c in cols})
    return out


def trial_table(runs: pd.DataFrame, keys: list, metrics=None) -> pd.DataFrame:
    """The per-trial table for people: labels as headers, values formatted, status spelled out."""
    metrics = _metrics(metrics)
    nums = trial_numbers(runs, keys, metrics)
    out = pd.DataFrame({"method": nums["method"].map(fmt_value)})
    for k in keys:
        if k != "method":
            out[k] = nums[k].map(fmt_value)
    out["seed"] = nums[SEED].map(fmt_value)
    out["status"] = nums["status"].fillna("—").astype(str)
    for m in metrics:
        label, spec = label_and_format(m)
        out[label] = nums[m].map(lambda v, s=spec: fmt(v, s))
    return out


def trial_notes(runs: pd.DataFrame, keys: list) -> list[str]:
    """One line per trial that did not finish: its key, status and error."""
    notes = []
    for _, r in sort_runs(runs, keys).iterrows():
        if r.get("status") != FINISHED:
            error = r.get("error")
            why = f": {error}" if isinstance(error, str) and error else ""
            notes.append(f"{r.get('trial')} — {r.get('status')}{why}")
    return notes


# ------------------------------------------------------------------------------------------- cells
def cell_stats(runs: pd.DataFrame, keys: list, metrics=None, seeds_asked: int | None = None) -> pd.DataFrame:
    """One row per cell of `keys`: the key values, `n` (FINISHED runs, the only ones averaged), `seeds`
    (their seeds), `n_diverged`, `n_failed`, `n_unfinished` (killed, running, missing; `unfinished` says
    which, e.g. "1 missing"), `asked`, `flagged`
    (n < asked), and `<metric>:mean`, `<metric>:std` (ddof=1, NaN below two values) per metric.
    `seeds_asked` defaults to the number of distinct seeds among the runs. POSITIVE_PROBE_JUMP is derived
    from the runs (data.with_positive_jump) when they lack it."""
    metrics = _metrics(metrics)
    keys = list(keys)
    df = with_positive_jump(runs) if POSITIVE_PROBE_JUMP in metrics and POSITIVE_PROBE_JUMP not in runs else runs.copy()
    for c in [*keys, *metrics, SEED, "status"]:
        if c not in df:
            df[c] = np.nan
    if seeds_asked is None:
        seeds_asked = max(1, df[SEED].dropna().nunique())
    group_keys = keys or ["_cell"]
    if not keys:
        df["_cell"] = "all runs"
    rows = []
    for cell, g in df.groupby(group_keys, dropna=False, sort=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        ok = g[g["status"] == FINISHED]
        row = dict(zip(keys, cell)) if keys else {}
        row.update(n=len(ok), seeds=sorted(ok[SEED].dropna().tolist()),
                   n_diverged=int((g["status"] == DIVERGED).sum()), n_failed=int((g["status"] == FAILED).sum()),
                   n_unfinished=int((~g["status"].isin(ENDED)).sum()), asked=seeds_asked)
        unfinished = g.loc[~g["status"].isin(ENDED), "status"].map(lambda s: NOT_ENDED_LABEL.get(s, str(s).lower()))
        row["unfinished"] = ", ".join(f"{v} {k}" for k, v in unfinished.value_counts(sort=False).items())
        row["flagged"] = row["n"] < seeds_asked
        if PARAMETERS in g:  # a model's size, so that models sort by it
            row[PARAMETERS] = pd.to_numeric(g[PARAMETERS], errors="coerce").max()
        for m in metrics:
            values = pd.to_numeric(ok[m], errors="coerce").astype("float64")
            values = values[np.isfinite(values)]
            row[f"{m}:mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{m}:std"] = float(values.std(ddof=1)) if len(values) >= 2 else math.nan
            row[f"{m}:n"] = len(values)
        rows.append(row)
    stats = pd.DataFrame(rows)
    return sort_runs(stats, keys) if keys else stats


def excluded_text(row) -> str:
    """"1 diverged, 2 failed, 1 missing": what a cell's means leave out."""
    parts = [f"{row['n_diverged']} diverged" if row["n_diverged"] else "",
             f"{row['n_failed']} failed" if row["n_failed"] else "",
             row.get("unfinished") or (f"{row['n_unfinished']} not ended" if row["n_unfinished"] else "")]
    return ", ".join(p for p in parts if p)


def pivot_table(stats: pd.DataFrame, keys: list, metrics=None) -> pd.DataFrame:
    """The cell table for people: the key values, `seeds` ("2/3*" when flagged), `not averaged`
    (diverged/failed/unfinished runs of the cell) and "mean ± std" per metric."""
    metrics = _metrics(metrics)
    out = pd.DataFrame({k: stats[k].map(fmt_value) for k in keys}) if keys else pd.DataFrame(index=stats.index)
    out["seeds"] = [f"{r['n']}/{r['asked']}" + (FLAG if r["flagged"] else "") for _, r in stats.iterrows()]
    out["not averaged"] = [excluded_text(r) for _, r in stats.iterrows()]
    for m in metrics:
        label, spec = label_and_format(m)
        out[label] = [mean_std(r[f"{m}:mean"], r[f"{m}:std"], r[f"{m}:n"], spec) for _, r in stats.iterrows()]
    return out


def pivot_numbers(stats: pd.DataFrame, keys: list, metrics=None) -> pd.DataFrame:
    """The cell table for machines (CSV): key values, counts, flag, mean/std/n per metric."""
    metrics = _metrics(metrics)
    cols = [*keys, "n", "asked", "flagged", "n_diverged", "n_failed", "n_unfinished"]
    cols += [f"{m}:{s}" for m in metrics for s in ("mean", "std", "n")]
    out = stats[cols].copy()
    out.insert(len(keys) + 1, "seeds", stats["seeds"].map(lambda s: " ".join(fmt_value(x) for x in s)))
    return out


# -------------------------------------------------------------------------------------------- text
STABILITY_KEYS = (UPDATE_SPIKE_RATE, POSITIVE_PROBE_JUMP)  # lower = more stable, compared in this order
INDISTINCT = "indistinguishable (within the seeds' spread)"


def seeds_text(n) -> str:
    return f"{int(n)} seed{'s' if n != 1 else ''}"


def separated(a: pd.Series, b: pd.Series, metric: str) -> bool:
    """The noise rule: two cells differ in `metric` only when each has >= 2 seeds with a value and
    their means are further apart than the sum of their stds (ddof=1), i.e. the mean ± std intervals
    do not overlap. One seed has no spread, so it can never be told apart."""
    if min(a[f"{metric}:n"], b[f"{metric}:n"]) < 2:
        return False
    return abs(a[f"{metric}:mean"] - b[f"{metric}:mean"]) > a[f"{metric}:std"] + b[f"{metric}:std"]


def ranked(stats: pd.DataFrame, metrics) -> pd.DataFrame:
    """Cells with a finished run and a value in some of `metrics`, sorted by them (ascending, in
    order, NaN last); a cell with none of them (e.g. dense: no topology update) is not ranked."""
    cols = [f"{m}:mean" for m in metrics]
    done = stats[(stats["n"] > 0) & stats[cols].notna().any(axis=1)] if len(stats) else stats
    return done.sort_values(cols, na_position="last", kind="stable") if len(done) else done


ONE_SEED_WHY = ": one seed has no spread, so no difference can be claimed"


def compare(rows: pd.DataFrame, metrics, keys: list, what: str, runner_up: str, numbers,
            explain_one_seed: bool = True) -> str:
    """"<what>: A (numbers, n seeds)" and its comparison with the runner-up: ahead beyond the seeds'
    spread in the first metric whose means differ, else INDISTINCT (why, when one seed and
    explain_one_seed), plus a note when the seed counts differ."""
    first = rows.iloc[0]
    text = f"{what}: {cell_label(first.to_dict(), keys)} ({numbers(first)}, {seeds_text(first['n'])})"
    if len(rows) < 2:
        return text + " (no other cell to compare)"
    second = rows.iloc[1]
    other = f"{runner_up} {cell_label(second.to_dict(), keys)} ({numbers(second)}, {seeds_text(second['n'])})"
    key = next((m for m in metrics if pd.notna(first[f"{m}:mean"]) and pd.notna(second[f"{m}:mean"])
                and first[f"{m}:mean"] != second[f"{m}:mean"]), None)
    if key is not None and separated(first, second, key):
        text += f", ahead of {other} by more than the seeds' spread in {label_and_format(key)[0]}"
    else:
        text += f" and {other} are {INDISTINCT}"
        if min(first["n"], second["n"]) < 2 and explain_one_seed:
            text += ONE_SEED_WHY
    if first["n"] != second["n"]:
        text += f"; unequal seed counts ({first['n']} vs {second['n']} seeds)"
    return text


def _mean_std(row, metric: str) -> str:
    label, spec = label_and_format(metric)
    return f"{label} {mean_std(row[f'{metric}:mean'], row[f'{metric}:std'], row[f'{metric}:n'], spec)}"


def headline(stats: pd.DataFrame, keys: list, runs: pd.DataFrame | None = None) -> str:
    """The most stable cell (lowest update spike rate, then lowest mean positive probe jump: a jump
    <= 0 is no spike, so a more negative mean jump is never more stable) and the best cell (lowest
    final val ppl, else val loss), each with its seed count and compared with the runner-up under
    the noise rule of `separated`. Needs cell_stats over STABILITY_KEYS and the quality metric."""
    n_done = int(stats["n"].sum()) if len(stats) else 0
    if not n_done:
        counts = {s: int(v) for s, v in (runs["status"].value_counts().items() if runs is not None else [])}
        shown = ", ".join(f"{v} {s.lower()}" for s, v in counts.items()) or "no runs"
        return f"No configuration has a finished run yet ({shown}), so nothing can be ranked."
    quality = FINAL_VAL_PPL if stats[f"{FINAL_VAL_PPL}:mean"].notna().any() else FINAL_VAL_LOSS
    stable, best = ranked(stats, STABILITY_KEYS), ranked(stats, [quality])
    parts = [compare(stable, STABILITY_KEYS, keys, "Most stable", "the runner-up",
                     lambda r: ", ".join(_mean_std(r, m) for m in STABILITY_KEYS if r[f"{m}:n"])) if len(stable)
             else "Stability: no finished run has probe jumps (no topology update, or none followed by a whole probe "
                  "window), so none is ranked"]
    if len(best):
        parts.append(compare(best, [quality], keys, "Best", "the next best", lambda r: _mean_std(r, quality),
                             explain_one_seed=ONE_SEED_WHY not in parts[0]))  # said once
    excluded = [f"{int(stats[c].sum())} {word}" for c, word in (("n_diverged", "diverged"), ("n_failed", "failed"))
                if stats[c].sum()]
    n_excluded = int(stats["n_diverged"].sum() + stats["n_failed"].sum())
    if excluded:
        parts.append(f"Not ranked: {' and '.join(excluded)} run{'s' if n_excluded > 1 else ''}")
    return ". ".join(parts) + "."


def partial_note(info: SweepInfo, runs: pd.DataFrame) -> str | None:
    """Why the report is partial (sweep running or interrupted, trials missing), or None."""
    reasons = []
    # (a FAILED parent is a sweep that ended with failed trials: they are listed as such)
    if info.status in (RUNNING, "SCHEDULED"):
        reasons.append(f"the sweep is still running, or its driver died (parent run {info.status})"
                       if info.parent_run_id else "the sweep is still running (its driver holds the sweep's lock)")
    elif info.status == "KILLED":
        where = f" (parent run {info.status})" if info.parent_run_id else ""
        reasons.append(f"the sweep was interrupted{where}; run the same command again to resume")
    ended = int(runs["status"].isin(ENDED).sum()) if len(runs) else 0
    total = max(info.n_trials or 0, len(runs))
    if ended < total:
        reasons.append(f"{ended} of {total} {'runs' if info.run_dirs else 'trials'} have ended")
    unfinished = runs[~runs["status"].isin(ENDED)] if len(runs) else runs
    if len(unfinished):
        counts = unfinished["status"].map(lambda s: NOT_ENDED_LABEL.get(s, str(s).lower())).value_counts()
        reasons[-1] += " (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")"
    elif info.n_trials and len(runs) < info.n_trials:
        reasons[-1] += f" ({info.n_trials - len(runs)} never started)"
    return ("Partial report: " + "; ".join(reasons) + ".") if reasons else None


# --------------------------------------------------------------------------------------- renderers
def _md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
    out = "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$").replace("—", "--").replace("†", r"$^\dagger$")


def to_latex(df: pd.DataFrame, caption: str | None = None, label: str | None = None, notes=(),
             bold: set | None = None) -> str:
    """A booktabs table. `bold`: (row position, column name) pairs to set in bold."""
    bold = bold or set()
    cols = list(df.columns)
    align = "l" + "r" * (len(cols) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        lines.append(rf"\caption{{{latex_escape(caption)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    lines += [rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(latex_escape(c) for c in cols) + r" \\",
              r"\midrule"]
    for i, row in enumerate(df.itertuples(index=False)):
        cells = [latex_escape(v) for v in row]
        cells = [rf"\textbf{{{c}}}" if (i, col) in bold else c for c, col in zip(cells, cols)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in notes:
        lines.append(rf"\par\footnotesize {latex_escape(note)}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_html(df: pd.DataFrame, row_classes=None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False)):
        cls = row_classes[i] if row_classes is not None and row_classes[i] else ""
        attr = f' class="{html.escape(cls)}"' if cls else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>\n"
