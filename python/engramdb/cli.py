"""The ``engramdb`` command line.

``engramdb demo`` builds a small memory store from built-in texts and
searches it; ``engramdb store info|verify PATH`` inspect a store;
``engramdb index ...`` builds and queries on-disk SPANN indexes
(``cli_index.py``); ``engramdb mem ...`` works on text memories
(``cli_mem.py``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from typing import Any

import click

from . import __version__
from .errors import EngramError


def _fail(msg: str) -> None:
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="engramdb")
def main() -> None:
    """engramdb: an embedded memory store for LLM agents."""


@main.group()
def store() -> None:
    """Inspect and check stores."""


def _print_info(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for k, v in info.items():
        click.echo(f"{k:<{width}}  {v}")


@store.command("info")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def store_info(path: str, as_json: bool) -> None:
    """Size, files and format of the store at PATH (opened read-only)."""
    from .store import Store

    try:
        with Store(path, read_only=True) as s:
            _print_info(s.info(), as_json)
    except EngramError as e:
        _fail(str(e))


@store.command("verify")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def store_verify(path: str, as_json: bool) -> None:
    """Check every checksum of the store at PATH; exit 1 on damage."""
    from .store import verify

    try:
        info = verify(path)
    except EngramError as e:
        _fail(f"verification failed: {e}")
        return
    if as_json:
        click.echo(json.dumps({"ok": True, **info}, indent=2))
    else:
        click.secho(
            f"ok: {info['count']} records, segment {info['segment_bytes']} B, "
            f"log {info['wal_frames']} frames ({info['wal_bytes']} B)"
            + (f", {info['torn_bytes']} B torn tail to be cut on next write" if info["torn_bytes"] else ""),
            fg="green",
        )


DEMO_MEMORIES = [
    ("Caroline joined an LGBTQ support group on 7 May.", "caroline"),
    ("Caroline is researching adoption agencies because she wants to build a family.", "caroline"),
    ("Caroline gave a talk at a school about her transition journey.", "caroline"),
    ("Melanie signed up for a pottery class and made a bowl for her kids.", "melanie"),
    ("Melanie ran a charity race to raise awareness for mental health.", "melanie"),
    ("Melanie took her family camping in the mountains last summer.", "melanie"),
    ("The user prefers vegetarian recipes and dislikes mushrooms.", "user"),
    ("The user's sister lives in Lisbon and works as a nurse.", "user"),
    ("The user is learning Rust and finds the borrow checker confusing at first.", "user"),
    ("The user's flight to Tokyo leaves on the 14th at 9:40 in the morning.", "user"),
    ("The user has a golden retriever named Biscuit who loves the beach.", "user"),
    ("The user runs 10 km every Sunday and is training for a half marathon.", "user"),
    ("The user's favourite book is a novel about a lighthouse keeper.", "user"),
    ("The user asked to be reminded to renew the passport before March.", "user"),
    ("The user is allergic to penicillin.", "user"),
    ("The user switched jobs and now works on database internals.", "user"),
]

DEMO_QUERIES = [
    "What pet does the user have?",
    "When did Caroline join the support group?",
    "Is the user allergic to any medicine?",
    "What hobbies does Melanie have?",
]


@main.command()
@click.option("--path", type=click.Path(file_okay=False), default=None, help="Where to build the store (default: a temporary folder).")
@click.option("-k", default=3, show_default=True, help="Results per query.")
def demo(path: str | None, k: int) -> None:
    """Build a store from built-in memories with the bundled embedder, then search it."""
    import time

    from .embedders import default_embedder
    from .store import Store

    embed = default_embedder()
    texts = [t for t, _ in DEMO_MEMORIES]
    t0 = time.perf_counter()
    vectors = embed(texts)
    t_embed = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        where = path or tmp
        with Store(where, dim=vectors.shape[1], metric="cosine") as s:
            ids = s.add(
                vectors,
                texts=texts,
                metadata=[{"about": who} for _, who in DEMO_MEMORIES],
            )
            click.secho(
                f"engramdb {__version__}: stored {len(ids)} memories in {where} "
                f"(embedded in {t_embed * 1000:.0f} ms by {embed!r})",
                bold=True,
            )
            for q in DEMO_QUERIES:
                hits, scores = s.search(embed([q])[0], k=k)
                click.secho(f"\n? {q}", fg="cyan")
                for rank, (i, sc) in enumerate(zip(hits, scores), 1):
                    click.echo(f"  {rank}. [{sc:.3f}] {s.get(int(i)).text}")
            about = s.search(embed(["what does the user do for exercise?"])[0], k=2, filter={"about": "melanie"})
            click.secho("\n? exercise, restricted to metadata about=melanie", fg="cyan")
            for i, sc in zip(*about):
                click.echo(f"  [{sc:.3f}] {s.get(int(i)).text}")


def _mount() -> None:
    from .cli_index import index
    from .cli_mem import mem

    main.add_command(index)
    main.add_command(mem)


_mount()

if __name__ == "__main__":  # pragma: no cover
    main()
