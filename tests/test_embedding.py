"""The served text embedding (onnxruntime + tokenizers + numpy) against the original torch model's vectors.

Needs the artefact that `make embedding` exports into var/embedding (`make test` builds it first). A missing
artefact fails these tests rather than skipping them: CI must exercise the real model.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from retrieval.embedding import (
    BUILD_TARGET,
    EmbeddingArtifactNotFoundError,
    EmbeddingManifest,
    OnnxMiniLMEmbedding,
)

REPO = Path(__file__).resolve().parent.parent
ARTIFACT_DIR = REPO / "var" / "embedding"

PARITY_SLACK = 0.002
"""How far below the export's own measurement a probe's cosine may fall when served.

The export measured the same model.onnx with the same onnxruntime version and the same tokenizer.json; serving can
differ only by float summation order (~1e-6). So per probe we require cosine >= the export's worst probe minus this
slack, and never below the export's floor (0.98). For int8-weight-only (worst probe ~0.998) that is ~0.996; for
float32 ~0.998. A serving-side slip (truncating at 128 instead of 256, CLS instead of mean pooling, a missing
normalisation, padding counted in the mean) costs far more than 0.002 on at least one probe."""


@pytest.fixture(scope="module")
def embedding() -> OnnxMiniLMEmbedding:
    if not (ARTIFACT_DIR / "manifest.json").is_file():
        pytest.fail(
            f"no embedding artefact in {ARTIFACT_DIR}: run `{BUILD_TARGET}` (make test does it first)", pytrace=False
        )
    return OnnxMiniLMEmbedding(ARTIFACT_DIR, embed_batch_size=8)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_every_probe_matches_the_torch_reference(embedding):
    manifest = embedding.manifest
    threshold = max(manifest.parity_floor, manifest.parity_min - PARITY_SLACK)
    assert embedding.dimension == 384
    assert len(manifest.probes) >= 12
    for probe in manifest.probes:
        assert embedding.token_count(probe.text) == probe.tokens, probe.text[:40]
        vector = np.asarray(embedding.get_text_embedding(probe.text))
        assert vector.shape == (384,)
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
        assert cosine(vector, np.asarray(probe.embedding)) >= threshold, (probe.text[:40], threshold)


def test_batched_vectors_equal_single_ones(embedding):
    texts = [probe.text for probe in embedding.manifest.probes]
    batched = embedding.embed(texts)  # 8 per run, sorted by length: mixed paddings
    alone = np.stack([embedding.get_query_embedding(text) for text in texts])
    via_llama_index = np.asarray(embedding.get_text_embedding_batch(texts))
    assert batched.shape == (len(texts), 384)
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(via_llama_index, alone, atol=1e-5)
    reversed_batch = embedding.embed(texts[::-1])[::-1]  # other batch neighbours, other paddings
    np.testing.assert_allclose(reversed_batch, alone, atol=1e-5)


def test_similar_texts_are_closer_than_unrelated_ones(embedding):
    stolen_card = embedding.get_query_embedding("Stolen credit card used to buy electronics online.")
    paraphrase = embedding.get_text_embedding("Someone bought laptops with a card that had been reported stolen.")
    takeover = embedding.get_text_embedding("Attacker logged in, changed the email address and drained the account.")
    hijack = embedding.get_text_embedding("The account was hijacked: new password, new phone, then a big transfer.")
    baking = embedding.get_text_embedding("Recipe for banana bread with walnuts and a pinch of cinnamon.")
    assert cosine(stolen_card, paraphrase) > cosine(stolen_card, baking) + 0.3
    assert cosine(stolen_card, paraphrase) > cosine(stolen_card, hijack)
    assert cosine(takeover, hijack) > cosine(takeover, baking) + 0.3
    assert cosine(takeover, hijack) > cosine(takeover, paraphrase)


def test_long_text_is_truncated_at_max_length(embedding):
    max_length = embedding.manifest.max_length
    long_text = max(embedding.manifest.probes, key=lambda p: len(p.text)).text
    assert embedding.token_count(long_text) == max_length
    head = " ".join(long_text.split()[:40])
    with_other_tail = long_text + " Completely different ending about a birthday party and a chocolate cake." * 20
    vectors = embedding.embed([long_text, with_other_tail, head])
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-5)  # beyond max_length nothing counts
    assert cosine(vectors[0], vectors[2]) < 0.99  # but everything up to it does


def test_empty_and_whitespace_texts_give_unit_vectors(embedding):
    vectors = embedding.embed(["", "   ", "\n"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedding.embed([]).shape == (0, 384)


def test_async_methods_agree_with_sync_ones(embedding):
    texts = ["Card testing: many small authorisations in a minute.", "Chargeback for goods not received."]

    async def run():
        return (
            await embedding.aget_query_embedding(texts[0]),
            await embedding.aget_text_embedding(texts[1]),
            await embedding.aget_text_embedding_batch(texts),
        )

    query, text, batch = asyncio.run(run())
    np.testing.assert_allclose(query, embedding.get_query_embedding(texts[0]), atol=1e-6)
    np.testing.assert_allclose(text, embedding.get_text_embedding(texts[1]), atol=1e-6)
    np.testing.assert_allclose(batch, embedding.embed(texts), atol=1e-6)


def test_missing_artefact_names_the_make_target(tmp_path):
    with pytest.raises(EmbeddingArtifactNotFoundError, match="make embedding") as raised:
        OnnxMiniLMEmbedding(tmp_path / "nowhere")
    assert isinstance(raised.value, FileNotFoundError)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        EmbeddingManifest.load(tmp_path)


def test_serving_never_imports_torch(embedding, tmp_path):
    """Torch is absent from our venv, so 'not in sys.modules' alone would prove nothing: a stand-in ``torch``
    package on the path records any import attempt (and fails it), as if torch were installed."""
    stand_in = tmp_path / "site" / "torch"
    stand_in.mkdir(parents=True)
    marker = tmp_path / "torch-imported.txt"
    (stand_in / "__init__.py").write_text(
        "import os, traceback\n"
        "with open(os.environ['TORCH_IMPORT_MARKER'], 'a') as f:\n"
        "    f.write(''.join(traceback.format_stack()))\n"
        "raise ImportError('torch must stay out of serving processes')\n"
    )
    code = textwrap.dedent(
        f"""
        import sys
        from retrieval.embedding import OnnxMiniLMEmbedding
        model = OnnxMiniLMEmbedding({str(ARTIFACT_DIR)!r})
        vectors = model.get_text_embedding_batch(["stolen card", "account takeover", "ok"])
        query = model.get_query_embedding("gift cards bought from a new device")
        assert len(vectors) == 3 and len(query) == 384
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    env["TORCH_IMPORT_MARKER"] = str(marker)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert not marker.exists(), f"something imported torch:\n{marker.read_text()}"
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
