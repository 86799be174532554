"""The README's hybrid-search recipe, run as written (FAISS for the dense vectors, a scipy sparse matrix for the
SPLADE vectors, reciprocal rank fusion), on the bundled MiniLM and a tiny random SPLADE model standing in for
SPLADE-tiny."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import save_random_splade

faiss = pytest.importorskip("faiss")
transformers = pytest.importorskip("transformers")

RECIPE = '''
import faiss
import numpy as np
import tamis
from tamis.evaluate import rrf

docs = ["SPLADE learns sparse term weights from a masked language model.",
        "Dense retrieval embeds queries and documents into one vector space.",
        "BM25 ranks documents by term frequency and inverse document frequency.",
        "Reciprocal rank fusion combines ranked lists without calibrating their scores."]

dense = tamis.Embedder()                                  # bundled all-MiniLM-L6-v2
sparse = tamis.SparseEmbedder(SPLADE)                     # e.g. runs/tiny-reranker/models/splade-tiny

D = dense.embed(docs)                                     # [n, 384], L2-normalised
index = faiss.IndexFlatIP(D.shape[1])
index.add(D)
S = sparse.embed_matrix(docs, "document")                 # scipy CSR [n, 30522]

def search(query, k=3):
    scores, ids = index.search(dense.embed([query]), k)
    by_dense = {str(i): float(s) for i, s in zip(ids[0], scores[0])}
    sq = (sparse.embed_matrix([query], "query") @ S.T).toarray()[0]
    by_sparse = {str(i): float(sq[i]) for i in np.argsort(-sq)[:k] if sq[i] > 0}
    fused = rrf([{"q": by_dense}, {"q": by_sparse}], depth=k)["q"]
    return [(docs[int(i)], score) for i, score in fused.items()]

for text, score in search("how does learned sparse retrieval work"):
    print(f"{score:.4f}  {text}")
'''


@pytest.fixture(scope="module")
def splade_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("splade")
    save_random_splade(d, {"model_max_length": 128, "pad_token": "[PAD]"})
    return d


def test_recipe_runs_as_written(splade_dir, capsys):
    scope: dict = {"SPLADE": str(splade_dir)}
    exec(compile(RECIPE, "README-hybrid-recipe", "exec"), scope)
    lines = capsys.readouterr().out.strip().splitlines()
    assert 1 <= len(lines) <= 3
    results = scope["search"]("how does learned sparse retrieval work")
    assert [s for _, s in results] == sorted((s for _, s in results), reverse=True)
    assert all(text in scope["docs"] for text, _ in results)
    # the dense part alone: the first document the fusion returns is in the dense top 3
    assert np.isfinite([s for _, s in results]).all()
