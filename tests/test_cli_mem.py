"""engramdb mem: add / search / get / forget / export / import from the command line."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner
from test_memory import T0, HashEmbedder

from engramdb.cli_mem import mem
from engramdb.memory import Memory

EMB = ["--embedder", "test_memory:HashEmbedder"]
DAY = 86400.0


@pytest.fixture
def run():
    runner = CliRunner()

    def go(*args: str, input: str | None = None, ok: bool = True):
        res = runner.invoke(mem, list(args), input=input, catch_exceptions=False)
        if ok:
            assert res.exit_code == 0, res.output
        return res

    return go


def test_is_a_click_group_named_mem():
    assert isinstance(mem, click.Group) and mem.name == "mem"
    assert {"add", "search", "get", "forget", "export", "import"} <= set(mem.commands)


def test_add_search_get(run, tmp_path):
    p = str(tmp_path / "m")
    out = run(
        "add",
        p,
        "Caroline joined a support group",
        "Melanie paints sunsets",
        "--user-id",
        "mel",
        "--metadata",
        '{"src": "cli"}',
        "--timestamp",
        "2023-05-08T13:56:00",
        *EMB,
    ).output
    ids = [int(x) for x in out.split()]
    assert len(ids) == 2
    more = run("add", p, "--stdin", "--user-id", "mel", *EMB, input="line one\n\nline two\n").output
    assert len(more.split()) == 2
    res = run("search", p, "support group", "--user-id", "mel", "-k", "2", "--json", *EMB).output
    hits = [json.loads(x) for x in res.splitlines()]
    assert hits[0]["id"] == ids[0] and hits[0]["metadata"] == {"src": "cli"}
    assert run("search", p, "support group", "--user-id", "nobody", *EMB).output == ""
    txt = run("search", p, "support group", "--user-id", "mel", "--mode", "keyword", *EMB).output
    assert "Caroline joined a support group" in txt
    got = json.loads(run("get", p, str(ids[1]), *EMB).output)
    assert got["text"] == "Melanie paints sunsets" and got["user_id"] == "mel"
    hist = run("get", p, str(ids[1]), "--history", *EMB).output
    assert json.loads(hist)["event"] == "ADD"
    bad = run("get", p, "999", *EMB, ok=False)
    assert bad.exit_code == 1 and "error" in bad.output


def test_bad_input_exits_cleanly(run, tmp_path):
    p = str(tmp_path / "m")
    r = run("add", p, "   ", *EMB, ok=False)
    assert r.exit_code == 1 and "empty" in r.output
    r = run("add", p, "x", "--metadata", "[1]", *EMB, ok=False)
    assert r.exit_code != 0
    r = run("add", p, *EMB, ok=False)
    assert r.exit_code == 1 and "nothing to add" in r.output


def test_forget_dry_run_and_archive(run, tmp_path):
    p = str(tmp_path / "m")
    run("add", p, "old memory", "--timestamp", str(T0), *EMB)
    run("add", p, "new memory", "--timestamp", str(T0 + 100 * DAY), *EMB)
    now = str(T0 + 101 * DAY)
    rep = json.loads(run("forget", p, "--now", now, "--dry-run", *EMB).output)
    assert rep["dry_run"] and len(rep["ids"]) == 1
    rep = json.loads(run("forget", p, "--now", now, *EMB).output)
    assert len(rep["ids"]) == 1
    with Memory(p, embedder=HashEmbedder()) as m:
        assert [x.text for x in m.get_all()] == ["new memory"]
        assert [x.text for x in m.get_all(include_archived=True)] == ["old memory", "new memory"]


@pytest.mark.parametrize("vectors", [True, False])
def test_export_import_round_trips_exactly(run, tmp_path, vectors):
    src = tmp_path / "src"
    with Memory(src, embedder=HashEmbedder()) as m:
        a = m.add(
            "Caroline joined a support group",
            user_id="u",
            agent_id="ag",
            metadata={"n": 1, "t": ["x"]},
            importance=0.8,
            timestamp=T0,
        )
        b = m.add("Zürich café ☕ notes", user_id="u", session_id="s1", timestamp=T0 + DAY)
        c = m.add("an archived one", user_id="v", timestamp=T0 - 400 * DAY)
        m.link(a, b, kind="related", weight=0.7)
        m.search("support group", user_id="u", reinforce=True, now=T0 + 2 * DAY)
        m.forget(0.05, now=T0 + 3 * DAY, user_id="v")
        m.update(b, metadata={"edited": True})
        assert m.get(c).archived
    opts = [] if vectors else ["--no-vectors"]
    first = run("export", str(src), *opts, *EMB).output
    lines = first.splitlines()
    assert json.loads(lines[0])["count"] == 3 and len(lines) == 4
    f = tmp_path / "dump.jsonl"
    f.write_text(first, encoding="utf-8")
    dst = tmp_path / "dst"
    run("import", str(dst), str(f), *EMB)
    second = run("export", str(dst), *opts, *EMB).output
    assert second == first
    with Memory(dst, embedder=HashEmbedder()) as m:
        assert m.get(c).archived and m.search("archived", mode="keyword") == []
        assert (b, "related", pytest.approx(0.7)) in [tuple(x) for x in m.links(a)]
        assert m.search("support group", user_id="u", k=1)[0].id == a
        assert m.history(a)[-1]["event"] == "IMPORT"


def test_import_rejects_garbage(run, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"not": "a header"}\n', encoding="utf-8")
    r = run("import", str(tmp_path / "d"), str(f), *EMB, ok=False)
    assert r.exit_code == 1 and "header" in r.output
    f.write_text(
        '{"engramdb_memory_export": 1, "model_id": "test-hash", "dim": 64}\n{broken\n', encoding="utf-8"
    )
    r = run("import", str(tmp_path / "d"), str(f), *EMB, ok=False)
    assert r.exit_code == 1 and "line 2" in r.output
