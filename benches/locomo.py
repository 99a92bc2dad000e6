"""LoCoMo evidence recall of ``engramdb.Memory.search`` (retrieval only, no LLM).

    python benches/locomo.py ../shared/data/locomo-dev/conv-26.json [--json out.json]

Accepts any file in the LoCoMo format (a JSON list of conversations, as in
snap-research/locomo ``locomo10.json``). For each conversation:

* every dialogue turn becomes one memory, text ``"<speaker>: <text>"`` (plus
  ``" [shares an image: <blip_caption>]"`` when the turn shares an image), its
  session's date as the timestamp, ``dia_id`` / ``session`` / ``speaker`` in the
  metadata, and the conversation's ``sample_id`` as ``user_id`` (a hard scope, so
  conversations never see each other's turns);
* turns are added one session at a time, with ``auto_link=True`` (A-MEM style
  "similar" links to up to 5 neighbours above cosine 0.75) when the store supports
  links, and each turn is also linked to the next turn of its session ("next");
* each question with evidence is answered by one ``search(question, k=25)``; the
  score of a question at k is the fraction of its evidence ``dia_id``s among the
  first k hits (evidence recall@k), averaged overall and per category.

Configurations (all ``reinforce=False`` so questions don't change each other's
ranking; "now" for decay is one day after the conversation's last session):

=================  =====================================================================
vector             ``mode="vector", decay=False``
bm25               ``mode="keyword", decay=False``
hybrid             ``mode="hybrid", fusion="sum", decay=False`` (the default fusion)
hybrid-rrf         ``mode="hybrid", fusion="rrf", decay=False``
hybrid+links       hybrid with ``expand_links=1`` over all link kinds ("similar" and "next")
hybrid+simlinks    hybrid with ``expand_links=1`` over the "similar" links only
hybrid+decay       hybrid with ``decay=True`` (forgetting curve on the story's clock)
=================  =====================================================================
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    "vector": dict(mode="vector", decay=False),
    "bm25": dict(mode="keyword", decay=False),
    "hybrid": dict(mode="hybrid", fusion="sum", decay=False),
    "hybrid-rrf": dict(mode="hybrid", fusion="rrf", decay=False),
    "hybrid+links": dict(mode="hybrid", fusion="sum", decay=False, expand_links=1),
    "hybrid+simlinks": dict(mode="hybrid", fusion="sum", decay=False, expand_links=1, link_kinds={"similar"}),
    "hybrid+decay": dict(mode="hybrid", fusion="sum", decay=True),
}
KS = (5, 10, 25)


def parse_date(s: str) -> float:
    """'1:56 pm on 8 May, 2023' -> epoch seconds (UTC)."""
    s = re.sub(r"\s+", " ", s.strip())
    for fmt in ("%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y", "%I:%M %p on %B %d, %Y"):
        try:
            return dt.datetime.strptime(s, fmt).replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            pass
    raise ValueError(f"unparsed session date {s!r}")


def sessions(conv: dict[str, Any]) -> list[tuple[int, list[dict[str, Any]], float]]:
    keys = sorted((k for k in conv if re.fullmatch(r"session_\d+", k)), key=lambda k: int(k[8:]))
    out = []
    for k in keys:
        turns = conv[k]
        if not turns:
            continue
        out.append((int(k[8:]), turns, parse_date(conv[f"{k}_date_time"])))
    return out


def evidence(q: dict[str, Any]) -> set[str]:
    return {e.strip() for x in q.get("evidence", []) for e in str(x).split(";") if e.strip()}


def turn_text(t: dict[str, Any]) -> str:
    text = f"{t['speaker']}: {t.get('text', '')}"
    if t.get("blip_caption"):
        text += f" [shares an image: {t['blip_caption']}]"
    return text


def run(path: str, configs: list[str], folder: str, embedder: Any = None) -> dict[str, Any]:
    from engramdb.memory import Memory

    data = json.load(open(path, encoding="utf-8"))
    if isinstance(data, dict):
        data = [data]
    mem = Memory(folder, embedder=embedder)
    can_link = hasattr(mem.store, "link")
    # sums[config][category][k] = (sum of recall, count)
    sums: dict[str, dict[Any, dict[int, list[float]]]] = {
        c: defaultdict(lambda: {k: [0.0, 0] for k in KS}) for c in configs
    }
    ingest_s = 0.0
    n_turns = 0
    search_s = {c: 0.0 for c in configs}
    n_q = 0
    for ci, conv_obj in enumerate(data):
        conv = conv_obj["conversation"]
        user = str(conv_obj.get("sample_id", f"conv-{ci}"))
        t0 = time.perf_counter()
        dia_to_id: dict[str, int] = {}
        last = 0.0
        for snum, turns, when in sessions(conv):
            texts = [turn_text(t) for t in turns]
            metas = [{"dia_id": t["dia_id"], "session": snum, "speaker": t["speaker"]} for t in turns]
            extra = dict(auto_link=True) if can_link else {}
            ids = mem.add(texts, user_id=user, metadata=metas, timestamp=when, **extra)
            for t, i in zip(turns, ids):
                dia_to_id[t["dia_id"]] = i
            if can_link:
                for a, b in zip(ids, ids[1:]):
                    mem.link(a, b, kind="next", weight=1.0)
            last = max(last, when)
            n_turns += len(turns)
        ingest_s += time.perf_counter() - t0
        now = last + 86400.0
        for q in conv_obj.get("qa", []):
            ev = evidence(q)
            if not ev:
                continue
            n_q += 1
            cat = q.get("category")
            for c in configs:
                kw = dict(CONFIGS[c])
                if kw.get("expand_links") and not can_link:
                    continue
                t1 = time.perf_counter()
                hits = mem.search(q["question"], k=max(KS), user_id=user, now=now, reinforce=False, **kw)
                search_s[c] += time.perf_counter() - t1
                got = [h.metadata.get("dia_id") for h in hits]
                for k in KS:
                    r = len(ev & set(got[:k])) / len(ev)
                    for key in ("all", cat):
                        s = sums[c][key][k]
                        s[0] += r
                        s[1] += 1
    mem.close()
    result: dict[str, Any] = {
        "file": path,
        "conversations": len(data),
        "turns": n_turns,
        "questions": n_q,
        "ingest_s": round(ingest_s, 2),
        "links": can_link,
        "configs": {},
    }
    for c in configs:
        if not sums[c]:
            continue
        result["configs"][c] = {
            "search_ms_per_query": round(1000 * search_s[c] / max(n_q, 1), 2),
            "recall": {
                str(cat): {f"@{k}": round(v[0] / v[1], 4) for k, v in per_k.items()} | {"n": per_k[KS[0]][1]}
                for cat, per_k in sorted(sums[c].items(), key=lambda kv: (kv[0] != "all", str(kv[0])))
            },
        }
    return result


def to_markdown(res: dict[str, Any]) -> str:
    lines = [
        f"{res['conversations']} conversation(s), {res['turns']} turns, {res['questions']} questions with evidence; "
        f"ingest {res['ingest_s']} s",
        "",
    ]
    cats = sorted(
        {cat for c in res["configs"].values() for cat in c["recall"]}, key=lambda x: (x != "all", x)
    )
    head = "| config | " + " | ".join(f"{cat} @5/@10/@25" for cat in cats) + " | ms/query |"
    lines += [head, "|" + "---|" * (len(cats) + 2)]
    for name, c in res["configs"].items():
        cells = []
        for cat in cats:
            r = c["recall"].get(cat)
            cells.append("-" if r is None else f"{r['@5']:.3f} / {r['@10']:.3f} / {r['@25']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {c['search_ms_per_query']} |")
    ns = next(iter(res["configs"].values()))["recall"] if res["configs"] else {}
    lines += [
        "",
        "questions per category: " + ", ".join(f"{cat}: {ns[cat]['n']}" for cat in cats if cat in ns),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a LoCoMo-format JSON file (a list of conversations)")
    ap.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS)
    )
    ap.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    ap.add_argument("--folder", help="memory folder to build (default: a temporary one)")
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}")
    folder = args.folder or tempfile.mkdtemp(prefix="locomo-mem-")
    t0 = time.perf_counter()
    res = run(args.path, configs, folder)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["machine"] = f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}"
    print(to_markdown(res))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
