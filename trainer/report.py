"""A user's adapter history as pictures and a page: `adaptloop report` and the API's `/dashboard/{user_id}`.

    adaptloop report alice --out reports/alice

writes, from the registry alone:
    loss_v<N>.png   the loss of each version per step, as two series: the user
                    examples' cross-entropy and the anchors' KL to the base
                    model (their sum zig-zags with each batch's mix of rows)
    scores.png      the validation scores over versions (user suite, core suite,
                    the promotion threshold; rejected versions marked)
    index.html      the version history, rollbacks and both charts (embedded,
                    so the very same page is what the API serves)
    report.json     the numbers behind every picture

Each PNG also carries its numbers in a tEXt chunk ("adaptloop"), so a chart
can be checked against the registry without reading pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from trainer.registry import AdapterRegistry, version_label

PNG_KEY = "adaptloop"


def version_rows(registry: AdapterRegistry, user_id: str, infos: list | None = None) -> list[dict]:
    """One summary per version: what the API's history and the report show (`infos`: the versions, if already read)."""
    active = registry.active(user_id)
    rows = []
    for info in registry.versions(user_id) if infos is None else infos:
        manifest, m = info.manifest, info.manifest.metrics
        validation = manifest.validation
        rows.append(
            {
                "version": info.version,
                "validation_score": m.user_score,
                "core_score": m.core_score,
                "facts_learned": m.facts_learned,
                "retention": m.retention,
                "forgetting": m.forgetting,
                "passed": None if validation is None else validation.passed,
                "reasons": [] if validation is None else list(validation.reasons),
                "active": info.version == active,
                "trigger": manifest.trigger,
                "trained_at": None if manifest.trained_at is None else manifest.trained_at.isoformat(),
                "train_seconds": m.train_seconds,
                "gate_seconds": m.gate_seconds,
                "steps": m.steps,
                "final_loss": m.final_loss,
                "sha256": manifest.weights_sha256,
            }
        )
    return rows


def loss_series(manifest) -> dict[str, list[float | None]]:
    """The per-step series to draw: user loss and anchor KL (manifests before they were kept: the total loss)."""
    curves = {name: values for name, values in manifest.loss_curves.items() if any(v is not None for v in values)}
    return curves or ({"loss": list(manifest.loss_curve)} if manifest.loss_curve else {})


@dataclass
class Report:
    user_id: str
    rows: list[dict]
    loss_curves: dict[int, dict[str, list[float | None]]]
    events: list[dict]
    threshold: float | None
    images: dict[str, bytes] = field(default_factory=dict)
    html: str = ""

    def numbers(self) -> dict:
        return {
            "user_id": self.user_id,
            "versions": self.rows,
            "loss_curves": {str(k): v for k, v in self.loss_curves.items()},
            "events": self.events,
            "promote_if_score": self.threshold,
        }

    def write(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in self.images.items():
            (out_dir / name).write_bytes(data)
            written.append(out_dir / name)
        (out_dir / "index.html").write_text(self.html, encoding="utf-8")
        (out_dir / "report.json").write_text(json.dumps(self.numbers(), indent=2), encoding="utf-8")
        return [*written, out_dir / "index.html", out_dir / "report.json"]


def build_report(registry: AdapterRegistry, user_id: str, threshold: float | None = None) -> Report:
    infos = registry.versions(user_id)  # every manifest read once
    rows = version_rows(registry, user_id, infos)
    curves = {info.version: loss_series(info.manifest) for info in infos}
    events = [
        {
            "at": e.get("at"),
            "version": e.get("version"),
            "status": e.get("status"),
            "why": e.get("reason") or "; ".join(e.get("reasons", [])),
        }
        for e in registry.history(user_id)
    ]
    report = Report(user_id, rows, curves, events, threshold)
    for version, curve in curves.items():
        if curve:
            report.images[f"loss_v{version}.png"] = _loss_png(user_id, version, curve)
    if rows:
        report.images["scores.png"] = _scores_png(user_id, rows, threshold)
    report.html = _page(report)
    return report


# ---- charts (matplotlib's object API: no pyplot state, safe in the API's threads) ---- #


def _png(fig, numbers: dict) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={PNG_KEY: json.dumps(numbers)})
    return buffer.getvalue()


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    return fig, fig.add_subplot()


SERIES_LABELS = {
    "user": "user loss (cross-entropy on the user's answers)",
    "anchor_kl": "anchor KL (to the base model)",
    "loss": "loss",
}


def _loss_png(user_id: str, version: int, curves: dict[str, list[float | None]]) -> bytes:
    """One line per series; a step whose batch had no row of a kind is a gap in that line, not a zero."""
    fig, ax = _figure()
    for name, values in curves.items():
        steps = [i for i, v in enumerate(values, start=1) if v is not None]
        points = [v for v in values if v is not None]
        ax.plot(steps, points, marker="." if len(values) < 60 else None, label=SERIES_LABELS.get(name, name))
        ax.annotate(f"final {points[-1]:.4f}", (steps[-1], points[-1]), textcoords="offset points", xytext=(-60, 10))
    ax.set(title=f"{user_id} v{version}: training loss", xlabel="step", ylabel="loss")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    return _png(fig, {"user_id": user_id, "version": version, "loss_curves": curves})


def _scores_png(user_id: str, rows: list[dict], threshold: float | None) -> bytes:
    fig, ax = _figure()
    versions = [r["version"] for r in rows]
    for key, label in (("validation_score", "user suite"), ("core_score", "core suite")):
        points = [(r["version"], r[key]) for r in rows if r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    rejected = [(r["version"], r["validation_score"] or 0.0) for r in rows if r["passed"] is False]
    if rejected:
        ax.scatter(*zip(*rejected), marker="x", s=90, color="red", label="rejected", zorder=3)
    if threshold is not None:
        ax.axhline(threshold, linestyle="--", color="grey", label=f"promote if >= {threshold}")
    ax.set(title=f"{user_id}: validation scores", xlabel="version", ylabel="score", ylim=(0, 1.05), xticks=versions)
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(alpha=0.3)
    numbers = {
        "user_id": user_id,
        "versions": versions,
        "validation_score": [r["validation_score"] for r in rows],
        "core_score": [r["core_score"] for r in rows],
        "passed": [r["passed"] for r in rows],
    }
    return _png(fig, numbers)


# ---- the page --------------------------------------------------------------------------- #


def _cell(value) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _page(report: Report) -> str:
    def img(name: str) -> str:
        if name not in report.images:
            return ""
        data = base64.b64encode(report.images[name]).decode()
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'

    columns = [
        ("version", "version"),
        ("active", "active"),
        ("passed", "gate passed"),
        ("validation_score", "user score"),
        ("core_score", "core score"),
        ("facts_learned", "facts learned"),
        ("retention", "retention"),
        ("forgetting", "forgetting"),
        ("final_loss", "final loss"),
        ("steps", "steps"),
        ("train_seconds", "train s"),
        ("trigger", "trigger"),
        ("trained_at", "trained at"),
    ]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        f'<tr class="{"active" if r["active"] else ("rejected" if r["passed"] is False else "")}">'
        + "".join(f"<td>{_cell(r[key])}</td>" for key, _ in columns)
        + "</tr>"
        for r in reversed(report.rows)
    )
    events = "".join(
        f"<li>{_cell(e['at'])} {_cell(version_label(e['version']))} <b>{_cell(e['status'])}</b>"
        + (f" &mdash; {_cell(e['why'])}" if e["why"] else "")
        + "</li>"
        for e in report.events
    )
    losses = "".join(img(f"loss_v{r['version']}.png") for r in reversed(report.rows))
    user = html.escape(report.user_id)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>adaptloop: {user}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
tr.active {{ background: #e6f4ea; }} tr.rejected {{ background: #fde8e8; }} img {{ max-width: 640px; margin: 4px; }}
</style></head>
<body>
<h1>Adapters of {user}</h1>
<p>{len(report.rows)} version(s); active: {next((f"v{r['version']}" for r in report.rows if r["active"]), "none (base model)")}.</p>
<h2>Versions</h2>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Validation scores</h2>
{img("scores.png")}
<h2>Loss curves</h2>
{losses}
<h2>History</h2>
<ul>{events}</ul>
</body></html>
"""
