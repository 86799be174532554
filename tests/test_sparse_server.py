"""The sparse / segment / tokenize router mounted on a test app, called over HTTP (httpx, through Starlette's
TestClient) with the documented JSON of TEI's /embed_sparse and /tokenize, Jina's Segmenter and OpenAI-style
/v1/embeddings with embedding_type "sparse"."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import tamis
from conftest import save_random_splade
from tamis.server import errors as err
from tamis.server.sparse_routes import create_router

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("splade")
    save_random_splade(d, {"model_max_length": 64, "do_lower_case": True, "pad_token": "[PAD]"})
    return tamis.SparseEmbedder(d, name="splade")


class State:
    """The parts of the app's ServerState the router reads."""

    def __init__(self, embedders):
        self.embedders = embedders
        self.rerankers = {}

    def ensure_ready(self):
        pass


@pytest.fixture(scope="module")
def client(sparse_model):
    emb = tamis.Embedder(compile=False)
    app = FastAPI()
    err.install(app)
    router = create_router({"splade": sparse_model}, state=State({"minilm": emb}))
    app.include_router(router)
    routes = router.routes_state

    @app.post("/v1/embeddings")  # the app's route hands embedding_type "sparse" over (see the wiring note)
    async def embeddings(request: Request):
        body = await request.json()
        assert body.get("embedding_type") == "sparse"
        return await routes.openai_embeddings(body)

    with TestClient(app) as c:
        yield c


def test_embed_sparse_tei_shape(client, sparse_model):
    texts = ["sparse retrieval with learned term weights", "a short one"]
    r = client.post("/embed_sparse", json={"inputs": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body) == 2
    for got, ref in zip(body, sparse_model.embed(texts)):
        assert [x["index"] for x in got] == ref.indices.tolist()
        np.testing.assert_allclose([x["value"] for x in got], ref.values, atol=1e-6)
    one = client.post("/embed_sparse", json={"inputs": "a short one", "top_k": 3}).json()
    assert len(one) == 1 and len(one[0]) == 3
    assert client.post("/embed_sparse", json={"inputs": []}).status_code == 400
    assert client.post("/embed_sparse", json={"inputs": ["x"], "model": "nope"}).status_code == 400
    long = "word " * 500
    r = client.post("/embed_sparse", json={"inputs": [long], "truncate": False})
    assert r.status_code == 400 and "input 0" in r.json()["detail"]
    assert client.post("/embed_sparse", json={"inputs": [long], "truncate": True}).status_code == 200


def test_openai_embeddings_sparse(client, sparse_model):
    r = client.post("/v1/embeddings", json={"input": ["what is splade", "terms"], "embedding_type": "sparse",
                                            "task": "retrieval.query"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "splade" and body["usage"]["prompt_tokens"] > 0
    ref = sparse_model.embed(["what is splade", "terms"], "query")
    for item, v in zip(body["data"], ref):
        assert item["embedding"]["indices"] == v.indices.tolist()
    r = client.post("/v1/embeddings", json={"input": "x", "embedding_type": "sparse", "task": "classification"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_task"


def test_segment_jina_shape(client):
    content = "Jina AI: Your Search Foundation, Supercharged! 🚀\n\nSecond paragraph. With two sentences."
    r = client.post("/v1/segment", json={"content": content, "tokenizer": "minilm", "return_tokens": True,
                                         "return_chunks": True, "max_chunk_length": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokenizer"] == "minilm" and body["num_tokens"] > 0 and body["usage"]["tokens"] == body["num_tokens"]
    assert body["num_chunks"] == len(body["chunks"]) == len(body["chunk_positions"]) == len(body["tokens"])
    assert "".join(body["chunks"]) == content
    for (s, e), c in zip(body["chunk_positions"], body["chunks"]):
        assert content[s:e] == c
    # only counting: no chunks unless asked
    body = client.post("/segment", json={"content": content, "tokenizer": "splade"}).json()
    assert "chunks" not in body and body["tokenizer"] == "splade"
    r = client.post("/v1/segment", json={"content": content, "tokenizer": "gpt2"})
    assert r.status_code == 400 and "minilm" in r.json()["detail"]
    r = client.post("/v1/segment", json={"content": content, "tokenizer": "cl100k_base"})
    assert r.status_code in (200, 400)
    if r.status_code == 400:
        assert "cl100k_base" in r.json()["detail"]
    # no tokenizer named: Jina's default cl100k_base, or (offline) the first served model's, named in the answer
    body = client.post("/v1/segment", json={"content": content}).json()
    assert body["tokenizer"] in ("cl100k_base", "minilm")


def test_tokenize_tei_and_vllm_shapes(client):
    r = client.post("/tokenize", json={"inputs": ["Hello world", "two"], "model": "minilm"})
    assert r.status_code == 200, r.text
    first = r.json()[0]
    assert first[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert first[1] == {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5}
    assert first[-1]["special"] is True
    plain = client.post("/tokenize", json={"inputs": "Hello world", "add_special_tokens": False,
                                           "model": "minilm"}).json()
    assert [t["text"] for t in plain[0]] == ["Hello", "world"]
    v = client.post("/tokenize", json={"prompt": "Hello world", "model": "splade"}).json()
    assert v["count"] == 4 and v["tokens"][0] == 101 and v["max_model_len"] == 64
    assert client.post("/tokenize", json={"model": "minilm"}).status_code == 400
