"""The pre-flight report: findings, the label-mask preview and the length histogram, in three renderings.

    report.to_text()     # logs: trained text between « », newlines shown as ↵
    report.to_ansi()     # a terminal: severities in colour, trained text in green
    report.to_html()     # a notebook (also what `report` alone shows there)
    report.to_dict()     # JSON-ready, for papermill runs and tests
    report.raise_if_fatal()

Built by sftlib.checks.preflight.preflight; see there for what each finding means.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from sftlib.errors import SftlibError

FATAL, WARNING, INFO = "fatal", "warning", "info"
_ANSI = {FATAL: "\x1b[1;31m", WARNING: "\x1b[33m", INFO: "\x1b[36m", "on": "\x1b[1;32m", "off": "\x1b[2m",
         "end": "\x1b[0m"}
_COLOURS = {FATAL: "#c62828", WARNING: "#ef6c00", INFO: "#1565c0"}


def _code(text: str) -> str:
    """`field` in a message -> <code>field</code> in HTML."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


class PreflightError(SftlibError):
    """Fatal pre-flight findings; `.report` holds the whole report."""

    def __init__(self, report: "Report"):
        self.report = report
        lines = "\n".join(f"  - [{f.code}] {f.message}" for f in report.fatal)
        super().__init__(f"{len(report.fatal)} fatal pre-flight finding(s), nothing was trained:\n{lines}\n"
                         "Fix them, or set `train.preflight: warn` to train anyway.")


@dataclass
class Finding:
    severity: str  # fatal | warning | info
    code: str
    message: str


@dataclass
class Preview:
    row: int
    segments: list  # (text, trained) pairs in order
    tokens: int
    trained: int


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    previews: list[Preview] = field(default_factory=list)
    rows_total: int = 0
    rows_checked: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    row_shares: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # uncut lengths of the rows checked
    max_seq_length: int = 0
    truncated_rows: int = 0
    trained_lost: int | None = None  # trained tokens that truncation removes (None: unknown without raw rows)
    estimate: object = None  # sftlib.training.memory.Estimate

    @property
    def fatal(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == FATAL]

    @property
    def ok(self) -> bool:
        return not self.fatal

    def codes(self, severity: str | None = None) -> list[str]:
        return [f.code for f in self.findings if severity in (None, f.severity)]

    def raise_if_fatal(self) -> "Report":
        if self.fatal:
            raise PreflightError(self)
        return self

    def histogram(self, bins: int = 12) -> list[tuple[int, int, int]]:
        """(low, high, rows with low < length <= high) over the uncut lengths; max_seq_length is a bucket edge.

        At most `bins` buckets up to max_seq_length and `bins` more above it: the buckets past the limit widen
        when the longest row is far beyond it, so a row 1000 times too long adds a few lines, not thousands."""
        if not self.lengths:
            return []
        top, limit = max(self.lengths), self.max_seq_length
        if limit and limit < top:
            k = max(1, round(bins * limit / top))
            edges = [round(j * limit / k) for j in range(k + 1)]
            step = max(1, edges[1] - edges[0], -(-(top - limit) // bins))
            while edges[-1] < top:
                edges.append(edges[-1] + step)
        else:
            step = max(1, -(-top // bins))
            edges = list(range(0, top + step, step))
        out = [(lo, hi, sum(lo < n <= hi for n in self.lengths)) for lo, hi in zip(edges, edges[1:])]
        while out and out[0][2] == 0:  # start at the shortest rows
            out.pop(0)
        return out

    def to_dict(self) -> dict:
        e = self.estimate
        return {
            "ok": self.ok, "findings": [vars(f) for f in self.findings], "rows_total": self.rows_total,
            "rows_checked": self.rows_checked, "tokens": self.tokens, "trained_tokens": self.trained_tokens,
            "trained_share": self.trained_tokens / self.tokens if self.tokens else 0.0,
            "max_seq_length": self.max_seq_length, "truncated_rows": self.truncated_rows,
            "trained_lost": self.trained_lost, "histogram": self.histogram(),
            "memory": None if e is None else {"parts_gib": e.parts, "peak_gib": e.peak_gib, "gpu": e.gpu,
                                              "gpu_gib": e.gpu_gib, "verdict": e.verdict, "suggestion": e.suggestion,
                                              "step_seconds": e.step_seconds},
        }

    # ---- rendering --------------------------------------------------------------------------------

    def _summary(self) -> str:
        n = {s: sum(f.severity == s for f in self.findings) for s in (FATAL, WARNING, INFO)}
        return (f"pre-flight: {n[FATAL]} fatal, {n[WARNING]} warning{'' if n[WARNING] == 1 else 's'}, {n[INFO]} info "
                f"({self.rows_checked} of {self.rows_total} rows checked)")

    def _text_histogram(self, width: int = 40) -> list[str]:
        buckets = self.histogram()
        if not buckets:
            return []
        most = max(c for _, _, c in buckets) or 1
        lines = [f"row lengths in tokens (uncut; `model.max_seq_length` = {self.max_seq_length}):"]
        for lo, hi, c in buckets:
            cut = " cut" if self.max_seq_length and lo >= self.max_seq_length else ""
            lines.append(f"  {lo + 1:>6}-{hi:<6} {'#' * round(width * c / most):<{width}} {c}{cut}")
        return lines

    def _plain(self, ansi: bool) -> str:
        def paint(text: str, key: str) -> str:
            return f"{_ANSI[key]}{text}{_ANSI['end']}" if ansi else text

        lines = [self._summary()]
        for f in self.findings:
            lines.append(f"  {paint(f'{f.severity.upper():<7}', f.severity)} {f.code}: {f.message}")
        if self.previews:
            lines.append("label mask preview (" + ("trained text in green" if ansi else "trained text between « »") + "):")
        for p in self.previews:
            lines.append(f"--- row {p.row}: {p.tokens} tokens, {p.trained} trained")
            body = "".join(paint(t, "on") if on and ansi else f"«{t}»" if on else paint(t, "off") if ansi else t
                           for t, on in p.segments)
            lines.append(body.replace("\n", "↵\n"))
        lines += self._text_histogram()
        if self.estimate is not None:
            lines += ["memory estimate (peak during training):", self.estimate.to_text()]
        return "\n".join(lines)

    def to_text(self) -> str:
        """Plain text for logs: trained text between « and », newlines shown as ↵."""
        return self._plain(ansi=False)

    def to_ansi(self) -> str:
        """For a terminal: severities in colour, trained text in green, the rest dimmed."""
        return self._plain(ansi=True)

    def __str__(self) -> str:
        return self.to_text()

    def to_html(self) -> str:
        """For a notebook: a findings table, the preview with trained tokens highlighted, a length histogram."""
        esc = html.escape
        out = [f"<div style='font-family:sans-serif;font-size:13px'><b>{esc(self._summary())}</b>",
               "<table style='border-collapse:collapse;margin:6px 0'>"]
        for f in self.findings:
            out.append(f"<tr><td style='color:{_COLOURS[f.severity]};font-weight:bold;padding:2px 8px'>"
                       f"{f.severity}</td><td style='padding:2px 8px'><code>{esc(f.code)}</code></td>"
                       f"<td style='padding:2px 8px'>{_code(esc(f.message))}</td></tr>")
        out.append("</table>")
        if self.previews:
            out.append("<div>label mask preview: <span style='background:#b9f6ca'>trained</span> "
                       "<span style='color:#999'>not trained</span></div>")
        for p in self.previews:
            spans = "".join(f"<span style='background:#b9f6ca'>{esc(t)}</span>" if on
                            else f"<span style='color:#999'>{esc(t)}</span>" for t, on in p.segments)
            out.append(f"<div style='margin-top:6px'>row {p.row}: {p.tokens} tokens, {p.trained} trained</div>"
                       f"<pre style='white-space:pre-wrap;border:1px solid #ddd;padding:4px;margin:2px 0'>"
                       f"{spans.replace(chr(10), '↵' + chr(10))}</pre>")
        buckets = self.histogram()
        if buckets:
            most = max(c for _, _, c in buckets) or 1
            out.append(f"<div style='margin-top:6px'>row lengths in tokens (uncut; bars in red are cut at "
                       f"<code>model.max_seq_length</code> = {self.max_seq_length})</div><table>")
            for lo, hi, c in buckets:
                colour = "#e57373" if self.max_seq_length and lo >= self.max_seq_length else "#64b5f6"
                out.append(f"<tr><td style='text-align:right;padding-right:6px'>{lo + 1}-{hi}</td><td>"
                           f"<div style='background:{colour};height:10px;width:{300 * c / most:.0f}px'></div>"
                           f"</td><td style='padding-left:6px'>{c}</td></tr>")
            out.append("</table>")
        if self.estimate is not None:
            out.append(f"<div style='margin-top:6px'>memory estimate (peak during training):</div>"
                       f"<pre>{esc(self.estimate.to_text())}</pre>")
        return "\n".join(out) + "</div>"

    def _repr_html_(self) -> str:
        return self.to_html()
