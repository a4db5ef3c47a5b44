"""The llama.cpp side of GGUF export: metadata settings, one converter run, one quantization.

    from sftlib.exports.gguf.convert import gguf_settings, convert, quantize
    settings = gguf_settings(tokenizer, template)          # chat template, BOS rule, end of turn, stops
    convert("model/merged_16bit", "m.F16.gguf", "f16", settings=settings, model_name="my-model")
    quantize("m.F16.gguf", "m.Q4_K_M.gguf", "q4_k_m")

`convert` runs llama.cpp's own `convert_hf_to_gguf.py` (from `python -m sftlib gguf-setup`) in a
fresh interpreter and wires in what the converter cannot be told on its command line: the settings
above, applied where gguf-py writes the special tokens, and a pre-tokenizer name for BPE tokenizers
the converter does not recognise. `quantize` calls `llama_cpp.llama_model_quantize`, or a
`llama-quantize` on PATH when the Python binding is missing. `sftlib.exports.gguf.export.export_gguf` is the
function to call; these are its parts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sftlib.child import run_child
from sftlib.exports.report import ExportError, ExportVerifyError

FLOAT_TYPES = ("f32", "f16", "bf16")
# Types llama.cpp refuses to make without an importance matrix, which this export does not compute.
NEEDS_IMATRIX = ("iq2_xxs", "iq2_xs", "iq2_s", "iq1_s", "iq1_m")
# Approximate bits per weight, for the disk-space estimate only (the "_m" mixes keep some tensors wider).
BITS_PER_WEIGHT = {
    "f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5, "q5_0": 5.5,
    "q5_1": 6.0, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_0": 4.5, "q4_1": 5.0, "q3_k_l": 4.3, "q3_k_m": 3.9,
    "q3_k_s": 3.5, "q2_k": 3.4, "q2_k_s": 3.0, "iq4_nl": 4.5, "iq4_xs": 4.3, "iq3_m": 3.7, "iq3_s": 3.5,
    "iq3_xs": 3.3, "iq3_xxs": 3.1, "iq2_m": 2.7, "tq1_0": 1.7, "tq2_0": 2.1,
}
# tokenizer.json split regexes of known families -> llama.cpp pre-tokenizer names (for the suggestion).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEXES = {_LLAMA3_SPLIT: "llama-bpe", _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}


class GGUFExportError(ExportError):
    """The export cannot run as asked; the message names the argument or file and the fix."""


class GGUFVerifyError(ExportVerifyError, GGUFExportError):
    """A written GGUF failed its checks; it was kept as NAME.gguf.failed and the report says why."""


@dataclass
class GGUFSettings:
    """What the GGUF must say so llama.cpp runs the model the way it was trained."""

    chat_template: str  # written as tokenizer.chat_template
    add_bos: bool  # tokenizer.ggml.add_bos_token
    bos_token: str | None
    eos_token: str | None
    eos_token_id: int | None
    eot_token_id: int | None  # the template's end-of-turn token; written as tokenizer.ggml.eot_token_id
    stop_strings: list[str] = field(default_factory=list)  # every stop token of the template, as text
    stop_token_ids: list[int] = field(default_factory=list)
    # SentencePiece-style vocabularies only: does text right after a special token get the "▁" word
    # marker? llama.cpp adds it by default; transformers' tokenizers mostly do not. None: not SentencePiece.
    add_space_prefix: bool | None = None


def gguf_settings(tokenizer, template, add_bos: bool | None = None) -> GGUFSettings:
    """Chat template, BOS rule and stop tokens for the GGUF, from the tokenizer and template used in training."""
    from sftlib.data.encode import adds_bos
    from sftlib.training.tokenizer import stop_token_ids
    from sftlib.data.templates import get_template

    template = get_template(template)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    trained_with_bos = bool(bos) and (template.uses_bos or adds_bos(tokenizer))
    add_bos = trained_with_bos if add_bos is None else bool(add_bos)
    jinja = template.jinja
    if add_bos and not template.uses_bos:
        jinja = "{{ bos_token }}" + jinja
    eot = template.end_of_turn_text(eos)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot and eot in tokenizer.get_vocab() else None
    return GGUFSettings(chat_template=jinja, add_bos=add_bos, bos_token=bos, eos_token=eos,
                        eos_token_id=tokenizer.eos_token_id, eot_token_id=eot_id,
                        stop_strings=template.stop_strings(eos), stop_token_ids=stop_token_ids(tokenizer, template),
                        add_space_prefix=_space_prefix_after_special(tokenizer))


def _space_prefix_after_special(tokenizer) -> bool | None:
    """For a SentencePiece-style tokenizer (words start with "▁"), whether a word right after a special
    token gets "▁" too, measured on the tokenizer itself; None for other tokenizers. In a chat prompt all
    text follows a special token (BOS, or the template's markers), so this is the behaviour that counts."""
    first = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"][:1])
    special = tokenizer.bos_token or tokenizer.eos_token
    if not first or not str(first[0]).startswith("\u2581") or not special:
        return None
    ids = tokenizer(special + "a", add_special_tokens=False)["input_ids"]
    return str(tokenizer.convert_ids_to_tokens(ids[1:2])[0]).startswith("\u2581")


def suggest_pre_tokenizer(model_dir: str | Path) -> str | None:
    """The llama.cpp pre-tokenizer name matching tokenizer.json's split rule, when it is a known one."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"  # ByteLevel's own regex is GPT-2's
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if regex in PRE_TOKENIZER_REGEXES:
                return PRE_TOKENIZER_REGEXES[regex]
    return None


def merge_rank_scores(model_dir: str | Path) -> dict[str, float] | None:
    """Piece scores for llama.cpp's SentencePiece tokenizer, from tokenizer.json's BPE merges: the order
    in which the HF tokenizer that training used merges pieces; None when the vocabulary is not that kind.

    llama.cpp's "llama" tokenizer merges, at each step, the adjacent pair whose joined piece has the
    highest score. Without tokenizer.model (transformers 5 saves only tokenizer.json) the converter gives
    every piece -1000, so it merges left to right ("Give" becomes Gi|ve where SentencePiece and
    transformers give G|ive). tokenizer.json's merges are in merge order, so piece score = -(rank of the
    first merge that makes it) restores that order. Pieces no merge makes (single characters, bytes,
    specials) are never the result of a merge, so their score never decides one; they get one below
    every merged piece. These scores are used with tokenizer.model too: its own scores (which Gemma's and
    Phi-3's converters read) make llama.cpp split like SentencePiece, and SentencePiece and transformers
    part ways on runs of spaces (Llama 2's "Hello  world": `▁|▁world` against transformers' `▁▁|world`);
    training's ids are transformers'."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    merges = model.get("merges") or []
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not merges:
        return None  # byte-level BPE (GPT-2 style) goes through the converter's "gpt2" vocabulary
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    floor = -float(len(merges))
    return {piece: scores.get(piece, floor) for piece in model.get("vocab") or {}}


def check_types(quantizations) -> list[str]:
    """Lower-cased types, or GGUFExportError listing every unknown or unsupported one."""
    types = [str(q).strip().lower() for q in quantizations]
    problems = []
    if not types:
        problems.append("`quantizations` is empty; ask for at least one type, e.g. q4_k_m")
    for q in types:
        if q in NEEDS_IMATRIX:
            problems.append(f"`{q}` needs an importance matrix, which this export does not compute; use q2_k or iq2_m")
        elif q not in BITS_PER_WEIGHT:
            problems.append(f"unknown quantization `{q}`; known: {', '.join(BITS_PER_WEIGHT)}")
    dupes = sorted({q for q in types if types.count(q) > 1})
    if dupes:
        problems.append(f"`quantizations` lists {dupes} twice")
    if problems:
        raise GGUFExportError("cannot export GGUF:\n" + "\n".join(f"  - {p}" for p in problems))
    return types


def estimate_bytes(model_dir: str | Path, types: list[str], base: str) -> int:
    """Bytes the export needs at its peak: the 16-bit base file plus every quantized file."""
    model_dir = Path(model_dir)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in model_dir.glob("*.bin"))
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").exists() else {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    params = weights / (4 if "32" in dtype else 2)
    files = {base, *types}
    return int(sum(params * BITS_PER_WEIGHT[t] / 8 for t in files) * 1.05)


# Runs llama.cpp's converter in a fresh interpreter with our settings wired in: the special tokens /
# BOS rule / chat template (applied where gguf-py writes them), the pre-tokenizer used when the
# converter does not recognise a BPE tokenizer, and SentencePiece piece scores rebuilt from
# tokenizer.json's merges (`merge_rank_scores`), applied where gguf-py writes the scores of a "llama"
# vocabulary whatever path of the converter built it.
_RUNNER = r"""
import json, runpy, sys
spec = json.loads(sys.argv[1])
sys.argv = [spec["converter"], *spec["args"]]
sys.path[:0] = [spec["source_dir"], spec["source_dir"] + "/gguf-py"]
import gguf
write_special = gguf.SpecialVocab.add_to_gguf
def add_to_gguf(self, gw, quiet=False):
    for kind, token_id in spec["token_ids"].items():
        if token_id is not None:
            self.special_token_ids[kind] = token_id
    self.add_special_token["bos"] = spec["add_bos"]
    self.chat_template = spec["chat_template"]
    if spec["add_space_prefix"] is not None:
        gw.add_add_space_prefix(spec["add_space_prefix"])
    return write_special(self, gw, quiet)
gguf.SpecialVocab.add_to_gguf = add_to_gguf
if spec["scores_file"]:
    with open(spec["scores_file"], encoding="utf-8") as f:
        piece_scores = json.load(f)
    write_model, write_tokens, write_scores = (gguf.GGUFWriter.add_tokenizer_model, gguf.GGUFWriter.add_token_list,
                                               gguf.GGUFWriter.add_token_scores)
    def add_tokenizer_model(self, model):
        self.sftlib_tokenizer_model = model
        return write_model(self, model)
    def add_token_list(self, tokens):
        self.sftlib_tokens = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in tokens]
        return write_tokens(self, tokens)
    def add_token_scores(self, scores):
        tokens = getattr(self, "sftlib_tokens", None)
        if getattr(self, "sftlib_tokenizer_model", None) == "llama" and tokens and len(tokens) == len(scores):
            scores = [piece_scores.get(t, s) for t, s in zip(tokens, scores)]
            print("SFTLIB: piece scores from tokenizer.json merges", file=sys.stderr)
        return write_scores(self, scores)
    gguf.GGUFWriter.add_tokenizer_model = add_tokenizer_model
    gguf.GGUFWriter.add_token_list = add_token_list
    gguf.GGUFWriter.add_token_scores = add_token_scores
from conversion import base
known_pre = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known_pre(self, tokenizer)
    except NotImplementedError:
        if spec["pre_tokenizer"]:
            return spec["pre_tokenizer"]
        print("SFTLIB: UNKNOWN BPE PRE-TOKENIZER", file=sys.stderr)
        sys.exit(3)
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(spec["converter"], run_name="__main__")
"""


def convert(model_dir: str | Path, outfile: str | Path, outtype: str, *, settings: GGUFSettings, model_name: str,
            pre_tokenizer: str | None = None, toolchain=None) -> None:
    """One run of convert_hf_to_gguf.py (`outtype`: f32, f16, bf16 or q8_0) with our metadata."""
    from sftlib.exports.gguf.setup import find_toolchain

    toolchain = toolchain or find_toolchain()
    if pre_tokenizer == "auto":
        pre_tokenizer = suggest_pre_tokenizer(model_dir)
    scores = merge_rank_scores(model_dir)
    scores_file = Path(outfile).parent / f".{Path(outfile).name}.scores.json"  # hidden: removed below
    if scores is not None:
        scores_file.write_text(json.dumps(scores), encoding="utf-8")
    spec = dict(converter=str(toolchain.converter), source_dir=str(toolchain.source_dir),
                args=[str(model_dir), "--outtype", outtype, "--outfile", str(outfile), "--model-name", model_name],
                token_ids={"bos": None, "eos": settings.eos_token_id, "eot": settings.eot_token_id},
                add_bos=settings.add_bos, chat_template=settings.chat_template, pre_tokenizer=pre_tokenizer,
                add_space_prefix=settings.add_space_prefix, scores_file=str(scores_file) if scores else None)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py that ships with it
    try:
        proc = run_child([sys.executable, "-c", _RUNNER, json.dumps(spec)], env=env)
    finally:
        scores_file.unlink(missing_ok=True)
    if proc.returncode == 3 and "UNKNOWN BPE PRE-TOKENIZER" in proc.stderr:
        guess = suggest_pre_tokenizer(model_dir)
        hint = (f"its tokenizer.json splits text like `{guess}`: pass pre_tokenizer={guess!r} (or \"auto\")"
                if guess else "pass `pre_tokenizer` with the llama.cpp name of its split rule, e.g. \"llama-bpe\"")
        raise GGUFExportError(
            f"llama.cpp's converter does not recognise the BPE tokenizer in {model_dir} (a custom or modified "
            f"tokenizer); {hint}. The token-id check after export tells whether the choice was right."
        )
    if proc.returncode != 0 or not Path(outfile).is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise GGUFExportError(f"convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}):\n{tail}")


def quantize(src: str | Path, dst: str | Path, qtype: str, *, threads: int | None = None, toolchain=None) -> None:
    """Write `dst` as `qtype` from the 16-bit GGUF `src` (llama.cpp's own quantizer)."""
    threads = threads or os.cpu_count() or 2
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        name = "LLAMA_FTYPE_ALL_F32" if qtype == "f32" else f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}"
        if not hasattr(llama_cpp, name):
            raise GGUFExportError(f"this llama_cpp build has no quantization type `{qtype}`")
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp logs every tensor otherwise
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, name)
        params.nthread = threads
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0 or not Path(dst).is_file():
            raise GGUFExportError(f"llama_model_quantize failed writing `{qtype}` from {src} (code {rc})")
        return
    binary = getattr(toolchain, "quantize_binary", None) or shutil.which("llama-quantize")
    if not binary:
        raise GGUFExportError(f"cannot quantize to `{qtype}`: neither `llama_cpp` nor `llama-quantize` is "
                              "available; run `python -m sftlib gguf-setup`")
    proc = run_child([binary, str(src), str(dst), qtype.upper(), str(threads)])
    if proc.returncode != 0 or not Path(dst).is_file():
        raise GGUFExportError(f"llama-quantize failed writing `{qtype}`:\n{proc.stderr[-2000:]}")
