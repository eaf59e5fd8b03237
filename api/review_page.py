"""The dashboard's review page (`GET /dashboard`): every pending review with what a reviewer decides on.

Per review (trainer/review.py's `review_details`): the gate's numbers, each
user-suite case with the answer before (the active version's, or the base
model's) and after (the candidate's) and both scores, the previous version's
facts, and the core prompts whose answers changed most. Plain HTML, no
script: decisions go through the API or `adaptloop review`.
"""

from __future__ import annotations

import html
from typing import Any


def _text(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _cases(title: str, cases: list[dict[str, Any]]) -> str:
    if not cases:
        return f"<h4>{html.escape(title)}</h4><p>none</p>"
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{_text(c.get(k))}</td>" for k in ("prompt", "expected", "before", "answer", "before_score", "score"))
        + "</tr>"
        for c in cases
    )
    head = "".join(f"<th>{t}</th>" for t in ("prompt", "expected", "before", "after", "score before", "score after"))
    return f"<h4>{html.escape(title)}</h4><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _contradictions(found: list[dict[str, Any]]) -> str:
    if not found:
        return ""
    head = "".join(f"<th>{t}</th>" for t in ("question", "taught", "the base model says", "its fact", "probability"))
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{_text(c.get(k))}</td>" for k in ("prompt", "taught", "base_answer", "term", "confidence"))
        + "</tr>"
        for c in found
    )
    return f"<h4>Taught answers that contradict the base model</h4><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _review(details: dict[str, Any], timeout: str) -> str:
    r = details["review"]
    numbers = ", ".join(f"{_text(k)} {_text(v)}" for k, v in details["metrics"].items()) or "not recorded"
    rid = html.escape(r["review_id"])
    return (
        f'<section id="{rid}"><h3>{rid}: {_text(r["user_id"])} v{_text(r["version"])}</h3>'
        f"<p>opened {_text(r['opened_at'])}; {html.escape(timeout)}. Gate: {numbers}.</p>"
        f"<p><code>adaptloop review approve {rid}</code> or <code>adaptloop review deny {rid} --reason ...</code>"
        f" (API: <code>POST /api/adapter/reviews/{rid}/approve</code>, <code>.../deny</code>)</p>"
        + (f"<p><b>Waits because:</b> {_text(r.get('opened_because'))}</p>" if r.get("opened_because") else "")
        + _contradictions(details.get("contradictions", []))
        + _cases("User suite: before and after", details["user_cases"])
        + _cases("What the previous version learned", details["previous_facts"])
        + _cases("Core prompts whose answers changed most", details["core_changed"])
        + "</section>"
    )


def review_page(pending: list[dict[str, Any]], timeout: str) -> str:
    """The page for `pending` (each `review_details`); `timeout` says what happens to a review left alone."""
    body = "".join(_review(d, timeout) for d in pending) or "<p>No review is pending.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>adaptloop: pending reviews</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
section {{ border-top: 2px solid #888; margin-top: 1.5em; }}
</style></head>
<body>
<h1>Pending reviews ({len(pending)})</h1>
{body}
</body></html>
"""
