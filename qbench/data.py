"""Datasets: WikiText-2 and C4 through ``datasets`` — from the hub for online users, or from a local
directory laid out like ``shared/data`` (``QBENCH_DATA_DIR`` / ``--data-dir``) — plus any text or
JSON-lines file. Both routes produce the same ``datasets.Dataset`` rows, and the same code joins
and tokenizes them.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qbench.hub import hub_unreachable, offline
from qbench.params import QBenchError

# split -> the local file, relative to the data dir
WIKITEXT2_LOCAL = {"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw"}
C4_LOCAL = {"validation": "c4/c4-validation-sample.jsonl"}
C4_HUB_FILE = "en/c4-validation.00000-of-00008.json.gz"
SPLITS = {"wikitext2": WIKITEXT2_LOCAL, "c4": C4_LOCAL}  # the datasets known by name
DEFAULT_SPLIT = {"wikitext2": "test", "c4": "validation"}


def data_dirs(explicit: str | None = None) -> list[Path]:
    dirs = []
    if explicit:
        dirs.append(Path(explicit))
    if os.environ.get("QBENCH_DATA_DIR"):
        dirs.append(Path(os.environ["QBENCH_DATA_DIR"]))
    return dirs




def datasets_cache_dir() -> str:
    """Where ``datasets`` keeps what it converts (also from the user's own files): under qbench's
    cache dir, not ~/.cache/huggingface."""
    from qbench.paths import cache_dir

    return str(cache_dir() / "datasets")


def _wikitext_rows_from_raw(path: Path) -> list[str]:
    """Rows as the hub's ``wikitext-2-raw-v1`` has them: one per line, newline kept, blank lines ''."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append("" if line.strip() == "" else line)
    return rows


@dataclass
class TextSource:
    """A resolved dataset: where its rows came from and how to join them into one text."""

    name: str
    split: str
    origin: str  # "hub", a local path
    rows: list[str]
    joiner: str = "\n\n"

    def text(self) -> str:
        # The GPTQ evaluation protocol joins the rows with "\n\n".
        return self.joiner.join(self.rows)

    def sha256(self) -> str:
        return hashlib.sha256(self.text().encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "origin": self.origin, "rows": len(self.rows)}


def _dataset_rows(ds) -> list[str]:
    return [r for r in ds["text"]]


def split_name(name: str) -> tuple[str, str | None]:
    """``wikitext2:validation`` -> ("wikitext2", "validation"); a file path (even one with a colon)
    or a bare name -> (name, None)."""
    base, sep, split = name.partition(":")
    if sep and base in SPLITS and not Path(name).is_file():
        return base, split
    return name, None


def check_split(base: str, split: str) -> None:
    """QBenchError unless ``split`` is one of dataset ``base``'s (wikitext2, c4)."""
    if split not in SPLITS[base]:
        raise QBenchError(f"{base} has the split(s) {', '.join(SPLITS[base])}, not {split!r}; "
                          f"e.g. --dataset {base}:{next(iter(SPLITS[base]))}")


def check_dataset_name(name: str) -> None:
    """Raise QBenchError for a dataset that cannot exist (unknown name or split, missing file) without
    loading anything; whether wikitext2/c4 are present is only known by loading them."""
    base, split = split_name(name)
    if split is not None:
        check_split(base, split)
    if base in SPLITS or Path(name).is_file():
        return
    if Path(name).suffix in (".txt", ".jsonl", ".json", ".raw") or "/" in name:
        raise QBenchError(f"dataset file {name} not found")
    raise QBenchError(f"unknown dataset {name!r}; use wikitext2, c4 (a split after a colon: "
                      f"wikitext2:validation), or a path to a .txt or .jsonl file")


def load_text(name: str, split: str | None = None, data_dir: str | None = None) -> TextSource:
    """Resolve ``name`` (wikitext2, c4, either with ``:split``, or a .txt/.jsonl path) to a TextSource,
    or raise QBenchError saying where we looked and what to pass. A split other than the default one
    shows in the source's name (``wikitext2:validation``), so protocols and records tell them apart."""
    base, named_split = split_name(name)
    if named_split is not None:
        if split is not None and split != named_split:
            raise QBenchError(f"dataset {name!r} names the split {named_split!r}, but {split!r} was asked for")
        split = named_split
    source = _load_text(base, split, data_dir)
    if base in DEFAULT_SPLIT and source.split != DEFAULT_SPLIT[base]:
        source.name = f"{base}:{source.split}"
    return source


def _load_text(name: str, split: str | None, data_dir: str | None) -> TextSource:
    import datasets

    datasets.disable_progress_bars()
    looked: list[str] = []
    if name == "wikitext2":
        split = split or DEFAULT_SPLIT["wikitext2"]
        check_split(name, split)
        for d in data_dirs(data_dir):
            path = d / WIKITEXT2_LOCAL[split]
            looked.append(str(path))
            if path.is_file():
                check_text_file(path)
                ds = datasets.Dataset.from_dict({"text": _wikitext_rows_from_raw(path)})
                return TextSource(name, split, str(path), _dataset_rows(ds))
        unreachable = None if offline() else hub_unreachable()
        if unreachable:
            looked.append(f"the hub, which cannot be reached ({unreachable})")
        elif not offline():
            looked.append("hub Salesforce/wikitext wikitext-2-raw-v1")
            try:
                ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split,
                                           cache_dir=datasets_cache_dir())
                return TextSource(name, split, "hub", _dataset_rows(ds))
            except Exception:
                pass
    elif name == "c4":
        split = split or DEFAULT_SPLIT["c4"]
        check_split(name, split)
        for d in data_dirs(data_dir):
            path = d / C4_LOCAL[split]
            looked.append(str(path))
            if path.is_file():
                ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=datasets_cache_dir())
                return TextSource(name, split, str(path), _dataset_rows(ds), joiner=" ")
        unreachable = None if offline() else hub_unreachable()
        if unreachable:
            looked.append(f"the hub, which cannot be reached ({unreachable})")
        elif not offline():
            looked.append(f"hub allenai/c4 {C4_HUB_FILE}")
            try:
                ds = datasets.load_dataset("allenai/c4", data_files={"validation": C4_HUB_FILE}, split="validation",
                                           cache_dir=datasets_cache_dir())
                return TextSource(name, split, "hub", _dataset_rows(ds), joiner=" ")
            except Exception:
                pass
    else:
        check_dataset_name(name)
        return _load_file(Path(name))
    where = "; ".join(looked) if looked else "nowhere (no data dir set)"
    raise QBenchError(
        f"dataset {name} not found (looked in: {where}); pass --data-dir DIR or set QBENCH_DATA_DIR "
        f"to a folder laid out like shared/data, or go online to use the hub copy"
    )


def _json_row_problem(obj, where: str) -> str | None:
    if not isinstance(obj, dict):
        return f"{where} is a JSON {type(obj).__name__}, not an object with a 'text' field"
    if "text" not in obj:
        return f"{where} has no 'text' field (it has: {', '.join(map(str, obj)) or 'nothing'})"
    if not isinstance(obj["text"], str):
        return f"{where}: 'text' is {type(obj['text']).__name__}, not a string"
    return None


def check_text_file(path: Path) -> None:
    """One line for a dataset file that cannot give text rows: unreadable, empty, binary (not UTF-8),
    or JSON lines that are not objects with a string 'text' (the line number is given)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise QBenchError(f"dataset file {path} cannot be read ({exc.strerror or exc})") from None
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), data.index(b"\x00") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = data[exc.start:exc.start + 1]
        raise QBenchError(f"dataset file {path} is not UTF-8 text (byte {exc.start} is {byte!r}); "
                          f"is it a binary file? pass a .txt or .jsonl file") from None
    if not text.strip():
        raise QBenchError(f"dataset file {path} is empty")
    if path.suffix not in (".jsonl", ".json"):
        return
    problem = None
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except ValueError:
            whole = None  # JSON lines in a .json file
        if isinstance(whole, list):
            problem = next((p for i, row in enumerate(whole, 1) if (p := _json_row_problem(row, f"item {i}"))), None)
        elif whole is not None:
            problem = "is one JSON value; write JSON lines, one {\"text\": ...} object per line"
        if whole is not None:
            if problem:
                raise QBenchError(f"dataset file {path} {problem}")
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise QBenchError(f"dataset file {path} line {number} is not valid JSON ({exc.msg}); "
                              f"JSON lines need one {{\"text\": ...}} object per line") from None
        problem = _json_row_problem(obj, f"line {number}")
        if problem:
            raise QBenchError(f"dataset file {path} {problem}")


def _load_file(path: Path) -> TextSource:
    import datasets

    check_text_file(path)
    try:
        if path.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=datasets_cache_dir())
            if "text" not in ds.column_names:
                raise QBenchError(f"{path}: JSON lines need a 'text' field (found {', '.join(ds.column_names)})")
            return TextSource(path.name, "file", str(path), _dataset_rows(ds))
        ds = datasets.load_dataset("text", data_files=str(path), split="train", keep_linebreaks=True,
                                   cache_dir=datasets_cache_dir())
        return TextSource(path.name, "file", str(path), _dataset_rows(ds), joiner="")
    except QBenchError:
        raise
    except Exception as exc:
        raise QBenchError(f"could not read dataset file {path}: {type(exc).__name__}: {exc}") from None


def encode(tokenizer, text: str) -> torch.Tensor:
    """Tokenize once into a 1-D LongTensor (Hugging Face tokenizers or our ByteTokenizer)."""
    from qbench.models import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return torch.tensor(tokenizer.encode(text), dtype=torch.long)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids


class Calibration:
    """Random token windows from a text source, for methods that calibrate (GPTQ, static INT8).

    The rows are joined and tokenized once; each sample is a window of ``seqlen`` tokens at a
    random start (``torch.Generator`` seeded by ``seed``), so it is reproducible."""

    def __init__(self, tokenizer, source: TextSource):
        self.tokenizer = tokenizer
        self.source = source
        self._ids: torch.Tensor | None = None
        self.used: dict = {}

    @property
    def ids(self) -> torch.Tensor:
        if self._ids is None:
            self._ids = encode(self.tokenizer, self.source.text())
        return self._ids

    def sample(self, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
        ids = self.ids
        if ids.numel() <= seqlen:
            raise QBenchError(
                f"calibration data {self.source.name} has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                f"use a shorter seqlen or a larger dataset"
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
        self.used = {"dataset": self.source.describe(), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])

    def describe(self) -> dict:
        return self.used or {"dataset": self.source.describe()}
