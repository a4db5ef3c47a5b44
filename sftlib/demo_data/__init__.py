"""The bundled demo data: `path()` is the ShareGPT JSONL file that `data.source: demo` loads."""

from pathlib import Path


def path() -> Path:
    return Path(__file__).parent / "reviews.jsonl"
