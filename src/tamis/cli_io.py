"""Files of the command line: input records read line by line, and embeddings written as they are computed.

Input: text lines or JSONL objects with a ``"text"`` field (optional ``"title"``, ``"id"`` / ``"_id"``), plain or
``.gz``, or stdin. Every record keeps its 1-based input ``line``. Blank lines (and JSONL records whose text is
blank) are not embedded; they are counted in :attr:`Records.blank_lines` so the command can say so.

Output (:class:`EmbeddingOutput`), by the file's suffix: JSONL rows (``.jsonl``, ``.ndjson``, ``.json``, or
stdout) appended as each block of inputs is done; a ``.npy`` whose rows fill a preallocated
``<output>.partial`` file that is renamed to ``<output>`` at the end; ``.parquet`` / ``.csv``, whose rows are
appended as JSONL to ``<output>.partial`` and converted at the end. Other suffixes are refused. While a file
output is incomplete, ``<output>.resume.json`` records what it is (the input's hash, the model and the
options) and, for ``.npy``, how many rows are done; ``--resume`` checks it and continues from there.
Only this module knows these file layouts.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from tamis.errors import InvalidInputError

STATE_SUFFIX = ".resume.json"
PARTIAL_SUFFIX = ".partial"
STATE_VERSION = 1
OUTPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".npy": "npy", ".parquet": "parquet",
                  ".csv": "csv"}


def output_format(path: str | None) -> str:
    """``jsonl`` / ``npy`` / ``parquet`` / ``csv`` from an output path's suffix (stdout: ``jsonl``)."""
    if path in (None, "-"):
        return "jsonl"
    if Path(str(path)).is_dir():
        raise InvalidInputError(f"cannot write {path}: it is a directory")
    suffix = Path(str(path)).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InvalidInputError(
            f"cannot tell the output format of {path}: its suffix is {suffix or 'missing'!s}; use .jsonl, .npy, "
            ".parquet or .csv")
    return OUTPUT_FORMATS[suffix]


# ----------------------------------------------------------------------------------------------- input


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so rows on disk and the count of rows done always agree."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield  # SIGINT ignored (e.g. a background job of a non-interactive shell): nothing to hold
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@dataclass
class Record:
    line: int  # 1-based line number in the input
    text: str
    id: Any = None  # "id" (or "_id") of a JSONL record
    title: str = ""


@dataclass
class Records:
    records: list[Record]
    blank_lines: list[int] = field(default_factory=list)  # line numbers not embedded (blank)
    source: str = "stdin"

    def __len__(self) -> int:
        return len(self.records)

    @property
    def inner_blank_lines(self) -> list[int]:
        """Blank lines before the last record: skipping them shifts positions against line numbers."""
        last = self.records[-1].line if self.records else 0
        return [n for n in self.blank_lines if n < last]


def _raw_lines(path: str | None) -> tuple[IO[bytes] | IO[str], str]:
    if path in (None, "-"):
        return getattr(sys.stdin, "buffer", sys.stdin), "stdin"
    p = Path(path)
    if p.is_dir():
        raise InvalidInputError(f"input {path} is a directory, not a file")
    if not p.exists():
        raise InvalidInputError(f"input file {path} does not exist")
    if p.suffix == ".gz":
        return gzip.open(p, "rb"), str(path)
    return open(p, "rb"), str(path)


def _decoded(f: IO[bytes] | IO[str], source: str) -> Iterator[tuple[int, str]]:
    """(line number, text without the line break), decoding UTF-8 line by line to name a bad line."""
    try:
        for n, raw in enumerate(f, 1):
            if isinstance(raw, str):  # a text stream stood in for stdin
                yield n, raw.rstrip("\r\n")
                continue
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"{source}: line {n} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
                    "the line); tamis reads UTF-8 text: convert the file first, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            yield n, line.rstrip("\r\n")
    except (EOFError, gzip.BadGzipFile) as exc:
        raise InvalidInputError(f"{source}: not a complete gzip file ({exc})") from None


def read_records(path: str | None, fmt: str = "auto") -> Records:
    """Read every record (``fmt``: ``auto`` = JSONL for lines starting with ``{``, ``lines``, ``jsonl``)."""
    f, source = _raw_lines(path)
    out = Records([], [], source)
    try:
        for n, line in _decoded(f, source):
            if not line.strip():
                out.blank_lines.append(n)
                continue
            is_json = fmt == "jsonl" or (fmt == "auto" and line.lstrip().startswith("{"))
            if not is_json:
                out.records.append(Record(n, line))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{source}: line {n} is not valid JSON: {exc}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InvalidInputError(f'{source}: line {n} has no "text" string')
            title = obj.get("title") or ""
            if not isinstance(title, str):
                raise InvalidInputError(f'{source}: line {n}: "title" must be a string')
            if not obj["text"].strip():
                out.blank_lines.append(n)
                continue
            out.records.append(Record(n, obj["text"], obj.get("id", obj.get("_id")), title))
    finally:
        if f is not sys.stdin and f is not getattr(sys.stdin, "buffer", None):
            f.close()
    return out


def line_list(lines: Sequence[int], limit: int = 10) -> str:
    """``"3, 7, 12"`` (with ``", ..."`` past ``limit``)."""
    shown = ", ".join(str(n) for n in lines[:limit])
    return shown + (", ..." if len(lines) > limit else "")


def input_digest(records: Sequence[Record], texts: Sequence[str]) -> str:
    """SHA-256 over what the output depends on: each record's line, id and embedded text."""
    h = hashlib.sha256()
    for r, t in zip(records, texts):
        h.update(json.dumps([r.line, r.id, t], ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def check_writable(path: Path) -> None:
    """Fail now, before any work, when ``path`` cannot be written."""
    if path.is_dir():
        raise InvalidInputError(f"cannot write {path}: it is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write {path}: directory {parent} does not exist")
    try:
        if path.exists():
            open(path, "ab").close()  # opens for writing without changing it
        else:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".tamis-write-check-")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _complete_jsonl_rows(path: Path) -> tuple[int, int]:
    """(complete rows, byte length they fill) of a JSONL output; a torn last line does not count."""
    rows, end, last = 0, 0, b""
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            rows, end, last = rows + 1, end + len(line), line
    if rows:
        try:
            index = json.loads(last)["index"]
        except (ValueError, KeyError, TypeError):
            raise InvalidInputError(f"--resume: the last row of {path} is not a tamis embed row") from None
        if index != rows - 1:
            raise InvalidInputError(f"--resume: {path} has {rows} rows but its last row has index {index}")
    return rows, end


class EmbeddingOutput:
    """Where ``tamis embed`` writes: JSONL to stdout or a file, or a ``.npy`` file; file outputs resume.

    Construction checks everything that needs no model (the path can be written; with ``resume``, the
    earlier run was made on the same input with the same options) and sets :attr:`done`, the inputs
    already written. :meth:`open` creates the files once the model is loaded (a ``.npy`` needs the
    width), :meth:`write` appends the next block of rows, :meth:`finish` completes the output.
    """

    def __init__(
        self,
        path: str | None,
        total: int,
        fingerprint: dict[str, Any],
        resume: bool = False,
        input_path: str | None = None,
    ):
        self.path = Path(path) if path not in (None, "-") else None
        self.format = output_format(path)
        self.npy = self.format == "npy"
        if self.format == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise InvalidInputError(f"writing {path} needs pyarrow: pip install 'tamis[batch]' (or write .jsonl "
                                        "/ .npy / .csv)") from None
        self.fingerprint = fingerprint
        self.total = total
        self.done = 0
        self._sink: Any = None
        if self.path is None:
            if resume:
                raise InvalidInputError("--resume needs an output file (-o FILE): stdout cannot be resumed")
            return
        if input_path not in (None, "-"):
            if self.path.exists() and Path(input_path).exists() and self.path.samefile(input_path):
                raise InvalidInputError(f"-o {self.path} is the input file; write the embeddings elsewhere")
        check_writable(self.path)
        self.state_path = Path(str(self.path) + STATE_SUFFIX)
        self.partial_path = Path(str(self.path) + PARTIAL_SUFFIX) if self.format != "jsonl" else self.path
        state = self._read_state()
        if state is not None and not resume:
            raise InvalidInputError(
                f"{self.path} is an interrupted run ({self._state_done(state):,} of {state['total']:,} inputs done): "
                f"add --resume to continue it, or delete {self.state_path} to start over"
            )
        if resume:
            if state is None:
                if self.path.exists():
                    raise InvalidInputError(
                        f"--resume: {self.path} has no resume state ({self.state_path}): it is complete or was not "
                        "written by tamis embed; run without --resume to overwrite it"
                    )
                return  # nothing was started: a fresh run
            self._check_same_job(state)
            self.done = self._state_done(state)

    # ------------------------------------------------------------------ resume state
    def _read_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if state.get("version") != STATE_VERSION or not isinstance(state.get("total"), int):
                raise ValueError
        except (ValueError, OSError, AttributeError):
            raise InvalidInputError(f"{self.state_path} is not a tamis resume state; delete it to start over") from None
        return state

    def _state_done(self, state: dict[str, Any]) -> int:
        if self.npy:
            return int(state.get("done", 0)) if self.partial_path.is_file() else 0
        return _complete_jsonl_rows(self.partial_path)[0] if self.partial_path.is_file() else 0

    def _check_same_job(self, state: dict[str, Any]) -> None:
        before, now = state.get("fingerprint", {}), self.fingerprint
        changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            what = "; ".join(
                "the input texts differ" if k == "input_sha256" else f"{k}: {before.get(k)!r} then, {now.get(k)!r} now"
                for k in changed[:4]
            )
            raise InvalidInputError(
                f"--resume: {self.path} was started on other input or options ({what}); run the same command as "
                f"before, or delete {self.state_path} to start over"
            )
        done = self._state_done(state)
        if done > self.total:
            raise InvalidInputError(f"--resume: {self.path} has {done} rows, more than the {self.total} inputs")

    def _save_state(self) -> None:
        state = {"version": STATE_VERSION, "output": str(self.path), "format": self.format,
                 "total": self.total, "fingerprint": self.fingerprint}
        if self.npy:
            state |= {"done": self.done, "dtype": self._sink.dtype.str, "shape": list(self._sink.shape)}
        _write_json_atomic(self.state_path, state)

    # ------------------------------------------------------------------ writing
    def open(self, width: int, dtype: np.dtype | str | None = None) -> None:
        """Create (or reopen, when resuming) the output; ``width``/``dtype`` give the ``.npy`` row shape."""
        if self.path is None:
            self._sink = sys.stdout
            return
        if self.npy:
            dtype = np.dtype(dtype or np.float32)
            shape = (self.total, width)
            if self.done and self.partial_path.is_file():
                mm = np.lib.format.open_memmap(self.partial_path, mode="r+")
                if mm.shape != shape or mm.dtype != dtype:
                    raise InvalidInputError(
                        f"--resume: {self.partial_path} holds {mm.dtype}{list(mm.shape)}, this run writes "
                        f"{dtype}{list(shape)}; delete {self.state_path} to start over"
                    )
                self._sink = mm
            else:
                self.done = 0
                self._sink = np.lib.format.open_memmap(self.partial_path, mode="w+", dtype=dtype, shape=shape)
        elif self.done:
            rows, end = _complete_jsonl_rows(self.partial_path)
            with open(self.partial_path, "rb+") as f:
                f.truncate(end)  # drop a line torn by the interruption
            self.done = rows
            self._sink = open(self.partial_path, "a", encoding="utf-8")
        else:
            self._sink = open(self.partial_path, "w", encoding="utf-8")
        self._save_state()

    def write(self, start: int, records: Sequence[Record], embeddings: Any) -> None:
        """Rows ``start .. start+len(records)`` (``embeddings``: array, list, or dict of these by type)."""
        if start != self.done:
            raise ValueError(f"rows must be written in order: expected row {self.done}, got {start}")
        with sigint_deferred():
            self._write(start, records, embeddings)

    def _write(self, start: int, records: Sequence[Record], embeddings: Any) -> None:
        n = len(records)
        if self.npy:
            self._sink[start : start + n] = embeddings
            self._sink.flush()
            self.done = start + n
            self._save_state()
            return
        lines = []
        for j, rec in enumerate(records):
            row: dict[str, Any] = {"index": start + j, "line": rec.line}
            if rec.id is not None:
                row["id"] = rec.id
            vec = {k: v[j] for k, v in embeddings.items()} if isinstance(embeddings, dict) else embeddings[j]
            row["embedding"] = _jsonable(vec)
            lines.append(json.dumps(row) + "\n")
        self._sink.write("".join(lines))
        self._sink.flush()
        if self.path is not None:
            os.fsync(self._sink.fileno())
        self.done = start + n

    def close(self) -> None:
        """Stop writing and keep what is done (and the resume state), e.g. on an interruption."""
        if self._sink is None or self._sink is sys.stdout:
            return
        if self.npy:
            self._sink.flush()  # the memory map is released with the last reference
        else:
            self._sink.close()
        self._sink = None

    def finish(self) -> None:
        """All rows written: close, move a ``.npy`` into place, and drop the resume state."""
        if self.done != self.total:
            raise ValueError(f"finish() after {self.done} of {self.total} rows")
        if self.path is None:
            return
        self.close()
        if self.npy:
            os.replace(self.partial_path, self.path)
        elif self.format in ("parquet", "csv"):
            if self.format == "parquet":
                _jsonl_to_parquet(self.partial_path, self.path, list(self.fingerprint.get("embedding_type") or ["float"]))
            else:
                _jsonl_to_csv(self.partial_path, self.path)
            self.partial_path.unlink()
        self.state_path.unlink(missing_ok=True)

    @property
    def where(self) -> str:
        return "stdout" if self.path is None else str(self.path)

    @property
    def kept_in(self) -> str:
        """Where the rows written so far are (an incomplete ``.npy``, ``.parquet`` or ``.csv``: ``<output>.partial``)."""
        return "stdout" if self.path is None else str(self.partial_path)


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _columns(row: dict[str, Any]) -> list[tuple[str, Any]]:
    """(column, value) of one row's embedding: ``embedding`` for one type, ``embedding_<type>`` for several."""
    emb = row["embedding"]
    if isinstance(emb, dict):
        return [(f"embedding_{k}", v) for k, v in emb.items()]
    return [("embedding", emb)]


def _jsonl_to_parquet(src: Path, dst: Path, types: list[str], rows_per_group: int = 8192) -> None:
    """Columns ``index``, ``line``, ``id`` (when the input had ids) and the embedding: a list of float32 (int8
    / uint8 for binary / ubinary / int8 / uint8) or a base64 string; written to a temporary file, then moved."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = next(_jsonl_rows(src), None)
    if first is None:
        return
    value_type = {"float": pa.float32(), "binary": pa.int8(), "ubinary": pa.uint8(), "int8": pa.int8(),
                  "uint8": pa.uint8()}
    fields = [pa.field("index", pa.int64()), pa.field("line", pa.int64())]
    if "id" in first:
        fields.append(pa.field("id", pa.string()))
    for (name, _), t in zip(_columns(first), types, strict=True):
        fields.append(pa.field(name, pa.string() if t == "base64" else pa.list_(value_type[t])))
    schema = pa.schema(fields)
    tmp = dst.with_name(dst.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        block: dict[str, list[Any]] = {f.name: [] for f in fields}
        for row in _jsonl_rows(src):
            block["index"].append(row["index"])
            block["line"].append(row["line"])
            if "id" in block:
                block["id"].append(None if row.get("id") is None else str(row["id"]))
            for name, value in _columns(row):
                block[name].append(value)
            if len(block["index"]) >= rows_per_group:
                writer.write_table(pa.table(block, schema=schema))
                block = {k: [] for k in block}
        if block["index"]:
            writer.write_table(pa.table(block, schema=schema))
    os.replace(tmp, dst)


def _jsonl_to_csv(src: Path, dst: Path) -> None:
    """Columns ``index``, ``line``, ``id`` (when the input had ids), then one column per dimension (``e0``,
    ``e1``, ...) or one ``embedding`` column of base64 strings; written to a temporary file, then moved."""
    import csv

    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        header_done = False
        for row in _jsonl_rows(src):
            emb = row["embedding"]
            values = [emb] if isinstance(emb, str) else list(emb)
            has_id = "id" in row
            if not header_done:
                names = ["embedding"] if isinstance(emb, str) else [f"e{i}" for i in range(len(values))]
                writer.writerow(["index", "line", *(["id"] if has_id else []), *names])
                header_done = True
            writer.writerow([row["index"], row["line"], *([row.get("id")] if has_id else []), *values])
    os.replace(tmp, dst)
