"""Throughput of engramdb's default embedder (all-MiniLM-L6-v2, int8 ONNX) on this CPU.

Usage:
    PYTHONPATH=python python benches/embed_speed.py [--n 2000] [--threads 1 2] [--batch-size 64]
                                                    [--texts FILE] [--repeat 3]

Texts: by default paragraphs of the Python standard library's docstrings (real English
prose, reproducible offline, 20-600 characters each); ``--texts FILE`` reads one text per
line instead. For each thread count it embeds all texts in one batched call (best of
``--repeat`` runs after a warm-up) and reports texts/s and tokens/s, then the latency of
embedding one short query alone (p50 / p99 over 200 calls). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pkgutil
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np


def load_embedders():
    try:
        from engramdb import embedders  # type: ignore

        return embedders
    except Exception:
        path = Path(__file__).resolve().parents[1] / "python" / "engramdb" / "embedders.py"
        spec = importlib.util.spec_from_file_location("engramdb_embedders_bench", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "pydoc_data",
}


def stdlib_paragraphs(n: int) -> list:
    seen, out = set(), []
    names = (
        sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
        if hasattr(sys, "stdlib_module_names")
        else ["os", "re", "json", "collections", "argparse", "typing", "pathlib"]
    )
    for name in names:
        if name.startswith("_") or name in SKIP:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if not isinstance(doc, str):
                continue
            for para in re.split(r"\n\s*\n", doc):
                t = " ".join(para.split())
                letters = sum(c.isalpha() for c in t)
                if 20 <= len(t) <= 600 and letters >= 0.6 * len(t) and t.lower() not in seen:
                    seen.add(t.lower())
                    out.append(t)
                    if len(out) >= n:
                        return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--texts", type=Path)
    args = ap.parse_args()

    emb = load_embedders()
    default = emb.default_embedder()
    if args.texts:
        texts = [t for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()][: args.n]
        source = str(args.texts)
    else:
        texts = stdlib_paragraphs(args.n)
        source = f"Python {platform.python_version()} stdlib docstring paragraphs"
    lengths = np.array(default.token_lengths(texts))
    tokens = int(np.minimum(lengths, default.max_length).sum())
    import onnxruntime
    import tokenizers

    print(
        f"# {len(texts)} texts ({source}), {tokens / len(texts):.1f} tokens/text on average, "
        f"{int((lengths > default.max_length).sum())} truncated at {default.max_length}"
    )
    print(
        f"# {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"loadavg={os.getloadavg()[0]:.2f}, onnxruntime {onnxruntime.__version__}, "
        f"tokenizers {tokenizers.__version__}, numpy {np.__version__}, batch_size={args.batch_size}"
    )
    print("| ORT threads | texts/s | tokens/s | seconds | single query p50 ms | p99 ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for th in args.threads:
        e = emb.OnnxEmbedder(
            default.model_path,
            tokenizer_json=default._tokenizer_json,
            batch_size=args.batch_size,
            threads=th,
            dim=default.dim,
        )
        e(texts[: args.batch_size])  # warm-up (session creation, allocator)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            v = e(texts)
            best = min(best, time.perf_counter() - t0)
        assert v.shape == (len(texts), default.dim)
        lat = []
        for i in range(200):
            t0 = time.perf_counter()
            e([f"what did Caroline say about her trip {i}?"])
            lat.append(time.perf_counter() - t0)
        p50, p99 = np.percentile(np.array(lat) * 1e3, [50, 99])
        print(
            f"| {th} | {len(texts) / best:.0f} | {tokens / best:.0f} | {best:.2f} | {p50:.2f} | {p99:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
