"""``tamis batch``: a resumable batch job from Parquet / JSONL files to Parquet shards.

The input (a file or a directory of ``.parquet``, ``.jsonl`` / ``.json`` / ``.ndjson``, optionally
``.gz``) is cut into shards of ``shard_size`` rows, in file order. Shard ``k`` of input file ``f`` becomes
``OUTPUT/part-fffff-kkkkk.parquet``, written to a temporary name and renamed when complete, so a file
that exists is a finished shard: a rerun skips it and a killed job loses at most the shards in flight.
``OUTPUT/_tamis_job.json`` records what the job computes (model, options, inputs, shard size); a rerun
with different settings is refused rather than mixing two jobs in one directory.

Shards run in-process (a plain loop: no Ray needed) or on Ray Data (``use_ray=True``): shards are cut
into pieces of one batch, read by Ray tasks, mapped on the actor pool of
:func:`tamis.scale.embed_dataset`, and the driver writes each shard as its last piece comes back.

Output rows keep the input order of their shard. Carried columns (ids by default: every column but the
text ones) keep their Parquet types; from JSONL they are strings (other JSON values as JSON text).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tamis.errors import InvalidInputError, TamisError
from tamis.scale.mapper import ERROR_COLUMN, READ_ERROR_COLUMN, TRUNCATED_COLUMN, EmbedBatch, RerankBatch

logger = logging.getLogger("tamis.scale")

MANIFEST = "_tamis_job.json"
INPUT_CACHE = "_tamis_input"
SHARD_COLUMN = "_tamis_shard"
ROW_COLUMN = "_tamis_row"
DEFAULT_SHARD_SIZE = 10_000
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class JobMismatchError(TamisError):
    """The output directory holds shards of a job with other settings."""


# ---------------------------------------------------------------------------- inputs and plan
@dataclass
class InputFile:
    path: str  # what is read (a decompressed copy for .gz JSONL)
    source: str  # what the user named
    fmt: str  # "parquet" or "jsonl"
    size: int
    rows: int = 0
    offsets: dict[int, int] = field(default_factory=dict)  # JSONL: row index -> byte offset of its line
    lines: dict[int, int] = field(default_factory=dict)  # JSONL: row index -> line number (1-based)


@dataclass
class Piece:
    """Rows [start, stop) of one input file: the unit a reader task reads."""

    shard: int
    file: int
    path: str
    fmt: str
    start: int
    stop: int
    offset: int = 0  # JSONL: byte offset of row `start`
    line: int = 1  # JSONL: line number of row `start`


@dataclass
class Shard:
    index: int  # position in the job
    file: int
    number: int  # shard number within its file
    start: int
    stop: int
    name: str
    pieces: list[Piece] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _fmt(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return None if path.name.lower().endswith(".gz") else "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def list_inputs(path: str | os.PathLike[str]) -> list[Path]:
    """The input files: ``path`` itself, or the data files of a directory (sorted, recursively)."""
    p = Path(path)
    if p.is_file():
        if _fmt(p) is None:
            raise InvalidInputError(f"{p}: not a .parquet or .jsonl/.json/.ndjson(.gz) file")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _fmt(f) is not None
                       and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
        if not files:
            raise InvalidInputError(f"{p}: no .parquet or .jsonl files in this directory")
        return files
    raise InvalidInputError(f"input {p} does not exist")


def _scan_jsonl(f: InputFile, piece_rows: int, shard_size: int) -> None:
    """Count the non-blank lines of a JSONL file and note where every piece and shard starts."""
    offset, row = 0, 0
    with open(f.path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                if row % piece_rows == 0 or row % shard_size == 0:
                    f.offsets[row] = offset
                    f.lines[row] = number
                row += 1
            offset += len(line)
    f.rows = row


def _first_record_keys(f: InputFile) -> list[str]:
    with open(f.path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return []
                return list(obj) if isinstance(obj, dict) else []
    return []


def prepare_inputs(
    paths: Sequence[Path], cache_dir: Path, piece_rows: int, shard_size: int, progress: bool = False
) -> list[InputFile]:
    """Row counts (and JSONL line offsets); .gz JSONL is decompressed once into ``cache_dir``."""
    import pyarrow.parquet as pq

    out = []
    for i, p in enumerate(paths):
        fmt = _fmt(p)
        assert fmt is not None
        f = InputFile(path=str(p), source=str(p.resolve()), fmt=fmt, size=p.stat().st_size)
        if fmt == "parquet":
            f.rows = pq.ParquetFile(p).metadata.num_rows
        else:
            if p.name.lower().endswith(".gz"):
                cache_dir.mkdir(parents=True, exist_ok=True)
                plain = cache_dir / f"{i:05d}-{p.name.removesuffix('.gz')}"
                if progress:
                    print(f"tamis batch: decompressing {p.name} into {cache_dir}", file=sys.stderr)
                tmp = plain.with_name("." + plain.name + ".tmp")
                with gzip.open(p, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, plain)
                f.path = str(plain)
            _scan_jsonl(f, piece_rows, shard_size)
        out.append(f)
    return out


def plan_shards(files: Sequence[InputFile], shard_size: int, piece_rows: int) -> list[Shard]:
    if shard_size < 1 or piece_rows < 1:
        raise InvalidInputError("shard_size and the piece size must be positive")
    shards: list[Shard] = []
    for fi, f in enumerate(files):
        for number, start in enumerate(range(0, f.rows, shard_size)):
            stop = min(start + shard_size, f.rows)
            shard = Shard(len(shards), fi, number, start, stop, f"part-{fi:05d}-{number:05d}.parquet")
            a = start
            while a < stop:
                b = min(stop, (a // piece_rows + 1) * piece_rows)
                shard.pieces.append(Piece(shard.index, fi, f.path, f.fmt, a, b,
                                          f.offsets.get(a, 0), f.lines.get(a, 1)))
                a = b
            shards.append(shard)
    return shards


# ---------------------------------------------------------------------------- reading
def _as_json_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def read_piece(piece: Piece, text_columns: Sequence[str], keep: Sequence[str], tag: bool = False) -> Any:
    """The rows of one piece as a pyarrow Table: text columns, carried columns, a read-error column.

    ``tag`` adds the shard and the row index in the file (the Ray path reassembles shards from them).
    """
    import pyarrow as pa

    n = piece.stop - piece.start
    if piece.fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(piece.path)
        meta = pf.metadata
        groups, first, at = [], None, 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if at + rows > piece.start and at < piece.stop:
                groups.append(g)
                first = at if first is None else first
            at += rows
        wanted = list(dict.fromkeys([*text_columns, *keep]))
        table = pf.read_row_groups(groups, columns=wanted)
        table = table.slice(piece.start - (first or 0), n)
    else:
        table = _read_jsonl_rows(piece, n, text_columns, keep)
    if tag:
        table = table.append_column(SHARD_COLUMN, pa.array([piece.shard] * n, type=pa.int32()))
        table = table.append_column(ROW_COLUMN, pa.array(range(piece.start, piece.stop), type=pa.int64()))
    return table


def _read_jsonl_rows(piece: Piece, n: int, text_columns: Sequence[str], keep: Sequence[str]) -> Any:
    import pyarrow as pa

    from tamis.scale.mapper import check_text

    texts: dict[str, list[Any]] = {c: [] for c in text_columns}
    kept: dict[str, list[Any]] = {c: [] for c in keep if c not in texts}
    errors: list[str | None] = []
    with open(piece.path, "rb") as fh:
        fh.seek(piece.offset)
        number = piece.line - 1
        while len(errors) < n:
            raw = fh.readline()
            if not raw:
                raise InvalidInputError(f"{piece.path} changed while the job ran: fewer rows than planned")
            number += 1
            if not raw.strip():
                continue
            err = None
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                obj, err = {}, f"line {number} is not valid JSON: {exc}"
            if not isinstance(obj, dict):
                obj, err = {}, err or f"line {number} is not a JSON object"
            for c in text_columns:
                v = obj.get(c)
                if v is not None and not isinstance(v, str):
                    err = err or check_text(v, c)[1]
                    v = None
                texts[c].append(v)
            for c in kept:
                kept[c].append(_as_json_text(obj.get(c)))
            errors.append(err)
    cols = {**{c: pa.array(v, type=pa.string()) for c, v in texts.items()},
            **{c: pa.array(v, type=pa.string()) for c, v in kept.items()},
            READ_ERROR_COLUMN: pa.array(errors, type=pa.string())}
    return pa.table(cols)


def read_shard(shard: Shard, text_columns: Sequence[str], keep: Sequence[str]) -> Any:
    import pyarrow as pa

    return pa.concat_tables([read_piece(p, text_columns, keep) for p in shard.pieces])


# ---------------------------------------------------------------------------- writing
def write_atomic(table: Any, path: Path) -> None:
    """Write a Parquet file under a temporary name, then rename it into place."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _finish_table(table: Any, skip_bad: bool) -> Any:
    """Drop internal columns (and flagged rows when bad rows are skipped)."""
    import pyarrow.compute as pc

    if skip_bad and ERROR_COLUMN in table.column_names:
        table = table.filter(pc.is_null(table.column(ERROR_COLUMN))).drop_columns([ERROR_COLUMN])
    internal = [c for c in (SHARD_COLUMN, ROW_COLUMN) if c in table.column_names]
    return table.drop_columns(internal) if internal else table


# ---------------------------------------------------------------------------- the job
@dataclass
class JobReport:
    shards: int = 0
    skipped: int = 0  # finished by an earlier run
    written: int = 0
    rows: int = 0  # rows mapped in this run
    bad_rows: int = 0
    truncated_rows: int = 0
    seconds: float = 0.0
    output: str = ""

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.written} shards written, {self.skipped} already done, {self.shards} in all; "
                f"{self.rows} rows in {self.seconds:.1f} s ({rate:.1f} rows/s); {self.bad_rows} bad rows, "
                f"{self.truncated_rows} truncated -> {self.output}")


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} was {json.dumps(a)[:80]}, now {json.dumps(b)[:80]}")
    return out


def _check_manifest(output: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    path = output / MANIFEST
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != manifest:
            diff = _differences(old if isinstance(old, dict) else {}, manifest)
            raise JobMismatchError(
                f"{output} holds shards of another job ({'; '.join(diff[:4]) or 'unreadable manifest'}); "
                "use a new output directory, or --overwrite to delete its shards and start again")
    if overwrite and output.exists():
        for f in output.glob("part-*.parquet"):
            f.unlink()
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".part-*.tmp-*"):  # shards in flight when an earlier run was killed
        stale.unlink()
    tmp = path.with_name("." + MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _resolve_keep(mapper: EmbedBatch | RerankBatch, files: Sequence[InputFile]) -> list[str]:
    """Carried columns, decided once for the whole job (the first file's columns)."""
    import pyarrow.parquet as pq

    first = files[0]
    if first.fmt == "parquet":
        columns = list(pq.ParquetFile(first.path).schema_arrow.names)
        missing = [c for c in mapper.text_columns if c not in columns]
        if missing:
            raise InvalidInputError(f"{first.source} has no column {missing[0]!r} (columns: {columns})")
    else:
        columns = _first_record_keys(first)
        columns += [c for c in mapper.text_columns if c not in columns]
    return mapper.keep([*columns, READ_ERROR_COLUMN])


def run_job(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    mapper: EmbedBatch | RerankBatch,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 512,
    use_ray: bool = False,
    ray_address: str | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[Shard, Path], None] | None = None,
) -> JobReport:
    """Map every row of ``input`` with ``mapper`` into Parquet shards under ``output`` (resumable).

    The mapper runs in flag mode internally; with ``mapper.bad_rows == "skip"`` flagged rows are left out
    of the written shards.
    """
    t0 = time.perf_counter()
    out_dir = Path(output)
    if shard_size < 1 or batch_size < 1:
        raise InvalidInputError("shard_size and batch_size must be positive")
    paths = list_inputs(input)
    skip_bad = mapper.bad_rows == "skip"
    job_mapper = _flagging(mapper)
    files = prepare_inputs(paths, out_dir / INPUT_CACHE, batch_size, shard_size, progress)
    keep = [c for c in _resolve_keep(job_mapper, files) if c != READ_ERROR_COLUMN]
    manifest = {
        "version": 1, "mapper": mapper.describe(), "bad_rows": mapper.bad_rows, "shard_size": shard_size,
        "keep_columns": keep,
        "inputs": [{"path": f.source, "size": f.size, "rows": f.rows} for f in files],
    }
    _check_manifest(out_dir, manifest, overwrite)
    shards = plan_shards(files, shard_size, batch_size)
    todo = [s for s in shards if not (out_dir / s.name).exists()]
    report = JobReport(shards=len(shards), skipped=len(shards) - len(todo), output=str(out_dir))
    if progress:
        rows = sum(s.rows for s in todo)
        print(f"tamis batch: {len(shards)} shards ({sum(f.rows for f in files)} rows) of {len(files)} file(s); "
              f"{report.skipped} already done, {len(todo)} to do ({rows} rows)"
              f"{' on Ray' if use_ray else ''}", file=sys.stderr)
    if todo:
        job_mapper.keep_columns = keep + ([SHARD_COLUMN, ROW_COLUMN] if use_ray else [])
        run = _run_ray if use_ray else _run_local
        run(todo, job_mapper, keep, out_dir, report, skip_bad, batch_size, progress, on_shard,
            ray_address=ray_address, num_workers=num_workers)
    if len(todo) and report.written == len(todo) and (out_dir / INPUT_CACHE).exists():
        shutil.rmtree(out_dir / INPUT_CACHE, ignore_errors=True)
    report.seconds = time.perf_counter() - t0
    return report


def _flagging(mapper: EmbedBatch | RerankBatch) -> EmbedBatch | RerankBatch:
    """A copy of ``mapper`` that flags bad rows (shards keep row counts; skipping happens at write)."""
    import copy

    m = copy.copy(mapper)
    m.bad_rows = "flag"
    return m


def _count(report: JobReport, table: Any) -> None:
    import pyarrow.compute as pc

    report.rows += table.num_rows
    if ERROR_COLUMN in table.column_names:
        report.bad_rows += table.num_rows - table.column(ERROR_COLUMN).null_count
    if TRUNCATED_COLUMN in table.column_names:
        report.truncated_rows += int(pc.sum(table.column(TRUNCATED_COLUMN).fill_null(False)).as_py() or 0)


def _bar(total: int, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, desc="batch", unit="row", file=sys.stderr)


def _batches(table: Any, size: int) -> Iterator[Any]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)


def _run_local(todo: list[Shard], mapper: Any, keep: list[str], out_dir: Path, report: JobReport,
               skip_bad: bool, batch_size: int, progress: bool, on_shard: Any, **_: Any) -> None:
    import pyarrow as pa

    with _bar(sum(s.rows for s in todo), progress) as bar:
        for shard in todo:
            table = read_shard(shard, mapper.text_columns, keep)
            parts = []
            for batch in _batches(table, batch_size):
                parts.append(mapper(batch))
                bar.update(batch.num_rows)
            result = pa.concat_tables(parts) if parts else mapper(table)
            _count(report, result)
            write_atomic(_finish_table(result, skip_bad), out_dir / shard.name)
            report.written += 1
            if on_shard:
                on_shard(shard, out_dir / shard.name)


def _read_piece_batch(batch: Any, text_columns: list[str], keep: list[str]) -> Any:
    """Ray task: a one-row batch naming a piece -> that piece's rows."""
    import pyarrow as pa

    rows = batch.to_pylist() if hasattr(batch, "to_pylist") else [dict(zip(batch, v)) for v in zip(*batch.values())]
    return pa.concat_tables([read_piece(Piece(**r), text_columns, keep, tag=True) for r in rows])


def _run_ray(todo: list[Shard], mapper: Any, keep: list[str], out_dir: Path, report: JobReport,
             skip_bad: bool, batch_size: int, progress: bool, on_shard: Any, *, ray_address: str | None,
             num_workers: int | None) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray
    import ray.data

    from tamis.scale.ray_data import map_dataset

    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    pieces = [asdict(p) for s in todo for p in s.pieces]
    ds = ray.data.from_items(pieces, override_num_blocks=len(pieces))
    ds = ds.map_batches(_read_piece_batch, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"text_columns": list(mapper.text_columns), "keep": keep})
    mapped = map_dataset(ds, mapper, num_workers=num_workers, batch_size=batch_size)
    by_index = {s.index: s for s in todo}
    pending: dict[int, list[Any]] = {}
    have: dict[int, int] = {}
    with _bar(sum(s.rows for s in todo), progress) as bar:
        for batch in mapped.iter_batches(batch_format="pyarrow", batch_size=None):
            shard_ids = batch.column(SHARD_COLUMN)
            for sid in pc.unique(shard_ids).to_pylist():
                part = batch.filter(pc.equal(shard_ids, sid))
                pending.setdefault(sid, []).append(part)
                have[sid] = have.get(sid, 0) + part.num_rows
                bar.update(part.num_rows)
                shard = by_index[sid]
                if have[sid] == shard.rows:
                    table = pa.concat_tables(pending.pop(sid)).sort_by(ROW_COLUMN)
                    _count(report, table)
                    write_atomic(_finish_table(table, skip_bad), out_dir / shard.name)
                    report.written += 1
                    if on_shard:
                        on_shard(shard, out_dir / shard.name)
    if pending:
        raise RuntimeError(f"Ray returned incomplete shards {sorted(pending)}; rerun to finish them")
