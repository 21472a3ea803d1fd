"""`report.html`: one self-contained page (images as `data:` URIs, charts as inline
SVG, no script, no external file or network), so it opens the same from the KFP UI,
a DVC plots page, a registry folder or a mail attachment."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from components.common.records import Comparison, EvalSample, GateCheck

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.muted{color:#666} table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.pass{color:#0a7d2c;font-weight:600} .fail{color:#b3261e;font-weight:600}
.verdict{display:inline-block;padding:4px 10px;border-radius:4px;margin:8px 0}
.verdict.pass{background:#e6f4ea} .verdict.fail{background:#fce8e6}
.samples td{text-align:center;vertical-align:top}
.samples img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ddd}
.charts{display:flex;flex-wrap:wrap;gap:24px}
"""
_COLOURS = {"base": "#888888", "tuned": "#1a73e8", "loss": "#1a73e8"}


def render_report(
    *,
    title: str,
    details: list[tuple[str, str]],
    comparisons: list[Comparison],
    checks: list[GateCheck],
    passed: bool,
    samples: list[EvalSample],
    folder: Path,
    val_loss: dict[str, dict[int, float]],
    clip_by_prompt: list[tuple[str, float, float]],
    loss_curve: list[tuple[int, float]],
) -> str:
    """The page. `samples`: image files under `folder`; `val_loss`: {model: {timestep:
    loss}}; `clip_by_prompt`: (prompt, base, tuned); `loss_curve`: the training loss."""
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        "<p class='muted'>" + " · ".join(f"{esc(k)}: {esc(v)}" for k, v in details) + "</p>",
    ]
    verdict = "pass" if passed else "fail"
    word = "passed: publishable" if passed else "FAILED: not published"
    parts.append(f"<div class='verdict {verdict}'>Gate {word}</div>")
    parts.append("<h2>Gate</h2><table><tr><th>check</th><th>value</th><th>threshold</th>")
    parts.append("<th>verdict</th></tr>")
    for c in checks:
        cls = "pass" if c.passed else "fail"
        parts.append(
            f"<tr><td>{esc(c.name)}</td><td>{c.value:.4g}</td><td>{esc(c.comparison)} "
            f"{c.threshold:g}</td><td class='{cls}'>{'passed' if c.passed else 'failed'}</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>base</th><th>fine-tuned</th>")
    parts.append("<th>delta</th><th>better</th></tr>")
    for c in comparisons:
        delta = c.tuned - c.base
        improved = delta < 0 if c.better == "lower" else delta > 0
        cls = "pass" if improved else ("" if delta == 0 else "fail")
        parts.append(
            f"<tr><td>{esc(c.label)}</td><td>{c.base:.4g}</td><td>{c.tuned:.4g}</td>"
            f"<td class='{cls}'>{delta:+.4g}</td><td>{c.better}</td></tr>"
        )
    parts.append("</table>")
    if clip_by_prompt:
        parts.append("<h2>CLIP score by prompt</h2><table><tr><th>prompt</th><th>base</th>")
        parts.append("<th>fine-tuned</th></tr>")
        for prompt, base, tuned in clip_by_prompt:
            parts.append(f"<tr><td>{esc(prompt)}</td><td>{base:.4g}</td><td>{tuned:.4g}</td></tr>")
        parts.append("</table>")
    parts.append(_samples(samples, folder))
    parts.append("<div class='charts'>")
    parts.append(
        _figure(
            "Held-out loss by timestep",
            svg_lines({m: sorted(d.items()) for m, d in val_loss.items()}, "timestep", "loss"),
        )
    )
    if loss_curve:
        parts.append(_figure("Training loss", svg_lines({"loss": loss_curve}, "step", "loss")))
    parts.append("</div></body></html>\n")
    return "".join(parts)


def _samples(samples: list[EvalSample], folder: Path) -> str:
    """Per prompt, one row: every seed's base image, then every seed's tuned image."""
    if not samples:
        return ""
    models = list(samples[0].images)
    by_prompt: dict[str, list[EvalSample]] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt, []).append(s)
    seeds = [s.seed for s in next(iter(by_prompt.values()))]
    rows = ["<h2>Samples (same seeds for both models)</h2><table class='samples'><tr>"]
    rows.append("<th>prompt</th>")
    rows += [f"<th>{html.escape(m)}<br>seed {seed}</th>" for m in models for seed in seeds]
    rows.append("</tr>")
    for prompt, group in by_prompt.items():
        rows.append(f"<tr><td>{html.escape(prompt)}</td>")
        for m in models:
            for s in group:
                rows.append(
                    f"<td>{_img(folder / s.images[m], f'{m}, seed {s.seed}: {prompt}')}</td>"
                )
        rows.append("</tr>")
    rows.append("</table>")
    return "".join(rows)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption><b>{html.escape(caption)}</b></figcaption>{svg}</figure>"


def svg_lines(
    series: dict[str, list[tuple[float, float]]],
    x_label: str,
    y_label: str,
    width: int = 420,
    height: int = 260,
) -> str:
    """A line chart of `series` ({name: [(x, y), ...]}) as inline SVG, with axes, ticks
    at the ends and a legend."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return "<svg width='0' height='0'></svg>"
    left, right, top, bottom = 56, 12, 12, 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def sy(y: float) -> float:
        return top + h - (y - y0) / (y1 - y0) * h

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-size='11' font-family='sans-serif'>",
        f"<rect x='{left}' y='{top}' width='{w}' height='{h}' fill='none' stroke='#bbb'/>",
    ]
    for v in (y0, (y0 + y1) / 2, y1):
        out.append(f"<text x='{left - 4}' y='{sy(v) + 4:.1f}' text-anchor='end'>{v:.3g}</text>")
    for v in (x0, x1):
        out.append(f"<text x='{sx(v):.1f}' y='{top + h + 14}' text-anchor='middle'>{v:g}</text>")
    out.append(
        f"<text x='{left + w / 2}' y='{height - 6}' text-anchor='middle'>"
        f"{html.escape(x_label)}</text>"
    )
    out.append(
        f"<text x='12' y='{top + h / 2}' text-anchor='middle' "
        f"transform='rotate(-90 12 {top + h / 2})'>{html.escape(y_label)}</text>"
    )
    for i, (name, pts) in enumerate(series.items()):
        colour = _COLOURS.get(name, "#d93025")
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        out.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{path}'/>")
        if len(pts) <= 20:
            out += [
                f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{colour}'/>" for x, y in pts
            ]
        ly = top + 14 + 14 * i
        out.append(
            f"<line x1='{left + w - 70}' y1='{ly - 4}' x2='{left + w - 56}' y2='{ly - 4}' "
            f"stroke='{colour}' stroke-width='2'/>"
        )
        out.append(f"<text x='{left + w - 52}' y='{ly}'>{html.escape(name)}</text>")
    out.append("</svg>")
    return "".join(out)
