"""Which engine runs: decided once, with the reason, before anything heavy is imported.

    from sftlib.training.backend import choose_backend
    backend = choose_backend("auto")     # Backend(name="cpu", device="cpu", reason="no CUDA GPU ...")
    print(backend)

- `unsloth`: a CUDA GPU and `import unsloth` works. Unsloth patches transformers, TRL and PEFT when it
  is imported, so it must come first: `choose_backend` imports it before anything imports transformers.
- `hf`: a CUDA GPU without Unsloth: transformers + PEFT + bitsandbytes.
- `cpu`: transformers + PEFT in full precision. 4-bit loading and 8-bit optimizers need CUDA, so they
  fall back (to full-precision weights and `adamw_torch`) with one warning each, see `resolve()`.

Nothing else in sftlib branches on the engine except through the `Backend` object.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass

from sftlib.errors import SftlibError

NAMES = ("auto", "unsloth", "hf", "cpu")


class BackendError(SftlibError):
    """The engine asked for cannot run here; the message says why and what to use instead."""


@dataclass(frozen=True)
class Backend:
    name: str    # "unsloth" | "hf" | "cpu"
    device: str  # "cuda" | "cpu"
    reason: str

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def __str__(self) -> str:
        return f"backend: {self.name} ({self.reason})"


def _cuda_available() -> bool:
    if os.environ.get("SFTLIB_FORCE_CPU") == "1":
        return False
    import torch

    return torch.cuda.is_available()


def _try_import_unsloth() -> str | None:
    """Import Unsloth; returns None on success or the reason it cannot be used."""
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed"
    if "transformers" in sys.modules and "unsloth" not in sys.modules:
        # Unsloth can still work, but its patches may miss modules already imported.
        warnings.warn("transformers was imported before unsloth; import sftlib first for Unsloth's full speed-ups")
    try:
        import unsloth  # noqa: F401  (imported for its patches)
    except Exception as exc:  # unsloth raises plain Exceptions/NotImplementedError when it cannot run
        return f"unsloth failed to import: {type(exc).__name__}: {exc}"
    return None


def choose_backend(requested: str = "auto") -> Backend:
    """Pick the engine for `requested` ("auto", "unsloth", "hf", "cpu"); raises BackendError if impossible."""
    if requested not in NAMES:
        raise BackendError(f"`backend` must be one of {', '.join(NAMES)}, got {requested!r}")
    if requested == "cpu":
        return Backend("cpu", "cpu", "asked for in the config")
    cuda = _cuda_available()
    if not cuda:
        if requested in ("unsloth", "hf"):
            raise BackendError(f"`backend: {requested}` needs a CUDA GPU and none was found; use `backend: auto` or `cpu`")
        return Backend("cpu", "cpu", "no CUDA GPU found; transformers + peft in full precision")
    if requested == "hf":
        return Backend("hf", "cuda", "asked for in the config")
    why_not = _try_import_unsloth()
    if why_not is None:
        from sftlib.training.packed_attention import enable

        note = enable()  # packed rows: one attention call per layer where Unsloth would make one per document
        return Backend("unsloth", "cuda", "CUDA GPU and unsloth imported" + (f"; {note}" if note else ""))
    if requested == "unsloth":
        raise BackendError(f"`backend: unsloth` cannot be used: {why_not}; use `backend: hf` or `auto`")
    return Backend("hf", "cuda", f"CUDA GPU, but {why_not}; transformers + peft + bitsandbytes")


def resolve(cfg, backend: Backend) -> list[str]:
    """Adjust `cfg` (a RunConfig) in place to what `backend` can run; returns one note per change.

    Each fallback is also warned once, so a user who only reads warnings still sees it.
    """
    notes = []
    if not backend.cuda:
        if cfg.model.load_in_4bit:
            cfg.model.load_in_4bit = False
            notes.append("`model.load_in_4bit` needs CUDA (bitsandbytes); loading full-precision weights instead")
        if "8bit" in cfg.train.optim or "bnb" in cfg.train.optim:
            notes.append(f"`train.optim: {cfg.train.optim}` needs CUDA (bitsandbytes); using `adamw_torch` instead")
            cfg.train.optim = "adamw_torch"
        if cfg.train.gradient_checkpointing == "unsloth":
            notes.append("`train.gradient_checkpointing: unsloth` is Unsloth's; using transformers' checkpointing")
            cfg.train.gradient_checkpointing = "true"
    elif backend.name == "hf" and cfg.train.gradient_checkpointing == "unsloth":
        notes.append("`train.gradient_checkpointing: unsloth` needs Unsloth; using transformers' checkpointing")
        cfg.train.gradient_checkpointing = "true"
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return notes
