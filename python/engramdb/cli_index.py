"""``engramdb index``: build, query, inspect, verify and compact on-disk SPANN
indexes from vector files (.npy, .fvecs, .bvecs).

Mounted into the main CLI with ``main.add_command(index)``; runs on its own
as ``python -m engramdb.cli_index``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click
import numpy as np

from ._vecio import VectorFileError, read_ids, read_vectors


def _fail(e: BaseException) -> click.ClickException:
    return click.ClickException(str(e))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _errors() -> tuple[type[BaseException], ...]:
    from . import errors

    return (errors.EngramError, VectorFileError, ValueError, OSError)


@click.group("index", context_settings={"help_option_names": ["-h", "--help"]})
def index() -> None:
    """On-disk approximate nearest-neighbour indexes (SPANN)."""


@index.command("build")
@click.argument("vectors", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="index directory")
@click.option("--metric", default="cosine", show_default=True, type=click.Choice(["cosine", "ip", "l2"]))
@click.option("--memory-budget", default=None, help="RAM the opened index may keep, e.g. 512MB")
@click.option("--ids", "ids_path", default=None, type=click.Path(dir_okay=False), help=".npy of integer ids (default 0..n-1)")
@click.option("--head-ratio", type=float, default=None, help="heads as a fraction of the vectors")
@click.option("--param", "-p", multiple=True, help="extra build parameter NAME=VALUE (repeatable)")
@click.option("--progress/--no-progress", default=True, show_default=True)
def build_cmd(vectors: str, out: str, metric: str, memory_budget: str | None, ids_path: str | None,
              head_ratio: float | None, param: tuple[str, ...], progress: bool) -> None:
    """Build an index over VECTORS into --out."""
    from .spann import SpannIndex

    try:
        data = read_vectors(vectors)
        ids = None
        if ids_path:
            ids = np.load(ids_path, allow_pickle=False).reshape(-1)
            if ids.shape[0] != data.shape[0]:
                raise VectorFileError(f"{ids_path}: {ids.shape[0]} ids for {data.shape[0]} vectors")
        params: dict[str, Any] = {}
        if head_ratio is not None:
            params["head_ratio"] = head_ratio
        for p in param:
            if "=" not in p:
                raise ValueError(f"--param {p!r}: expected NAME=VALUE")
            k, v = p.split("=", 1)
            params[k.strip()] = float(v) if any(c in v for c in ".eE") else int(v)
        t = time.perf_counter()
        idx = SpannIndex.build(data, out, metric=metric, ids=ids, memory_budget=memory_budget,
                               progress=progress, **params)
        dt = time.perf_counter() - t
        s = idx.stats()
    except _errors() as e:
        raise _fail(e) from None
    click.echo(
        f"built {out}: {s['live']} vectors x {s['dim']} ({metric}) in {dt:.1f} s; "
        f"{s['heads']} heads, {s['replicas']:.2f} postings per vector, "
        f"disk {_human(s['disk_bytes'])}, resident {_human(s['ram_bytes'])}"
    )


@index.command("query")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("queries", type=click.Path(dir_okay=False))
@click.option("-k", default=10, show_default=True, type=int)
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), help="write ids to this .npy (scores to *.scores.npy)")
@click.option("--gt", default=None, type=click.Path(dir_okay=False), help="ground-truth ids (.npy or .ivecs): print recall@k")
@click.option("--mode", default="disk", show_default=True, type=click.Choice(["disk", "memory"]))
@click.option("--nprobe", type=int, default=None, help="most postings read per query")
@click.option("--coarse-probe", type=int, default=None, help="head lists scanned per query")
@click.option("--epsilon", type=float, default=None, help="query-aware pruning ratio")
@click.option("--rerank", type=int, default=None, help="candidates reranked at full precision")
@click.option("--batch", type=int, default=1, show_default=True, help="queries per search call (1 measures latency)")
def query_cmd(index_dir: str, queries: str, k: int, out: str | None, gt: str | None, mode: str,
              nprobe: int | None, coarse_probe: int | None, epsilon: float | None, rerank: int | None,
              batch: int) -> None:
    """Search INDEX_DIR with every vector of QUERIES."""
    from .spann import SpannIndex

    try:
        q = read_vectors(queries)
        truth = read_ids(gt) if gt else None
        if truth is not None and truth.shape[0] != q.shape[0]:
            raise VectorFileError(f"{gt}: {truth.shape[0]} rows of ground truth for {q.shape[0]} queries")
        if truth is not None and truth.shape[1] < k:
            raise VectorFileError(f"{gt}: {truth.shape[1]} ground-truth ids per query, fewer than k={k}")
        idx = SpannIndex.open(index_dir, mode=mode, read_only=True)
        if q.shape[1] != idx.dim:
            raise VectorFileError(f"{queries}: queries have dimension {q.shape[1]}, the index {idx.dim}")
        kw = dict(nprobe=nprobe, coarse_probe=coarse_probe, epsilon=epsilon, rerank=rerank)
        ids_parts, score_parts, lat = [], [], []
        postings = 0
        read = 0
        t0 = time.perf_counter()
        for s in range(0, q.shape[0], max(1, batch)):
            t = time.perf_counter()
            i, sc = idx.search(q[s:s + batch], k=k, **kw)
            lat.append((time.perf_counter() - t) / i.shape[0])
            st = idx.stats()
            postings += st["last_postings_read"]
            read += st["last_bytes_read"]
            ids_parts.append(i)
            score_parts.append(sc)
        total = time.perf_counter() - t0
        ids = np.concatenate(ids_parts)
        scores = np.concatenate(score_parts)
    except _errors() as e:
        raise _fail(e) from None
    m = q.shape[0]
    click.echo(
        f"{m} queries, k={k}, mode={mode}: {m / total:.0f} queries/s, median latency "
        f"{np.median(lat) * 1e3:.3f} ms, {postings / m:.1f} postings and {_human(read / m)} read per query"
    )
    if truth is not None:
        kk = min(k, ids.shape[1])
        hit = sum(len(set(ids[i, :kk].tolist()) & set(truth[i, :k].tolist())) for i in range(m))
        click.echo(f"recall@{k} = {hit / (m * k):.4f}")
    if out:
        np.save(out, ids.astype(np.int64))
        base, _ = os.path.splitext(out)
        np.save(base + ".scores.npy", scores)
        click.echo(f"wrote {out} and {base}.scores.npy")


@index.command("info")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def info_cmd(index_dir: str, as_json: bool) -> None:
    """Print what INDEX_DIR holds."""
    from .spann import SpannIndex

    try:
        idx = SpannIndex.open(index_dir, mode="disk", read_only=True)
        s = idx.stats()
        s["params"] = idx.params()
    except _errors() as e:
        raise _fail(e) from None
    if as_json:
        click.echo(json.dumps(s, sort_keys=True))
        return
    click.echo(f"index       {index_dir}")
    click.echo(f"vectors     {s['live']} live of {s['rows']} rows, dim {s['dim']}, {s['metric']}")
    click.echo(f"heads       {s['heads']} ({s['postings']} non-empty postings)")
    click.echo(f"replicas    {s['replicas']:.2f} postings per vector ({s['entries']} entries)")
    click.echo(f"disk        {_human(s['disk_bytes'])} ({_human(s['garbage_bytes'])} reclaimable by compact)")
    click.echo(f"resident    {_human(s['ram_bytes'])} when opened in disk mode")
    click.echo(f"log         {_human(s['log_bytes'])} of updates not yet flushed (replayed on open)")
    p = s["params"]
    click.echo(
        f"search      nprobe={p['nprobe']} coarse_probe={p['coarse_probe']} "
        f"epsilon={p['epsilon']} rerank={p['rerank']}"
    )


@index.command("verify")
@click.argument("index_dir", type=click.Path(file_okay=False))
def verify_cmd(index_dir: str) -> None:
    """Check every page and record checksum of INDEX_DIR (and its update
    log, which opening replays)."""
    from .spann import SpannIndex

    try:
        r = SpannIndex.open(index_dir, mode="disk", read_only=True).verify()
    except _errors() as e:
        raise _fail(e) from None
    click.echo(f"ok: {r['postings']} postings ({r['pages']} pages, {r['entries']} entries), {r['vectors']} vectors")


@index.command("compact")
@click.argument("index_dir", type=click.Path(file_okay=False))
def compact_cmd(index_dir: str) -> None:
    """Drop deleted and stale entries and rewrite INDEX_DIR's files."""
    from .spann import SpannIndex

    try:
        r = SpannIndex.open(index_dir, mode="disk").compact()
    except _errors() as e:
        raise _fail(e) from None
    click.echo(
        f"compacted: disk {_human(r['disk_before'])} -> {_human(r['disk_after'])}, "
        f"{r['entries_dropped']} stale entries and {r['rows_dropped']} deleted rows dropped, "
        f"{r['merged']} postings merged, {r['split']} split"
    )


if __name__ == "__main__":
    index()
