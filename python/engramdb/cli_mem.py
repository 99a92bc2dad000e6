"""``engramdb mem``: a memory folder from the command line.

    engramdb mem add ./mem "Caroline joined a support group" --user-id mel --timestamp 2023-05-08
    engramdb mem search ./mem "support group" --user-id mel -k 5 [--json]
    engramdb mem get ./mem 12 [--history]
    engramdb mem forget ./mem --threshold 0.05 --action archive [--dry-run]
    engramdb mem export ./mem --out mem.jsonl [--no-vectors]
    engramdb mem import ./other mem.jsonl [--re-embed]

Export format (JSONL): a header line ``{"engramdb_memory_export": 1, "model_id": ...,
"dim": ..., "count": ...}``, then one line per memory (archived ones included) with
every field of :class:`engramdb.MemoryItem` (id, text, metadata, scope, importance,
strength, created/updated/last-access times, access count, archived, links) and, unless
``--no-vectors``, the stored vector. ``import`` restores each memory under its id with
all those fields, so ``export`` of the imported folder gives the same file. Vectors are
reused when the header's model id and dim match the target's embedder (else, or with
``--re-embed``, texts are embedded again). Importing over an existing id replaces it.

``--embedder MODULE:ATTR`` uses another embedder (a callable, or a zero-argument
factory of one, importable as ``MODULE.ATTR``) instead of the bundled default.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Any, Optional

import click
import numpy as np

from .errors import EngramError

EXPORT_VERSION = 1


def _fail(msg: str) -> None:
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(1)


def _load_embedder(spec: Optional[str]) -> Any:
    if not spec:
        return None
    if ":" not in spec:
        raise click.BadParameter("expected MODULE:ATTR", param_hint="--embedder")
    mod, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise click.BadParameter(f"cannot import {spec}: {e}", param_hint="--embedder") from None
    if isinstance(obj, type):
        obj = obj()
    return obj


def _open(path: str, embedder: Optional[str], read_only: bool = False) -> Any:
    from .memory import Memory

    return Memory(path, embedder=_load_embedder(embedder), read_only=read_only)


def _json_arg(value: Optional[str], name: str) -> Any:
    if value is None:
        return None
    try:
        out = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint=name) from None
    if not isinstance(out, dict):
        raise click.BadParameter("must be a JSON object", param_hint=name)
    return out


def _time_arg(value: Optional[str]) -> Any:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value  # ISO 8601, parsed by Memory


scope_options = [
    click.option("--user-id", default=None, help="Scope: user."),
    click.option("--agent-id", default=None, help="Scope: agent."),
    click.option("--session-id", default=None, help="Scope: session."),
]
embedder_option = click.option(
    "--embedder", default=None, metavar="MODULE:ATTR", help="Embedder to use instead of the bundled default."
)


def with_scope(f: Any) -> Any:
    for opt in reversed(scope_options):
        f = opt(f)
    return f


@click.group("mem")
def mem() -> None:
    """Add, search and manage a text memory folder."""


@mem.command("add")
@click.argument("path", type=click.Path(file_okay=False))
@click.argument("texts", nargs=-1)
@with_scope
@click.option("--metadata", default=None, help="JSON object stored with each text.")
@click.option("--importance", type=float, default=None, help="In [0, 1] (default 0.5).")
@click.option("--timestamp", default=None, help="Epoch seconds or ISO 8601 time (default now).")
@click.option("--stdin", "from_stdin", is_flag=True, help="Also read texts from stdin, one per line.")
@click.option("--auto-link", is_flag=True, help="Link each text to its nearest neighbours.")
@embedder_option
def mem_add(
    path: str,
    texts: tuple[str, ...],
    user_id: Optional[str],
    agent_id: Optional[str],
    session_id: Optional[str],
    metadata: Optional[str],
    importance: Optional[float],
    timestamp: Optional[str],
    from_stdin: bool,
    auto_link: bool,
    embedder: Optional[str],
) -> None:
    """Add TEXTS to the memory at PATH (created if needed); prints the new ids."""
    items = list(texts)
    if from_stdin:
        items += [ln.rstrip("\n") for ln in sys.stdin if ln.strip()]
    if not items:
        _fail("nothing to add: give TEXTS or --stdin")
    meta = _json_arg(metadata, "--metadata")
    try:
        with _open(path, embedder) as m:
            ids = m.add(
                items,
                user_id=user_id,
                agent_id=agent_id,
                session_id=session_id,
                metadata=meta,
                importance=importance,
                timestamp=_time_arg(timestamp),
                auto_link=auto_link,
            )
    except (EngramError, ValueError, TypeError) as e:
        _fail(str(e))
        return
    for i in ids:
        click.echo(i)


@mem.command("search")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("query")
@click.option("-k", "k", type=int, default=5, show_default=True)
@with_scope
@click.option("--filters", default=None, help="Metadata filter as JSON.")
@click.option(
    "--mode", type=click.Choice(["hybrid", "vector", "keyword"]), default="hybrid", show_default=True
)
@click.option("--fusion", type=click.Choice(["sum", "rrf"]), default="sum", show_default=True)
@click.option("--no-decay", is_flag=True, help="Rank without the forgetting curve.")
@click.option("--expand-links", type=int, default=0, show_default=True)
@click.option("--now", default=None, help="Clock for decay: epoch seconds or ISO 8601.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@embedder_option
def mem_search(
    path: str,
    query: str,
    k: int,
    user_id: Optional[str],
    agent_id: Optional[str],
    session_id: Optional[str],
    filters: Optional[str],
    mode: str,
    fusion: str,
    no_decay: bool,
    expand_links: int,
    now: Optional[str],
    as_json: bool,
    embedder: Optional[str],
) -> None:
    """Search the memory at PATH (read-only; nothing is reinforced)."""
    try:
        with _open(path, embedder, read_only=True) as m:
            hits = m.search(
                query,
                k=k,
                user_id=user_id,
                agent_id=agent_id,
                session_id=session_id,
                filters=_json_arg(filters, "--filters"),
                mode=mode,
                fusion=fusion,
                decay=not no_decay,
                expand_links=expand_links,
                now=_time_arg(now),
            )
    except (EngramError, ValueError, TypeError) as e:
        _fail(str(e))
        return
    for h in hits:
        if as_json:
            d = h.to_dict()
            d["similarity"] = None if d["similarity"] != d["similarity"] else d["similarity"]
            click.echo(json.dumps(d, ensure_ascii=False))
        else:
            mark = "+" if h.expanded else " "
            click.echo(f"{h.id:>8} {h.score:7.3f}{mark} {h.text}")


@mem.command("get")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("ids", nargs=-1, type=int, required=True)
@click.option("--history", is_flag=True, help="Print the events of each id instead.")
@embedder_option
def mem_get(path: str, ids: tuple[int, ...], history: bool, embedder: Optional[str]) -> None:
    """Print memories by id as JSON lines (exit 1 on an unknown id)."""
    try:
        with _open(path, embedder, read_only=True) as m:
            for i in ids:
                if history:
                    for e in m.history(i):
                        click.echo(json.dumps(e, ensure_ascii=False))
                else:
                    click.echo(json.dumps(m.get(i).to_dict(), ensure_ascii=False))
    except (EngramError, ValueError) as e:
        _fail(str(e))


@mem.command("forget")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--threshold", type=float, default=0.05, show_default=True)
@click.option("--action", type=click.Choice(["archive", "delete"]), default="archive", show_default=True)
@click.option("--dry-run", is_flag=True, help="Report what would be forgotten; change nothing.")
@click.option("--now", default=None, help="Clock: epoch seconds or ISO 8601 (default now).")
@with_scope
@embedder_option
def mem_forget(
    path: str,
    threshold: float,
    action: str,
    dry_run: bool,
    now: Optional[str],
    user_id: Optional[str],
    agent_id: Optional[str],
    session_id: Optional[str],
    embedder: Optional[str],
) -> None:
    """Archive or delete memories whose retention fell below THRESHOLD; prints the report."""
    try:
        with _open(path, embedder) as m:
            rep = m.forget(
                threshold,
                now=_time_arg(now),
                action=action,
                dry_run=dry_run,
                user_id=user_id,
                agent_id=agent_id,
                session_id=session_id,
            )
    except (EngramError, ValueError) as e:
        _fail(str(e))
        return
    click.echo(json.dumps(rep, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


@mem.command("export")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", default="-", help="Output file (default stdout).")
@click.option("--no-vectors", is_flag=True, help="Leave vectors out (import re-embeds).")
@embedder_option
def mem_export(path: str, out: str, no_vectors: bool, embedder: Optional[str]) -> None:
    """Write every memory at PATH (archived included) as JSONL."""
    try:
        with _open(path, embedder, read_only=True) as m:
            items = m.export_items()
            header = {
                "engramdb_memory_export": EXPORT_VERSION,
                "model_id": m._config["embedder"]["model_id"],
                "dim": m.dim,
                "count": len(items),
            }
            lines = [json.dumps(header)]
            for it in items:
                d = it.to_dict()
                if not no_vectors:
                    d["vector"] = [float(x) for x in m.vector(it.id)]
                lines.append(json.dumps(d, ensure_ascii=False))
    except (EngramError, ValueError) as e:
        _fail(str(e))
        return
    data = "\n".join(lines) + "\n"
    if out == "-":
        click.echo(data, nl=False)
    else:
        with open(out, "w", encoding="utf-8") as f:
            f.write(data)
        click.echo(f"exported {len(items)} memories to {out}", err=True)


@mem.command("import")
@click.argument("path", type=click.Path(file_okay=False))
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--re-embed", is_flag=True, help="Embed texts again even when vectors are present.")
@embedder_option
def mem_import(path: str, file: Any, re_embed: bool, embedder: Optional[str]) -> None:
    """Load a JSONL export into the memory at PATH (created if needed), ids kept."""
    lines = [ln for ln in file if ln.strip()]
    if not lines:
        _fail("empty export file")
    try:
        header = json.loads(lines[0])
    except ValueError as e:
        _fail(f"line 1: not JSON: {e}")
        return
    if not isinstance(header, dict) or "engramdb_memory_export" not in header:
        _fail("line 1 is not an engramdb memory export header")
    if int(header["engramdb_memory_export"]) > EXPORT_VERSION:
        _fail(f"export format {header['engramdb_memory_export']} is newer than this engramdb reads")
    try:
        with _open(path, embedder) as m:
            same_space = header.get("model_id") == m.model_id and int(header.get("dim", -1)) == m.dim
            records: list[dict[str, Any]] = []
            vectors: list[Any] = []
            for n, ln in enumerate(lines[1:], start=2):
                try:
                    d = json.loads(ln)
                except ValueError as e:
                    _fail(f"line {n}: not JSON: {e}")
                    return
                vec = d.pop("vector", None)
                if vec is not None and (re_embed or not same_space):
                    vec = None
                if vec is not None and len(vec) != m.dim:
                    _fail(f"line {n}: vector of dim {len(vec)}, memory has {m.dim}")
                records.append(d)
                vectors.append(None if vec is None else np.asarray(vec, dtype=np.float32))
            m.import_items(records, vectors)
    except (EngramError, ValueError, TypeError) as e:
        _fail(str(e))
        return
    click.echo(f"imported {len(records)} memories into {path}", err=True)
