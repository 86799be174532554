"""Models by Hugging Face id, against a stand-in Hub on 127.0.0.1 (tests/hub_server.py), never the real one:
download, cache, offline, revisions, refusals, resume, `tamis pull`, and serving while models load."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers

import tamis
from hub_server import FakeHub, read_dir
from live_server import LiveServer
from tamis.cli import main
from tamis.errors import HubError, ModelNotFoundError
from tamis.models.loading import resolve_model_dir

FIX = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TEXTS = ["models come from the hub", "and then from the cache"]
# what tamis never fetches; served beside every model to check it stays on the server
DECOYS = {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx", "model.gguf": b"gguf",
          "modeling_custom.py": b"raise SystemExit('remote code ran')", "README.md": b"# card"}
JINA = {  # Hub id -> fixture of its official layout
    "jinaai/jina-embeddings-v3": "jina-embeddings-v3-tiny",
    "jinaai/jina-embeddings-v2-small-en": "jina-embeddings-v2-tiny",
    "jinaai/jina-reranker-v1-tiny-en": "jina-reranker-v1-tiny-like",
    "jinaai/jina-reranker-v3": "jina-reranker-v3-tiny",
}


def _tiny_bert(d: Path, seed: int) -> Path:
    """A tiny random BERT in sentence-transformers' layout (MiniLM's tokenizer and module configs)."""
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    transformers.BertModel(cfg).save_pretrained(d, safe_serialization=True)
    src = resolve_model_dir(None)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
                 "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        if (src / name).is_file():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / name, d / name)
    return d


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("berts")
    return {"v1": _tiny_bert(root / "v1", 0), "v2": _tiny_bert(root / "v2", 1)}


@pytest.fixture
def hub(monkeypatch, tmp_path, berts):
    """The stand-in Hub with repos: tiny/bert (tag v1, then main), pickle, private, gated, and the Jina ids."""
    from huggingface_hub import constants

    fake = FakeHub()
    bert = fake.repo("tiny/bert")
    fake.v1 = bert.add({**read_dir(berts["v1"]), **DECOYS}, "v1")  # type: ignore[attr-defined]
    fake.main = bert.add({**read_dir(berts["v2"]), **DECOYS}, "main")  # type: ignore[attr-defined]
    fake.repo("tiny/pickle-only").add({"config.json": (berts["v1"] / "config.json").read_bytes(),
                                       "pytorch_model.bin": b"pickle", "tokenizer.json": b"{}"})
    fake.repo("tiny/private", token="secret").add(read_dir(berts["v1"]))
    fake.repo("tiny/gated", gated=True).add(read_dir(berts["v1"]))
    for repo_id, fixture in JINA.items():
        fake.repo(repo_id).add({**read_dir(FIX / fixture, skip=("expected.safetensors",)), **DECOYS})
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # huggingface_hub read the suite's "1" at import
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield fake
    fake.stop()


def _offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _fetched(hub: FakeHub) -> set[str]:
    return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}


def _vectors(model: str | Path, **kw) -> np.ndarray:
    return tamis.Embedder(model, dtype="float32", compile=False, **kw).embed(TEXTS)


def test_first_download_fetches_only_what_tamis_loads(hub, berts, capfd):
    emb = tamis.Embedder("tiny/bert", dtype="float32", compile=False)
    assert emb.name == "tiny/bert" and emb.model_dir.parent.name == "snapshots" and emb.model_dir.name == hub.main
    np.testing.assert_allclose(emb.embed(TEXTS), _vectors(berts["v2"]), atol=1e-6)
    fetched = _fetched(hub)
    assert {"config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"} <= fetched
    assert not fetched & set(DECOYS), fetched  # no pickle, ONNX, GGUF, code, card
    assert "Fetching" in capfd.readouterr().err  # the progress bar, on stderr
    shutil.rmtree(os.environ["HF_HUB_CACHE"])
    tamis.Embedder("tiny/bert", show_progress=False, compile=False)
    assert "Fetching" not in capfd.readouterr().err


def test_second_load_comes_from_the_cache_with_the_hub_stopped(hub, berts):
    first = tamis.Embedder("tiny/bert", dtype="float32", compile=False, show_progress=False)
    hub.stop()
    n = len(hub.requests)
    again = tamis.Embedder("tiny/bert", dtype="float32", compile=False)
    assert again.model_dir == first.model_dir and len(hub.requests) == n
    np.testing.assert_array_equal(again.embed(TEXTS), first.embed(TEXTS))
    # a new, uncached id with the Hub gone: one line naming the cause
    with pytest.raises(ModelNotFoundError, match="could not be reached") as e:
        tamis.Embedder("tiny/other")
    assert "\n" not in str(e.value)


def test_hf_hub_offline_means_the_cache_only(hub, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(ModelNotFoundError, match="Offline") as e:
        tamis.Embedder("tiny/bert")
    assert "\n" not in str(e.value) and "tamis pull tiny/bert" in str(e.value) and hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFoundError, match="Offline"):  # the argument alone keeps it off the network too
        tamis.Reranker("tiny/bert", local_files_only=True)
    assert hub.requests == []
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    resolve_model_dir("tiny/bert", show_progress=False)
    _offline(monkeypatch)
    n = len(hub.requests)
    assert tamis.Embedder("tiny/bert", compile=False).embed(TEXTS).shape == (2, 32) and len(hub.requests) == n


def test_revision_pin(hub, berts):
    v1 = _vectors("tiny/bert@v1", show_progress=False)
    np.testing.assert_allclose(v1, _vectors(berts["v1"]), atol=1e-6)
    assert resolve_model_dir("tiny/bert", revision=hub.v1).name == hub.v1
    assert resolve_model_dir(f"tiny/bert@{hub.v1}").name == hub.v1
    main_dir = resolve_model_dir("tiny/bert", show_progress=False)
    assert main_dir.name == hub.main
    assert not np.allclose(v1, _vectors(main_dir))
    with pytest.raises(HubError, match="revision 'v9' of tiny/bert was not found") as e:
        resolve_model_dir("tiny/bert@v9")
    assert e.value.status == 404


def test_pickle_only_repo_is_refused_before_downloading(hub):
    with pytest.raises(HubError, match="only pickle weights") as e:
        tamis.Embedder("tiny/pickle-only")
    msg = str(e.value)
    assert "\n" not in msg and "convert them to safetensors" in msg and "pytorch_model.bin" in msg
    assert _fetched(hub) == set()


def test_404_401_403_are_one_line_errors(hub, monkeypatch, capsys, tmp_path):
    for repo_id, status, words in (("nobody/nothing", 404, "not found"), ("tiny/private", 401, "HF_TOKEN"),
                                   ("tiny/gated", 403, "gated")):
        with pytest.raises(HubError) as e:
            resolve_model_dir(repo_id)
        assert e.value.status == status and str(status) in str(e.value) and words in str(e.value)
        assert "\n" not in str(e.value)
    (tmp_path / "in.txt").write_text("a text\n")
    assert main(["embed", str(tmp_path / "in.txt"), "--model", "tiny/private", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tamis: error:") and "401" in err
    monkeypatch.setenv("HF_TOKEN", "secret")  # the token huggingface_hub finds
    assert resolve_model_dir("tiny/private", show_progress=False).name == hub.repos["tiny/private"].refs["main"]


def test_interrupted_download_resumes(hub, monkeypatch):
    # huggingface_hub writes 10 MB chunks; smaller ones let this 4 MB file be cut after some have been kept
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    hub.cut_once.add("tiny/bert/model.safetensors")
    model_dir = resolve_model_dir("tiny/bert", show_progress=False)
    got = hub.gets("/model.safetensors")
    assert len(got) == 2 and got[0][2] is None and got[1][2] is not None and got[1][2].startswith("bytes=")
    assert (model_dir / "model.safetensors").read_bytes() == hub.repos["tiny/bert"].revisions[hub.main][
        "model.safetensors"]
    # a snapshot left incomplete (a file missing) is completed on the next load, fetching only what is missing
    (model_dir / "tokenizer.json").resolve().unlink()  # its blob, and the snapshot's link to it
    (model_dir / "tokenizer.json").unlink()
    n = len(hub.requests)
    assert resolve_model_dir("tiny/bert", show_progress=False) == model_dir
    assert (model_dir / "tokenizer.json").is_file()
    assert {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests[n:] if m == "GET" and "/resolve/" in p} == {
        "tokenizer.json"}


def test_pull(hub, capsys, monkeypatch):
    assert main(["pull", "tiny/bert", "tiny/bert@v1", "default", "-q"]) == 0
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["tiny/bert", "tiny/bert@v1", "default"] and err == ""
    assert Path(rows[0][1]).name == hub.main and Path(rows[1][1]).name == hub.v1
    assert all(r[2].endswith(("KB", "MB")) for r in rows)
    # pull checks the Hub again (a moved branch is followed); --offline only checks the cache
    hub.stop()
    assert main(["pull", "--offline", "tiny/bert", "--revision", "v1"]) == 0
    assert capsys.readouterr().out.split("\t")[1] == rows[1][1]
    assert main(["pull", "--offline", "tiny/bert", "tiny/never-pulled", "-q"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("tiny/bert\t") and err.count("tamis: error:") == 1 and "tiny/never-pulled" in err


@pytest.mark.parametrize("repo_id", list(JINA))
def test_jina_ids_load_natively_as_their_local_layouts(hub, repo_id):
    local = FIX / JINA[repo_id]
    query, docs = "what is a jina model", ["a document about models", "another about cooking", "third"]
    if "reranker" in repo_id:
        got = tamis.Reranker(repo_id, dtype="float32", show_progress=False).rerank(query, docs)
        want = tamis.Reranker(local, dtype="float32").rerank(query, docs)
        assert [r.index for r in got] == [r.index for r in want]
        np.testing.assert_allclose([r.relevance_score for r in got], [r.relevance_score for r in want], atol=1e-6)
    else:
        np.testing.assert_allclose(_vectors(repo_id, show_progress=False), _vectors(local), atol=1e-6)
    assert not _fetched(hub) & set(DECOYS)  # safetensors only, never remote code


def test_serve_offline_touches_no_network(hub):
    from tamis.server.cli import load_models

    with pytest.raises(ModelNotFoundError, match="Offline"):
        load_models(["tiny/bert"], [], dtype="float32", compile="off", offline=True)
    assert hub.requests == []


def test_health_503_then_200_while_a_model_downloads(hub):
    """The port answers at once: /livez 200 and /health 503 "loading" while the weights download, then 200."""
    from tamis.server.app import create_app
    from tamis.server.cli import load_models
    from tamis.server.settings import ServerSettings

    gate = hub.gates["tiny/bert/model.safetensors"] = threading.Event()
    app = create_app(settings=ServerSettings(), loader=lambda: load_models(["tiny/bert"], [], dtype="float32",
                                                                           compile="off"))
    try:
        with LiveServer(app) as srv:
            deadline = time.time() + 30
            while not hub.gets("/model.safetensors") and time.time() < deadline:
                time.sleep(0.05)  # the download has begun, and waits at the gate
            h, live = httpx.get(srv.url + "/health"), httpx.get(srv.url + "/livez")
            assert h.status_code == 503 and h.json()["status"] == "loading" and h.headers["retry-after"]
            assert live.status_code == 200 and live.json() == {"status": "alive"}
            gate.set()
            while httpx.get(srv.url + "/health").status_code != 200 and time.time() < deadline:
                time.sleep(0.05)
            h = httpx.get(srv.url + "/health")
            assert h.status_code == 200 and h.json()["embedding_models"] == ["tiny/bert"]
            r = httpx.post(srv.url + "/v1/embeddings", json={"input": TEXTS})
            assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
    finally:
        gate.set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_exits_non_zero_when_a_model_fails_to_load(tmp_path):
    """`tamis serve` binds the port, answers /livez, then exits 1 with the one-line reason."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "TAMIS_COMPILE": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tamis.cli", "serve", "--offline", "--port", str(port), "--no-reranker",
         "--embedding-model", "tiny/not-cached", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("tamis: error:")]
    assert len(lines) == 1 and "model loading failed" in lines[0] and "tiny/not-cached" in lines[0]
    assert "Traceback" not in err


def test_livez_is_public_and_documented():
    from tamis.server.app import create_app
    from tamis.server.settings import ServerSettings

    app = create_app({}, {}, settings=ServerSettings(api_keys=["k"]))
    with LiveServer(app) as srv:
        assert httpx.get(srv.url + "/livez").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert "/livez" in json.loads(httpx.get(srv.url + "/openapi.json").text)["paths"]


def test_offline_flag_on_every_command_that_loads_models(hub, capsys, tmp_path):
    """eval, bench, batch and train take --offline as embed, rerank, serve and pull do: the cache only, not one
    request, a one-line error for an id not cached, and the process's setting as it was afterwards."""
    from tamis.cli import parse_args

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n')
    noveleval = FIX.parent / "data" / "noveleval"
    for argv in (["eval", "--data", str(noveleval), "--first-stage", "pool", "--depth", "5", "--max-queries", "1",
                  "--reranker", "tiny/bert", "--out", str(tmp_path / "reports")],
                 ["batch", "embed", str(rows), str(tmp_path / "out"), "--model", "tiny/bert"]):
        assert main([*argv, "--offline"]) != 0, argv
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # progress bars may come before it
        assert last.startswith("tamis") and ": error: " in last and "tiny/bert" in last and "Traceback" not in err, err
        assert hub.requests == [] and os.environ["HF_HUB_OFFLINE"] == "0"
    for argv in (["bench", "--offline"], ["train", "reranker", "--data", "x", "--out", "o", "--offline"],
                 ["train", "embedder", "--data", "x", "--out", "o", "--offline"],
                 ["train", "listwise", "--data", "x", "--out", "o", "--offline"]):
        assert parse_args(argv).offline, argv
    # without the flag the same id downloads
    assert main(["batch", "embed", str(rows), str(tmp_path / "out2"), "--model", "tiny/bert", "-q"]) == 0
    assert hub.requests
