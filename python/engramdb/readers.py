"""LLM-side readers: turn a :class:`~engramdb.Memory` into model input.

:class:`ContextReader` (``mem.reader().context(query, budget_tokens=800, user_id=...)``)
retrieves, ranks by the three-part score of Generative Agents (relevance,
retention, importance: :meth:`engramdb.Memory.search`), expands by 1-hop links, drops
near-duplicates, and packs the best memories into a token budget, each line tagged with
the id to cite::

    Relevant memories (cite as [id]):
    [12] (2023-05-08) Caroline: I went to a LGBTQ support group yesterday
    [40] (2023-06-27) Melanie: We took the kids camping last weekend

It returns a :class:`Context`: a ``str`` (the text above) that also carries ``.ids``
(the ids packed, in order), ``.hits`` and ``.tokens``.

:class:`SummaryReader` keeps a rolling summary per scope (the "compact memory" of
HEMA, a hippocampus-inspired extended memory architecture, 2025) through an LLM
callable ``llm(prompt: str) -> str`` that *you* provide, beside the vector memory,
and prepends it to the retrieved memories.

Token counting is pluggable: ``token_counter`` is a callable ``str -> int``, or an
object with ``encode(str)`` (a tiktoken ``Encoding``, a Hugging Face tokenizer), whose
result's length is used. The default, :func:`approx_tokens`, is
``ceil(len(text) / 4)``: about 4 characters per token, the usual rule for English
with GPT-style BPE vocabularies; it over-counts code-heavy text slightly and
under-counts CJK text (pass a real tokenizer for those).

Readers never reach a network by themselves: the only outside call is the ``llm``
callable you pass to :class:`SummaryReader`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import threading
from typing import Any, Callable, Optional, Union

import numpy as np

from .errors import InvalidArgumentError

__all__ = ["Context", "ContextReader", "SummaryReader", "approx_tokens", "as_token_counter"]

TokenCounter = Callable[[str], int]


def approx_tokens(text: str) -> int:
    """The default token count: ``ceil(len(text) / 4)``."""
    return math.ceil(len(text) / 4)


def as_token_counter(counter: Any = None) -> TokenCounter:
    """``None`` -> :func:`approx_tokens`; a callable ``str -> int`` as is; an object
    with ``encode`` -> ``len(counter.encode(text))``."""
    if counter is None:
        return approx_tokens
    enc = getattr(counter, "encode", None)
    if callable(enc) and not isinstance(counter, type):

        def count(text: str) -> int:
            out = enc(text)
            ids = getattr(out, "ids", out)  # tokenizers.Encoding has .ids
            return len(ids)

        return count
    if callable(counter):
        return counter
    raise InvalidArgumentError("token_counter must be a callable str -> int or have an encode() method")


class Context(str):
    """Packed memory text (a ``str``) with ``ids`` (cited, in order), ``hits`` and ``tokens``."""

    ids: list[int]
    hits: list[Any]
    tokens: int

    def __new__(cls, text: str, ids: list[int], hits: list[Any], tokens: int) -> Context:
        self = super().__new__(cls, text)
        self.ids = ids
        self.hits = hits
        self.tokens = tokens
        return self

    @property
    def text(self) -> str:
        return str(self)


def _date(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d")


class ContextReader:
    """Retrieve, rank, expand, dedupe and pack memories into a token budget.

    ``k`` memories are retrieved (``search_kwargs`` go to
    :meth:`engramdb.Memory.search`: ``mode``, ``fusion``, ``weights``, ``decay``...),
    expanded by ``expand_links`` hops; a memory whose vector has cosine >=
    ``dedupe_threshold`` with one already packed (or the same text, case- and
    space-insensitively) is dropped. Lines are packed best first; a line that does not
    fit is skipped and smaller ones after it may still fit. ``show_dates`` prefixes
    each memory's creation date. ``reinforce=True`` counts every packed memory as
    recalled (the forgetting curve restarts for it).
    """

    header = "Relevant memories (cite as [id]):"

    def __init__(
        self,
        memory: Any,
        *,
        k: int = 20,
        expand_links: int = 1,
        dedupe_threshold: float = 0.95,
        token_counter: Any = None,
        show_dates: bool = True,
        reinforce: bool = False,
        header: Optional[str] = None,
        **search_kwargs: Any,
    ) -> None:
        self.memory = memory
        self.k = int(k)
        self.expand_links = int(expand_links)
        self.dedupe_threshold = float(dedupe_threshold)
        self.count = as_token_counter(token_counter)
        self.show_dates = show_dates
        self.reinforce = reinforce
        if header is not None:
            self.header = header
        self.search_kwargs = search_kwargs

    def line(self, hit: Any) -> str:
        text = " ".join(str(hit.text).split())
        if self.show_dates and hit.created_at:
            return f"[{hit.id}] ({_date(hit.created_at)}) {text}"
        return f"[{hit.id}] {text}"

    def retrieve(self, query: str, **scope: Any) -> list[Any]:
        kw = dict(self.search_kwargs)
        kw.update({k: v for k, v in scope.items() if v is not None})
        return self.memory.search(query, k=self.k, expand_links=self.expand_links, **kw)

    def dedupe(self, hits: list[Any]) -> list[Any]:
        kept: list[Any] = []
        vecs: list[np.ndarray] = []
        seen_text: set[str] = set()
        for h in hits:
            norm = " ".join(str(h.text).lower().split())
            if norm in seen_text:
                continue
            v = self.memory.vector(h.id)
            if vecs and float(np.max(np.stack(vecs) @ v)) >= self.dedupe_threshold:
                continue
            seen_text.add(norm)
            vecs.append(v)
            kept.append(h)
        return kept

    def pack(self, hits: list[Any], budget_tokens: int, prefix: str = "") -> Context:
        parts = [prefix] if prefix else []
        used = self.count(prefix) if prefix else 0
        head = self.header
        head_cost = self.count(head + "\n")
        ids: list[int] = []
        packed: list[Any] = []
        lines: list[str] = []
        for h in hits:
            ln = self.line(h)
            cost = self.count(ln + "\n")
            extra = head_cost if not lines else 0
            if used + cost + extra > budget_tokens:
                continue
            used += cost + extra
            lines.append(ln)
            ids.append(h.id)
            packed.append(h)
        while True:  # counters need not be additive: check the whole, drop from the end
            body = [head + "\n" + "\n".join(lines)] if lines else []
            text = "\n\n".join(parts + body)
            tokens = self.count(text) if text else 0
            if tokens <= budget_tokens or not lines:
                break
            lines.pop()
            ids.pop()
            packed.pop()
        return Context(text, ids, packed, tokens)

    def context(
        self,
        query: str,
        budget_tokens: int = 800,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        filters: Optional[dict[str, Any]] = None,
        now: Any = None,
    ) -> Context:
        """Memories for ``query`` packed into at most ``budget_tokens`` tokens (as the
        counter counts them), with ids to cite. An empty scope gives an empty Context."""
        if not isinstance(budget_tokens, int) or isinstance(budget_tokens, bool) or budget_tokens < 1:
            raise InvalidArgumentError(f"budget_tokens must be a positive integer, got {budget_tokens!r}")
        hits = self.retrieve(
            query, user_id=user_id, agent_id=agent_id, session_id=session_id, filters=filters, now=now
        )
        ctx = self.pack(self.dedupe(hits), budget_tokens)
        if self.reinforce and ctx.ids:
            from .memory import to_epoch

            self.memory._reinforce(ctx.ids, to_epoch(now))
        return ctx


SUMMARY_PROMPT = """You maintain a compact running summary of a conversation for an AI assistant's memory.
Keep every durable fact (names, dates, preferences, plans, relationships); drop small talk.
Write at most {max_words} words, plain prose, no preamble.

Current summary:
{summary}

New messages:
{messages}

Updated summary:"""


class SummaryReader:
    """A rolling summary per scope, kept by an LLM callable, beside vector memory.

    ``observe(messages, user_id=...)`` adds the messages to the memory (unless
    ``add=False``) and asks ``llm(prompt) -> str`` for an updated summary of at most
    ``max_summary_tokens`` (a longer answer is cut at that budget). Summaries are
    saved in ``summaries.json`` in the memory folder, one per (user, agent, session).
    ``context(query, budget_tokens=...)`` returns the summary followed by the
    :class:`ContextReader` memories that fit in the rest of the budget.
    """

    FILE = "summaries.json"

    def __init__(
        self,
        memory: Any,
        llm: Callable[[str], str],
        *,
        max_summary_tokens: int = 256,
        token_counter: Any = None,
        prompt: str = SUMMARY_PROMPT,
        **context_kwargs: Any,
    ) -> None:
        if not callable(llm):
            raise InvalidArgumentError("SummaryReader needs llm: a callable prompt -> text")
        self.memory = memory
        self.llm = llm
        self.max_summary_tokens = int(max_summary_tokens)
        self.count = as_token_counter(token_counter)
        self.prompt = prompt
        self.reader = ContextReader(memory, token_counter=self.count, **context_kwargs)
        self._path = os.path.join(os.fspath(memory.path), self.FILE)
        self._lock = threading.Lock()
        self._summaries: dict[str, str] = {}
        if os.path.exists(self._path):
            with open(self._path, encoding="utf-8") as f:
                self._summaries = json.load(f)

    @staticmethod
    def _key(user_id: Optional[str], agent_id: Optional[str], session_id: Optional[str]) -> str:
        return json.dumps([user_id, agent_id, session_id])

    def summary(
        self,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> str:
        return self._summaries.get(self._key(user_id, agent_id, session_id), "")

    def _truncate(self, text: str, budget: int) -> str:
        if self.count(text) <= budget:
            return text
        words = text.split()
        lo, hi = 0, len(words)
        while lo < hi:  # the longest word prefix within budget
            mid = (lo + hi + 1) // 2
            if self.count(" ".join(words[:mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo])

    def observe(
        self,
        messages: Union[str, list[Any]],
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        add: bool = True,
        **add_kwargs: Any,
    ) -> str:
        """Fold ``messages`` (a text or ``{"role", "content"}`` dicts) into the scope's
        summary; returns the new summary. If the LLM call raises, the summary is
        unchanged (and the error propagates)."""
        msgs = [messages] if isinstance(messages, str) else list(messages)
        if add and msgs:
            self.memory.add(msgs, user_id=user_id, agent_id=agent_id, session_id=session_id, **add_kwargs)
        lines = []
        for m in msgs:
            if isinstance(m, dict):
                lines.append(f"{m.get('role', 'user')}: {m.get('content', '')}")
            else:
                lines.append(str(m))
        key = self._key(user_id, agent_id, session_id)
        with self._lock:
            old = self._summaries.get(key, "")
            prompt = self.prompt.format(
                summary=old or "(empty)",
                messages="\n".join(lines),
                max_words=max(10, int(self.max_summary_tokens * 0.75)),
            )
            new = str(self.llm(prompt)).strip()
            new = self._truncate(new, self.max_summary_tokens)
            self._summaries[key] = new
            tmp = self._path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self._summaries, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        return new

    def context(
        self,
        query: str,
        budget_tokens: int = 800,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        filters: Optional[dict[str, Any]] = None,
        now: Any = None,
    ) -> Context:
        """``"Summary so far: ..."`` then the retrieved memories, within ``budget_tokens``."""
        if not isinstance(budget_tokens, int) or isinstance(budget_tokens, bool) or budget_tokens < 1:
            raise InvalidArgumentError(f"budget_tokens must be a positive integer, got {budget_tokens!r}")
        s = self.summary(user_id=user_id, agent_id=agent_id, session_id=session_id)
        prefix = ""
        if s:
            prefix = self._truncate("Summary so far: " + s, budget_tokens)
        hits = self.reader.retrieve(
            query, user_id=user_id, agent_id=agent_id, session_id=session_id, filters=filters, now=now
        )
        return self.reader.pack(self.reader.dedupe(hits), budget_tokens, prefix=prefix)
