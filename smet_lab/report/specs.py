"""Ablation tables in the paper's layout from YAML specs (smet_lab/report/table_specs/*.yaml), as Markdown, CSV and LaTeX.

A spec names the sweep(s) to read, the row key, the column key, the metric and its format:

    title: Component ablation: validation perplexity
    sweep: [ablation, density]     # one name or a list; a (row, column, seed) found in several sweeps is
                                   # taken from the first one listed
    rows: method                   # any config key of the trials (dotted), e.g. optim.lr_scaling.rule
    columns: sparsity.density      # optional: without it the table has one value column
    metric: summary/final_val_ppl  # a run-level MLflow metric
    format: "{:.2f}"               # optional Python format of one number (default: the metric's, smet_lab.metrics)
    better: min                    # optional (min | max): the best cell of each column in bold (default: the
                                   # metric's direction; a metric with none, or an unregistered one: no bold)
    row_order: [dense, naive_dst, smet]      # optional; other values follow in their natural order
    row_labels: {naive_dst: Naive DST}       # optional display names (also column_order / column_labels)
    row_title: method                        # optional headers (default: the keys)
    column_title: density
    caption: ...                             # optional, below the title

Cells: mean ± std over the FINISHED seeds (one seed: the value alone); `*` fewer finished seeds than asked,
`†` some seeds diverged or failed (never averaged in); a cell with no finished seed reads "diverged",
"failed" or "not run".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from smet_lab.metrics import DEFAULT_FMT, METRICS
from smet_lab.report.data import SEED, fmt_value
from smet_lab.report.tables import FLAG, cell_stats, mean_std, to_latex, to_markdown

# The shipped table specs (package data, so a non-editable install has them too).
SPECS_DIR = Path(__file__).resolve().parent / "table_specs"
DAGGER = "†"


class SpecError(ValueError):
    pass


@dataclass
class TableSpec:
    name: str
    sweep: list
    rows: str
    metric: str
    columns: str | None = None
    format: str = DEFAULT_FMT
    better: str | None = None
    title: str = ""
    caption: str = ""
    row_order: list | None = None
    column_order: list | None = None
    row_labels: dict = field(default_factory=dict)
    column_labels: dict = field(default_factory=dict)
    row_title: str | None = None
    column_title: str | None = None


def load_spec(path) -> TableSpec:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"table spec {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"table spec {path}: a mapping is needed (sweep, rows, columns, metric, format)")
    known = {f.name for f in dataclasses.fields(TableSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"table spec {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = [k for k in ("sweep", "rows", "metric") if not data.get(k)]
    if missing:
        raise SpecError(f"table spec {path}: missing {', '.join(missing)}")
    data.setdefault("name", path.stem)
    data["sweep"] = [data["sweep"]] if isinstance(data["sweep"], str) else list(data["sweep"])
    metric = METRICS.get(data["metric"])
    if metric is not None:
        data.setdefault("format", metric.fmt)
        data.setdefault("better", {"lower": "min", "higher": "max"}.get(metric.better))
    if data.get("better") not in (None, "min", "max"):
        raise SpecError(f"table spec {path}: better={data['better']!r} is not allowed: one of min, max")
    try:
        data.get("format", DEFAULT_FMT).format(1.0)
    except (ValueError, IndexError, KeyError) as exc:
        raise SpecError(f"table spec {path}: format={data.get('format')!r} is not a Python format: {exc}") from None
    for k in ("row_labels", "column_labels"):
        data[k] = {str(key): str(v) for key, v in (data.get(k) or {}).items()}
    return TableSpec(**data)


def merge_sweeps(frames: list[pd.DataFrame], keys: list) -> pd.DataFrame:
    """Runs of several sweeps; a (keys..., seed) present in several is kept from the first sweep."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["status", *keys, SEED])
    df = pd.concat(frames, ignore_index=True)
    ident = df[[k for k in [*keys, SEED] if k in df]].map(fmt_value)
    return df[~ident.duplicated(keep="first")].reset_index(drop=True)


def _ordered(values: list, order: list | None) -> list:
    """Values in the spec's order (matched as text), the others after in their given order; without
    an order, numbers ascending (densities, W, ΔT read left to right) and anything else as given."""
    if not order:
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return sorted(values) if numeric else values
    text = [fmt_value(v) for v in values]
    wanted = [fmt_value(o) for o in order]
    first = [values[text.index(w)] for w in wanted if w in text]
    return first + [v for v in values if fmt_value(v) not in wanted]


def spec_table(spec: TableSpec, runs: pd.DataFrame, seeds_asked: int | None = None):
    """(table of strings, notes, bold cells) for the spec over a runs DataFrame."""
    keys = [spec.rows] + ([spec.columns] if spec.columns else [])
    for k in keys:
        if k not in runs:
            runs = runs.assign(**{k: None})
    stats = cell_stats(runs, keys, [spec.metric], seeds_asked)
    m = spec.metric
    row_vals = _ordered(list(dict.fromkeys(stats[spec.rows])) if len(stats) else [], spec.row_order)
    col_vals = (_ordered(list(dict.fromkeys(stats[spec.columns])), spec.column_order)
                if spec.columns and len(stats) else [None])
    by_cell = {(fmt_value(r[spec.rows]), fmt_value(r[spec.columns]) if spec.columns else "—"): r
               for _, r in stats.iterrows()}
    corner = spec.row_title or spec.rows
    if spec.columns:
        corner += f" \\ {spec.column_title or spec.columns}"
    headers = [spec.column_labels.get(fmt_value(c), fmt_value(c)) if spec.columns else (spec.column_title or m)
               for c in col_vals]
    table, bold, marks = [], set(), set()
    best = {}
    if spec.better:
        for j, c in enumerate(col_vals):
            cands = [(r[f"{m}:mean"], i) for i, v in enumerate(row_vals)
                     if (r := by_cell.get((fmt_value(v), fmt_value(c) if spec.columns else "—"))) is not None
                     and r["n"] > 0 and pd.notna(r[f"{m}:mean"])]
            if cands:
                best[j] = (min if spec.better == "min" else max)(cands)[1]
    for i, v in enumerate(row_vals):
        row = [spec.row_labels.get(fmt_value(v), fmt_value(v))]
        for j, c in enumerate(col_vals):
            r = by_cell.get((fmt_value(v), fmt_value(c) if spec.columns else "—"))
            row.append(_cell_text(r, m, spec.format, marks))
            if best.get(j) == i:
                bold.add((i, headers[j]))
        table.append(row)
    frame = pd.DataFrame(table, columns=[corner, *headers])
    notes = [f"{spec.metric}: mean ± std over the FINISHED seeds of each cell (one seed: its value)."]
    if FLAG in marks:
        notes.append(f"{FLAG} fewer finished seeds than asked ({int(stats['asked'].max())}).")
    if DAGGER in marks:
        notes.append(f"{DAGGER} some seeds of the cell diverged or failed; they are not averaged in.")
    if "not run" in marks:
        notes.append("not run: the cell's trials are missing, running or were killed.")
    if spec.better:
        notes.append(f"Bold: the best ({'lowest' if spec.better == 'min' else 'highest'}) mean of each column.")
    return frame, notes, bold


def _cell_text(r, m: str, spec_fmt: str, marks: set) -> str:
    if r is None:
        return "—"
    if r["n"] == 0 or pd.isna(r[f"{m}:mean"]):
        if r["n_diverged"]:
            return "diverged"
        if r["n_failed"]:
            return "failed"
        if r["n_unfinished"]:
            marks.add("not run")
            return "not run"
        return "—"  # finished, but without this metric
    text = mean_std(r[f"{m}:mean"], r[f"{m}:std"], r[f"{m}:n"], spec_fmt)
    if r["flagged"]:
        text += FLAG
        marks.add(FLAG)
    if r["n_diverged"] or r["n_failed"]:
        text += DAGGER
        marks.add(DAGGER)
    return text


def write_spec_table(spec: TableSpec, runs: pd.DataFrame, out_dir, seeds_asked: int | None = None,
                     sources: str = "") -> list[Path]:
    """<out_dir>/<name>.md, .csv and .tex; returns their paths."""
    table, notes, bold = spec_table(spec, runs, seeds_asked)
    if sources:
        notes = [*notes, f"Source: {sources}."]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = spec.title or spec.name
    md = table.copy()
    for i, col in bold:
        md.loc[i, col] = f"**{md.loc[i, col]}**"
    paths = [out / f"{spec.name}.md", out / f"{spec.name}.csv", out / f"{spec.name}.tex"]
    text = [f"### {title}", ""] + ([spec.caption, ""] if spec.caption else []) + [to_markdown(md)]
    paths[0].write_text("\n".join(text) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    table.to_csv(paths[1], index=False)
    caption = f"{title}. {spec.caption}".strip() if spec.caption else title
    paths[2].write_text(to_latex(table, caption=caption, label=f"tab:{spec.name}", notes=notes, bold=bold))
    return paths


def render_tables(uri: str, spec_paths, out_dir, warn=print) -> list[Path]:
    """Every spec whose sweeps are in the tracking store; a spec whose sweeps are all absent is skipped
    with a warning. Returns the written paths; ReportError (one line naming every sweep to run) when
    none is written."""
    from smet_lab.report.data import with_missing
    from smet_lab.report.io import ReportError, load_sweep_runs

    loaded: dict = {}
    written, skipped = [], []
    for path in spec_paths:
        spec = load_spec(path)
        frames, asked, sources, missing = [], [], [], []
        for name in spec.sweep:
            if name not in loaded:
                try:
                    loaded[name] = load_sweep_runs(uri, name, lambda line: warn(f"smet_lab: warning: {line}"))
                except ReportError as exc:
                    loaded[name] = exc
            got = loaded[name]
            if isinstance(got, ReportError):
                missing.append((name, got))
                continue
            info, runs = got
            frames.append(with_missing(runs, info))
            asked.append(info.seeds_asked or 1)
            where = f"folder {info.sweep_dir}" if info.from_folder else f"parent run {info.parent_run_id or '—'}"
            sources.append(f"sweep {info.name} ({where}, {info.status or 'no parent'})")
        if not frames:
            skipped.append(f"smet_lab: warning: table {spec.name} skipped: {missing[0][1]}{_run_hint([n for n, _ in missing])}")
            continue
        if missing:
            warn(f"smet_lab: warning: table {spec.name}: sweep(s) {', '.join(n for n, _ in missing)} not found; "
                 f"built from the others{_run_hint([n for n, _ in missing])}")
        keys = [spec.rows] + ([spec.columns] if spec.columns else [])
        runs = merge_sweeps(frames, keys)
        written += write_spec_table(spec, runs, out_dir, max(asked), "; ".join(sources))
    absent = [name for name, got in loaded.items() if isinstance(got, ReportError)]
    if not written and absent:  # one line, not a warning per table that says the same
        raise ReportError(f"no table rendered: none of the specs' sweeps ({', '.join(absent)}) was found; "
                          f"{loaded[absent[0]]}{_run_hint(absent)}")
    for line in skipped:
        warn(line)
    return written


def _run_hint(names: list) -> str:
    """How to run the missing sweeps that ship with smet_lab (conf/sweep/NAME.yaml)."""
    from smet_lab.preflight import CONF_DIR

    shipped = [n for n in names if (CONF_DIR / "sweep" / f"{n}.yaml").is_file()]
    if len(shipped) > 2:
        return f"; run `python -m smet_lab +sweep=NAME` for each of {', '.join(shipped)}"
    return "; run " + " and ".join(f"`python -m smet_lab +sweep={n}`" for n in shipped) if shipped else ""


def default_specs() -> list[Path]:
    return sorted(SPECS_DIR.glob("*.yaml"))
