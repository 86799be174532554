"""A real server on a loopback port, called with the real client libraries and real (small) models.

Each client's values are checked against the library called directly: openai (base64 by default),
langchain-community JinaEmbeddings / JinaRerank, llama-index JinaRerank, cohere ClientV2 rerank, plus
raw HTTP for Jina-only fields (tasks on jina-embeddings-v3-tiny, late chunking, output types).
"""

from __future__ import annotations

import base64
import concurrent.futures
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import tamis
from live_server import LiveServer
from tamis.server import ServerSettings, create_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FIXTURES = Path("/work/shared/fixtures")
V3 = FIXTURES / "jina-embeddings-v3-tiny"
CE = FIXTURES / "jina-reranker-v1-tiny-like"
KEY = "test-key-123"
MINI = "all-MiniLM-L6-v2"

TEXTS = [
    "The cat sat on the mat.",
    "Quantum computers use qubits, which can be in superpositions of states.",
    "A recipe for pancakes: flour, eggs, milk, and a pinch of salt.",
    "Paris is the capital and most populous city of France.",
    "hi",
]
QUERY = "What is the capital of France?"
DOCS = [
    "Berlin is the capital of Germany.",
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower is in Paris.",
    "Bananas are rich in potassium.",
    "France is a country in Western Europe.",
]


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    # float32: the server batches rows of several requests together and answers are compared with direct
    # calls at 1e-5, which bf16 (what "auto" picks on a CPU with native bf16) does not hold across batchings
    f32 = "float32"
    out: dict[str, Any] = {"mini": tamis.Embedder(dtype=f32), "rr_default": tamis.Reranker(dtype=f32)}
    out["v3"] = tamis.Embedder(V3, dtype=f32) if V3.is_dir() else None
    out["ce"] = tamis.Reranker(CE, dtype=f32) if CE.is_dir() else None
    return out


@pytest.fixture(scope="module")
def server(models: dict[str, Any]):
    embedders = {MINI: models["mini"]}
    rerankers = {MINI: models["rr_default"]}
    if models["v3"] is not None:
        embedders["jina-embeddings-v3-tiny"] = models["v3"]
    if models["ce"] is not None:
        rerankers["jina-reranker-v1-tiny-like"] = models["ce"]
    app = create_app(embedders, rerankers, ServerSettings(api_keys=[KEY]))
    with LiveServer(app) as srv:
        yield srv


def post(server: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


# ---------------------------------------------------------------------------- openai
def test_openai_client_base64_default(server: LiveServer, models: dict[str, Any]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    res = client.embeddings.create(model=MINI, input=TEXTS)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in res.data])
    ref = models["mini"].embed(TEXTS)
    assert got.shape == ref.shape == (5, 384)
    assert cos(got, ref).min() >= 0.99999
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert [d.index for d in res.data] == list(range(5)) and res.model == MINI
    assert res.usage.prompt_tokens == res.usage.total_tokens == sum(models["mini"].count_tokens(TEXTS))

    res = client.embeddings.create(model=MINI, input="a single string", encoding_format="float", dimensions=64)
    ref = models["mini"].embed(["a single string"], dimensions=64)
    assert len(res.data[0].embedding) == 64
    assert cos(np.array(res.data[0].embedding), ref[0]) >= 0.99999


def test_openai_client_errors(server: LiveServer) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert "served models" in str(e.value) and MINI in str(e.value)
    assert e.value.body["code"] == "model_not_found"  # the client unwraps body["error"]
    with pytest.raises(openai.BadRequestError, match="empty string"):
        client.embeddings.create(model=MINI, input=["ok", ""])
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.embeddings.create(model=MINI, input="x")


# ---------------------------------------------------------------------------- langchain
def test_langchain_jina_embeddings(server: LiveServer, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_community.embeddings import jina

    monkeypatch.setattr(jina, "JINA_API_URL", server.url + "/v1/embeddings")
    lc = jina.JinaEmbeddings(jina_api_key=KEY, model_name=MINI)
    docs = np.array(lc.embed_documents(TEXTS))
    query = np.array(lc.embed_query(QUERY))
    assert cos(docs, models["mini"].embed(TEXTS)).min() >= 0.99999
    assert cos(query, models["mini"].embed([QUERY])[0]) >= 0.99999
    # errors surface through the `detail` key the client reads
    wrong = jina.JinaEmbeddings(jina_api_key=KEY, model_name="jina-embeddings-v2-base-en")
    with pytest.raises(RuntimeError, match="served models"):
        wrong.embed_query("x")


def _expected_ranking(rr: Any, top_n: int | None) -> list[tuple[int, float]]:
    res = rr.rerank(QUERY, DOCS, top_n=top_n, return_documents=False)
    return [(r.index, r.relevance_score) for r in res.results]


def _rerank_models(models: dict[str, Any]) -> list[tuple[str, Any]]:
    out = [(MINI, models["rr_default"])]
    if models["ce"] is not None:
        out.append(("jina-reranker-v1-tiny-like", models["ce"]))
    return out


def test_langchain_jina_rerank(server: LiveServer, models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_community.document_compressors import jina_rerank
    from langchain_core.documents import Document

    monkeypatch.setattr(jina_rerank, "JINA_API_URL", server.url + "/v1/rerank")
    for name, rr in _rerank_models(models):
        lc = jina_rerank.JinaRerank(jina_api_key=KEY, model=name, top_n=3)
        got = lc.rerank(DOCS, QUERY)
        exp = _expected_ranking(rr, 3)
        assert [g["index"] for g in got] == [i for i, _ in exp]
        np.testing.assert_allclose([g["relevance_score"] for g in got], [s for _, s in exp], atol=1e-5)
        docs = lc.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
        assert [d.page_content for d in docs] == [DOCS[i] for i, _ in exp]
    if models["ce"] is None:
        pytest.skip("cross-encoder fixture missing; checked the embedding reranker only")


def test_llama_index_jina_rerank(server: LiveServer, models: dict[str, Any]) -> None:
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCS]
    for name, rr in _rerank_models(models):
        post_proc = JinaRerank(base_url=server.url + "/v1", api_key=KEY, model=name, top_n=2)
        out = post_proc.postprocess_nodes(nodes, query_str=QUERY)
        exp = _expected_ranking(rr, 2)
        assert [n.node.get_content() for n in out] == [DOCS[i] for i, _ in exp]
        np.testing.assert_allclose([n.score for n in out], [s for _, s in exp], atol=1e-5)


def test_cohere_v2_rerank(server: LiveServer, models: dict[str, Any]) -> None:
    import cohere

    co = cohere.ClientV2(api_key=KEY, base_url=server.url)
    for name, rr in _rerank_models(models):
        res = co.rerank(model=name, query=QUERY, documents=DOCS, top_n=3)
        exp = _expected_ranking(rr, 3)
        assert [r.index for r in res.results] == [i for i, _ in exp]
        np.testing.assert_allclose([r.relevance_score for r in res.results], [s for _, s in exp], atol=1e-5)
        assert res.meta.api_version.version == "2" and res.id
    res = co.rerank(model=MINI, query=QUERY, documents=DOCS)  # no top_n: all documents
    assert sorted(r.index for r in res.results) == list(range(len(DOCS)))
    with pytest.raises(cohere.core.api_error.ApiError) as e:
        cohere.ClientV2(api_key="nope", base_url=server.url).rerank(model=MINI, query=QUERY, documents=DOCS)
    assert e.value.status_code == 401


# ---------------------------------------------------------------------------- cohere embed (issue 36, item 3)
def test_cohere_v2_embed_all_types(server: LiveServer, models: dict[str, Any]) -> None:
    import cohere

    co = cohere.ClientV2(api_key=KEY, base_url=server.url)
    res = co.embed(model=MINI, texts=TEXTS, input_type="search_document",
                   embedding_types=["float", "int8", "uint8", "binary", "ubinary", "base64"])
    ref = models["mini"].embed(TEXTS)
    e = res.embeddings
    got = np.array(e.float_)
    assert got.shape == (5, 384) and cos(got, ref).min() >= 0.99999
    int8, uint8 = np.array(e.int8), np.array(e.uint8)
    assert int8.shape == (5, 384) and int8.min() >= -127 and int8.max() <= 127 and np.abs(int8).max(1).min() == 127
    np.testing.assert_array_equal(uint8, int8 + 128)
    assert cos(int8, ref).min() > 0.999  # the direction survives quantisation
    signs = (ref > 0).astype(np.uint8)
    np.testing.assert_array_equal(np.unpackbits(np.array(e.ubinary, np.uint8), axis=1), signs)
    np.testing.assert_array_equal(np.array(e.binary), np.array(e.ubinary) - 128)
    b64 = np.stack([np.frombuffer(base64.b64decode(x), "<f4") for x in e.base64])
    np.testing.assert_allclose(b64, got, atol=1e-7)
    assert res.texts == TEXTS and res.id and res.meta.billed_units.input_tokens == sum(models["mini"].count_tokens(TEXTS))
    assert res.response_type == "embeddings_by_type"
    # the default type is float; output_dimension is the Matryoshka cut
    res = co.embed(model=MINI, texts=["hi"], input_type="search_query", output_dimension=32)
    assert np.array(res.embeddings.float_).shape == (1, 32) and res.embeddings.int8 is None
    # text content in v2 "inputs"
    res = co.embed(model=MINI, inputs=[{"content": [{"type": "text", "text": "hi"}]}], input_type="search_query",
                   embedding_types=["float"])
    assert cos(np.array(res.embeddings.float_[0]), models["mini"].embed(["hi"])[0]) >= 0.99999
    with pytest.raises(cohere.BadRequestError, match="empty string"):
        co.embed(model=MINI, texts=["ok", ""], input_type="search_query")
    with pytest.raises(cohere.BadRequestError, match="embedding_types"):
        co.embed(model=MINI, texts=["ok"], input_type="search_query", embedding_types=["float16"])
    with pytest.raises(cohere.core.api_error.ApiError) as err:
        cohere.ClientV2(api_key="nope", base_url=server.url).embed(model=MINI, texts=["x"], input_type="search_query")
    assert err.value.status_code == 401


def test_cohere_embed_input_type_selects_the_task(server: LiveServer, models: dict[str, Any]) -> None:
    import cohere

    if models["v3"] is None:
        pytest.skip("jina-embeddings-v3-tiny fixture missing")
    co = cohere.ClientV2(api_key=KEY, base_url=server.url)
    v3 = models["v3"]
    for input_type, task in [("search_query", "retrieval.query"), ("search_document", "retrieval.passage"),
                             ("classification", "classification"), ("clustering", "separation")]:
        res = co.embed(model="jina-embeddings-v3-tiny", texts=[TEXTS[0], "hi"], input_type=input_type)
        ref = v3.embed([TEXTS[0], "hi"], task=task)
        np.testing.assert_allclose(np.array(res.embeddings.float_), ref, atol=1e-5)
    # all-MiniLM-L6-v2 has no tasks: every input_type embeds the plain text
    res = co.embed(model=MINI, texts=["x"], input_type="classification")
    np.testing.assert_allclose(np.array(res.embeddings.float_), models["mini"].embed(["x"]), atol=1e-6)
    with pytest.raises(cohere.BadRequestError, match="input_type"):
        co.embed(model=MINI, texts=["x"], input_type="image")


def test_cohere_embed_truncate_none_start_end(server: LiveServer, models: dict[str, Any]) -> None:
    import cohere

    mini = models["mini"]
    head, tail = "alpha beta gamma " * 120, "the final words of a long text"
    long = head + tail  # > 256 tokens
    co = cohere.ClientV2(api_key=KEY, base_url=server.url)
    with pytest.raises(cohere.BadRequestError, match="text 1 has"):
        co.embed(model=MINI, texts=["short", long], input_type="search_document", truncate="NONE")
    end = np.array(co.embed(model=MINI, texts=[long], input_type="search_document", truncate="END").embeddings.float_)
    default = np.array(co.embed(model=MINI, texts=[long], input_type="search_document").embeddings.float_)
    start = np.array(co.embed(model=MINI, texts=[long], input_type="search_document", truncate="START")
                     .embeddings.float_)
    np.testing.assert_allclose(end, mini.embed([long]), atol=1e-5)  # the end is dropped, as the library
    np.testing.assert_allclose(default, end, atol=1e-6)  # Cohere's default is END
    ids = mini.tokenizer.raw([long])[0].ids
    kept = mini.tokenizer.decode(ids[-(mini.max_length - 2):])  # START keeps the last tokens
    assert cos(start[0], mini.embed([kept])[0]) >= 0.9999
    assert cos(start[0], end[0]) < 0.99  # not the same cut
    r = post(server, "/v2/embed", {"model": MINI, "texts": [long], "input_type": "search_document"})
    assert r.headers["x-truncated-inputs"] == "0"


def test_cohere_v1_embed_response_shapes(server: LiveServer, models: dict[str, Any]) -> None:
    import cohere

    co = cohere.Client(api_key=KEY, base_url=server.url)
    res = co.embed(model=MINI, texts=TEXTS, input_type="search_query")  # no embedding_types: embeddings_floats
    assert res.response_type == "embeddings_floats"
    assert cos(np.array(res.embeddings), models["mini"].embed(TEXTS)).min() >= 0.99999
    res = co.embed(model=MINI, texts=TEXTS, input_type="search_query", embedding_types=["ubinary", "float"])
    assert res.response_type == "embeddings_by_type"
    assert np.array(res.embeddings.ubinary).shape == (5, 48) and np.array(res.embeddings.float_).shape == (5, 384)


# ---------------------------------------------------------------------------- raw HTTP: Jina-only fields
def test_v1_rerank_documents_and_usage(server: LiveServer, models: dict[str, Any]) -> None:
    r = post(server, "/v1/rerank", {"model": MINI, "query": QUERY, "documents": DOCS, "top_n": None})
    assert r.status_code == 200
    b = r.json()
    exp = models["rr_default"].rerank(QUERY, DOCS)
    assert [x["index"] for x in b["results"]] == exp.indices
    assert [x["document"]["text"] for x in b["results"]] == [DOCS[i] for i in exp.indices]
    assert b["usage"]["total_tokens"] == exp.total_tokens > 0


@pytest.mark.skipif(not V3.is_dir(), reason="jina-embeddings-v3-tiny fixture missing")
def test_v3_tasks_share_batches_and_match(server: LiveServer, models: dict[str, Any]) -> None:
    v3 = models["v3"]
    texts = ["how do rockets fly", "rockets fly by expelling mass", "a b c", "short"]  # some cut at 48 tokens
    tasks = ["retrieval.query", "retrieval.passage", "text-matching", "classification", "separation"]
    with concurrent.futures.ThreadPoolExecutor(len(tasks)) as pool:
        futs = {t: pool.submit(post, server, "/v1/embeddings",
                               {"model": "jina-embeddings-v3-tiny", "input": texts, "task": t, "truncate": True})
                for t in tasks}
        res = {t: f.result() for t, f in futs.items()}
    for t in tasks:
        assert res[t].status_code == 200, res[t].text
        got = np.array([d["embedding"] for d in res[t].json()["data"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tamis.TruncationWarning)
            exp = v3.embed(texts, task=t, truncate=True)
        np.testing.assert_allclose(got, exp, atol=1e-5)
    q = np.array([d["embedding"] for d in res["retrieval.query"].json()["data"]])
    p = np.array([d["embedding"] for d in res["retrieval.passage"].json()["data"]])
    assert np.abs(q - p).max() > 1e-3  # the adapters differ
    bad = post(server, "/v1/embeddings", {"model": "jina-embeddings-v3-tiny", "input": "x", "task": "retrieval"})
    assert bad.status_code == 400 and "retrieval.query" in bad.json()["detail"]
    late = post(server, "/v1/embeddings", {"model": "jina-embeddings-v3-tiny", "input": ["First part.", "Second part."],
                                           "late_chunking": True, "task": "retrieval.passage", "dimensions": 16})
    assert late.status_code == 200, late.text
    got = np.array([d["embedding"] for d in late.json()["data"]])
    exp = v3.embed(["First part.", "Second part."], task="retrieval.passage", late_chunking=True, dimensions=16)
    np.testing.assert_allclose(got, exp, atol=1e-5)


def test_output_types_and_truncation(server: LiveServer, models: dict[str, Any]) -> None:
    mini = models["mini"]
    r = post(server, "/v1/embeddings", {"model": MINI, "input": TEXTS, "embedding_type": ["base64", "ubinary", "binary"]})
    assert r.status_code == 200
    data = r.json()["data"]
    ref = mini.embed(TEXTS, embedding_type=["float", "ubinary", "binary"])
    dec = np.stack([np.frombuffer(base64.b64decode(d["embedding"]["base64"]), "<f4") for d in data])
    assert cos(dec, ref["float"]).min() >= 0.99999
    agree = np.mean(np.array([d["embedding"]["ubinary"] for d in data]) == ref["ubinary"])
    assert agree >= 0.99
    assert np.array_equal(np.array([d["embedding"]["binary"] for d in data]) + 128,
                          np.array([d["embedding"]["ubinary"] for d in data]))

    long = "word " * 400
    bad = post(server, "/v1/embeddings", {"model": MINI, "input": ["ok", long]})
    assert bad.status_code == 400
    assert "input 1 has 402 tokens, more than the limit of 256" in bad.json()["detail"]
    ok = post(server, "/v1/embeddings", {"model": MINI, "input": ["ok", long], "truncate": True})
    assert ok.status_code == 200 and ok.headers["x-truncated-inputs"] == "1"
    got = np.array([d["embedding"] for d in ok.json()["data"]])
    with pytest.warns(tamis.TruncationWarning):
        exp = mini.embed(["ok", long], truncate=True)
    assert cos(got, exp).min() >= 0.99999
    assert ok.json()["usage"]["total_tokens"] == 3 + 256


def test_concurrent_clients_get_their_own_vectors(server: LiveServer, models: dict[str, Any]) -> None:
    reqs = [[f"request {i} text {j} " + "filler " * ((i * 7 + j * 3) % 40) for j in range(1 + i % 4)]
            for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        res = list(pool.map(lambda t: post(server, "/v1/embeddings", {"model": MINI, "input": t}), reqs))
    for texts, r in zip(reqs, res):
        assert r.status_code == 200
        got = np.array([d["embedding"] for d in r.json()["data"]])
        assert cos(got, models["mini"].embed(texts)).min() >= 0.99999
    m = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text  # behind the key
    assert "tamis_batch_requests_bucket" in m


def test_tamis_serve_command(tmp_path: Path) -> None:
    """`tamis serve` as users start it: defaults, keys from TAMIS_API_KEYS, the start-up auth line."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    env = {**os.environ, "TAMIS_API_KEYS": "alpha, beta"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tamis.cli", "serve", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        health = None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(url + "/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert health is not None and health.status_code == 200, log.read_text()
        # the models are named to key holders only (the server has a key)
        assert "embedding_models" not in health.json()
        keyed = httpx.get(url + "/health", headers={"Authorization": "Bearer beta"}).json()
        assert keyed["embedding_models"] == [MINI] and keyed["reranker_models"] == [MINI]
        assert httpx.post(url + "/v1/embeddings", json={"input": "x"}).status_code == 401
        r = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer beta"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        r = httpx.post(url + "/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 1},
                       headers={"Authorization": "Bearer alpha"})
        assert r.status_code == 200 and r.json()["results"][0]["index"] == 1
    finally:
        proc.terminate()
        proc.wait(20)
    assert "authentication: on (2 API keys)" in log.read_text()


# ---------------------------------------------------------------------------- README's framework block (issue 36, 14)
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_framework_block_runs_against_a_real_server(models: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Use it from your framework" block, run as it stands with only the port changed: the
    OpenAI, Cohere, LangChain, LlamaIndex and Haystack clients each get the bundled model's vectors."""
    for module in ("langchain_openai", "llama_index.embeddings.openai_like", "haystack"):
        pytest.importorskip(module)
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- framework-block -->", 1)[1].split("<!-- /framework-block -->", 1)[0]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    assert 'BASE = "http://127.0.0.1:8080"' in code
    app = create_app({MINI: models["mini"]}, {MINI: models["rr_default"]}, ServerSettings())  # no --api-key
    with LiveServer(app) as srv:
        scope: dict[str, Any] = {}
        exec(compile(code.replace("http://127.0.0.1:8080", srv.url), str(README), "exec"), scope)
    ref = models["mini"].embed(["a text"])[0]
    for name in ("v_openai", "v_cohere", "v_langchain", "v_llamaindex", "v_haystack"):
        got = np.asarray(scope[name], np.float64)
        assert got.shape == (384,) and cos(got, ref) >= 0.99999, name
    exp = models["rr_default"].rerank("a question", ["a text", "another text"])
    assert [r.index for r in scope["ranked"]] == exp.indices
