"""A small in-memory BM25 keyword index, kept beside a :class:`~engramdb.Store`.

:class:`BM25Index` holds an inverted index (term -> {doc id: term frequency}),
each document's length and its scope (user, agent, session) and archived flag, so
a keyword search honours the same hard scope partition as the vector search.
It is not persisted: :class:`~engramdb.Memory` rebuilds it from the store's
texts when it opens (about 1-2 s per 100k short texts on one core) and keeps it
in step with every add, update and delete.

Scoring is Okapi BM25 (Robertson and Zaragoza 2009) with ``k1 = 1.2`` and
``b = 0.75`` and the non-negative idf ``log(1 + (N - df + 0.5) / (df + 0.5))``
(as in Lucene), so every matching term adds a positive amount. ``N`` and the
average length are over the whole index, not the scope being searched: scores
of one document do not depend on who asks.

Tokens (:func:`tokenize`): Unicode word characters, lower-cased, with a short
English stop-word list removed and a light suffix stripping (possessive ``'s``,
plural ``s``/``es``/``ies``, ``ing``, ``ed``) so "joined" matches "join" and
"groups" matches "group". Non-Latin scripts pass through unchanged.
"""

from __future__ import annotations

import heapq
import math
import re
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Callable, Optional

__all__ = ["BM25Index", "tokenize", "STOPWORDS"]

_WORD = re.compile(r"\w+", re.UNICODE)

#: Words too common to carry meaning in a keyword match.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own s same she should so some such t than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)

Scope = tuple[Optional[str], Optional[str], Optional[str]]


def _stem(w: str) -> str:
    if len(w) <= 3 or not w.isascii():
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("sses"):
        return w[:-2]
    if w.endswith("ing") and len(w) > 5:
        w = w[:-3]
        return w[:-1] if len(w) > 2 and w[-1] == w[-2] and w[-1] not in "lsz" else w
    if w.endswith("ed") and len(w) > 4:
        w = w[:-2]
        return w[:-1] if len(w) > 2 and w[-1] == w[-2] and w[-1] not in "lsz" else w
    if w.endswith("es") and len(w) > 4 and w[-3] in "sxz":
        return w[:-2]
    if w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def tokenize(text: str) -> list[str]:
    """Split ``text`` into index terms (see the module docstring)."""
    out = []
    for w in _WORD.findall(text.lower().replace("'s ", " ").replace("\u2019s ", " ")):
        if w in STOPWORDS or w == "_":
            continue
        out.append(_stem(w))
    return out


class BM25Index:
    """Okapi BM25 over documents keyed by integer id. Thread-safe."""

    def __init__(self, k1: float = 1.2, b: float = 0.75, tokenizer: Callable[[str], list[str]] = tokenize):
        self.k1 = float(k1)
        self.b = float(b)
        self.tokenizer = tokenizer
        self._postings: dict[str, dict[int, int]] = {}
        self._terms: dict[int, tuple[str, ...]] = {}  # doc -> its distinct terms (for removal)
        self._len: dict[int, int] = {}
        self._scope: dict[int, Scope] = {}
        self._archived: set[int] = set()
        self._total_len = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._len)

    def __contains__(self, doc: object) -> bool:
        return doc in self._len

    def ids(self) -> set[int]:
        with self._lock:
            return set(self._len)

    def add(
        self,
        doc: int,
        text: Optional[str],
        scope: Scope = (None, None, None),
        archived: bool = False,
    ) -> None:
        """Index ``text`` under ``doc`` (replacing what ``doc`` held)."""
        tf = Counter(self.tokenizer(text or ""))
        with self._lock:
            if doc in self._len:
                self._remove(doc)
            for t, c in tf.items():
                p = self._postings.get(t)
                if p is None:
                    self._postings[t] = {doc: c}
                else:
                    p[doc] = c
            n = sum(tf.values())
            self._terms[doc] = tuple(tf)
            self._len[doc] = n
            self._total_len += n
            self._scope[doc] = scope
            if archived:
                self._archived.add(doc)

    def add_many(self, docs: Iterable[tuple[int, Optional[str], Scope, bool]]) -> None:
        for doc, text, scope, archived in docs:
            self.add(doc, text, scope, archived)

    def remove(self, doc: int) -> bool:
        """Forget ``doc``; returns whether it was indexed."""
        with self._lock:
            if doc not in self._len:
                return False
            self._remove(doc)
            return True

    def _remove(self, doc: int) -> None:
        for t in self._terms.pop(doc, ()):
            p = self._postings.get(t)
            if p is not None:
                p.pop(doc, None)
                if not p:
                    del self._postings[t]
        self._total_len -= self._len.pop(doc)
        self._scope.pop(doc, None)
        self._archived.discard(doc)

    def set_archived(self, doc: int, archived: bool = True) -> None:
        with self._lock:
            if doc not in self._len:
                return
            if archived:
                self._archived.add(doc)
            else:
                self._archived.discard(doc)

    def clear(self) -> None:
        with self._lock:
            self.__init__(self.k1, self.b, self.tokenizer)  # type: ignore[misc]

    def idf(self, term: str) -> float:
        n = len(self._len)
        df = len(self._postings.get(term, ()))
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def search(
        self,
        query: str,
        k: int = 10,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        include_archived: bool = False,
        accept: Optional[Callable[[int], bool]] = None,
    ) -> list[tuple[int, float]]:
        """The ``k`` best ``(doc, score)`` pairs, best first (ties by id).

        Scope arguments that are given must equal the document's; ``accept``
        is an extra predicate (a metadata filter), evaluated lazily in score
        order so it runs on as few documents as possible. Documents that share
        no term with the query are never returned.
        """
        terms = Counter(self.tokenizer(query))
        if not terms or k < 1:
            return []
        with self._lock:
            n = len(self._len)
            if n == 0:
                return []
            avg = self._total_len / n if self._total_len else 1.0
            k1, b = self.k1, self.b
            scores: dict[int, float] = {}
            for t, qtf in terms.items():
                p = self._postings.get(t)
                if not p:
                    continue
                df = len(p)
                w = qtf * math.log(1.0 + (n - df + 0.5) / (df + 0.5))
                lens = self._len
                get = scores.get
                for d, tf in p.items():
                    norm = k1 * (1.0 - b + b * lens[d] / avg)
                    scores[d] = get(d, 0.0) + w * tf * (k1 + 1.0) / (tf + norm)
            want = (user_id, agent_id, session_id)
            scoped = want != (None, None, None)
            scope = self._scope
            archived = self._archived
        key = lambda kv: (-kv[1], kv[0])  # noqa: E731
        # most searches need only the head of the ranking: take it with a heap and
        # fall back to a full sort only when scope or filters reject too many
        head = max(64, 8 * k)
        args = (k, want, scoped, scope, archived, include_archived, accept)
        if len(scores) > 4 * head:
            out = self._take(heapq.nsmallest(head, scores.items(), key=key), *args)
            if len(out) >= k:
                return out
        return self._take(sorted(scores.items(), key=key), *args)

    @staticmethod
    def _take(ranked, k, want, scoped, scope, archived, include_archived, accept):  # type: ignore[no-untyped-def]
        out: list[tuple[int, float]] = []
        for d, s in ranked:
            if scoped:
                sc = scope.get(d)
                if sc is None or any(w is not None and w != h for w, h in zip(want, sc)):
                    continue
            if not include_archived and d in archived:
                continue
            if accept is not None and not accept(d):
                continue
            out.append((d, s))
            if len(out) >= k:
                break
        return out
