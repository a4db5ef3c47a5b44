"""What an export wrote and how each output held up when loaded back: one result type for every format.

    report = sftlib.export(model, tokenizer, cfg, ["lora", "merged_16bit", "gguf:q4_k_m"])
    print(report.table())                 # format, where, size, seconds, verification
    report.ok, report.paths["gguf:q4_k_m"], report.items[0].check["top1_agreement"]
    report.raise_if_failed()              # ExportVerifyError naming every output that failed its check

GGUF files are outputs like the others (format `gguf:TYPE`); the GGUF step's own report, written as
`gguf/gguf_report.json`, is an `ExportReport` too, with the llama.cpp settings under `extra`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sftlib.errors import SftlibError
from sftlib.files import atomic_write_text, human_size


class ExportError(SftlibError):
    """Formats that cannot be written as asked; the message names each one and what to do."""


class ExportVerifyError(ExportError):
    """A written output did not pass its check; it is kept as NAME.failed and the details are in the report."""

    def __init__(self, message: str, report: "ExportReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass
class Output:
    format: str            # lora | merged_16bit | merged_4bit | gguf:TYPE
    path: str              # the folder or file written (NAME.failed when it failed its check)
    bytes: int = 0
    seconds: float = 0.0   # to write it
    ok: bool | None = None  # None: not verified
    summary: str = ""      # the check in one line
    check: dict = field(default_factory=dict)  # every figure of the check; `problems` when it failed


def check_summary(check: dict) -> str:
    """One line for the table: logit distance, top-1 agreement, KL, greedy replies kept, stops kept."""
    prompts = check.get("prompts") or len(check.get("greedy", [])) or "?"
    return (f"max|dlogit| {check.get('max_abs_dlogit', float('nan')):.2g}  "
            f"top-1 {check.get('top1_agreement', 0.0):.1%}  KL {check.get('mean_kl', float('nan')):.1e}  "
            f"greedy {check.get('greedy_identical', 0)}/{prompts}  "
            f"stops {check.get('stopped', 0)}/{check.get('stop_expected', 0)}")


@dataclass
class ExportReport:
    out_dir: str
    items: list[Output] = field(default_factory=list)
    seconds: float = 0.0
    report_path: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. the GGUF step's llama.cpp settings and Modelfile

    @property
    def ok(self) -> bool:
        return all(o.ok is not False for o in self.items)

    @property
    def paths(self) -> dict[str, str]:
        """{format: file or folder}, one entry per GGUF type (`gguf:q4_k_m`)."""
        return {o.format: o.path for o in self.items}

    @property
    def outputs(self) -> dict[str, str]:
        """{output: folder}: `lora`, `merged_16bit`, `merged_4bit`, and `gguf` for the GGUF folder."""
        found = {}
        for o in self.items:
            kind = "gguf" if o.format.startswith("gguf:") else o.format
            found[kind] = str(Path(o.path).parent) if kind == "gguf" else o.path
        return found

    def failures(self) -> list[Output]:
        return [o for o in self.items if o.ok is False]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> "ExportReport":
        data = json.loads(text)
        data["items"] = [Output(**o) for o in data.get("items", [])]
        return cls(**data)

    def write(self, path: str | Path) -> Path:
        """Save as JSON (atomically) and remember where."""
        self.report_path = str(path)
        return atomic_write_text(path, self.to_json())

    def table(self) -> str:
        rows = [f"{'format':<14} {'written':<40} {'size':>10} {'s':>7}  verification"]
        for o in self.items:
            verdict = "not verified" if o.ok is None else ("ok" if o.ok else "FAILED")
            shown = self._shown(o.path)
            rows.append(f"{o.format:<14} {shown:<40} {human_size(o.bytes):>10} {o.seconds:>7.1f}  {verdict}"
                        + (f"  {o.summary}" if o.summary else ""))
        return "\n".join(rows)

    def _shown(self, path: str) -> str:
        """Inside the export folder: relative, short; anywhere else, or with the export folder at a root (`/`, where
        relative would drop the leading `/` and read as a path under the working directory): the whole path."""
        where, out = Path(path), Path(self.out_dir)
        if not self.out_dir or out == Path(out.anchor) or where.is_absolute() != out.is_absolute():
            return str(where)
        try:
            return str(where.relative_to(out))
        except ValueError:
            return str(where)

    def raise_if_failed(self) -> "ExportReport":
        """Raise ExportVerifyError naming every output that failed its check; returns self otherwise."""
        failed = self.failures()
        if failed:
            lines = [f"  - {o.format} ({Path(o.path).name}): {'; '.join(o.check.get('problems', []))}" for o in failed]
            where = f"; details in {self.report_path}" if self.report_path else ""
            raise ExportVerifyError(f"verification failed (kept aside as *.failed{where}):\n" + "\n".join(lines),
                                    report=self)
        return self
