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

import functools
import math
import re
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Callable, Optional

import numpy as np

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


@functools.lru_cache(maxsize=1 << 18)
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
    """Okapi BM25 over documents keyed by integer id. Thread-safe.

    Each document gets a row; per-row arrays hold its length, scope codes and archived
    flag, and each term's postings (row -> term frequency) are turned into numpy arrays
    the first time a query needs them after a change, so a query is scored with a few
    vector operations per term.
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75, tokenizer: Callable[[str], list[str]] = tokenize):
        self.k1 = float(k1)
        self.b = float(b)
        self.tokenizer = tokenizer
        self._lock = threading.RLock()
        self._postings: dict[str, dict[int, int]] = {}  # term -> {row: tf}
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._terms: dict[int, tuple[str, ...]] = {}  # row -> its distinct terms (for removal)
        self._row: dict[int, int] = {}  # doc -> row
        self._free: list[int] = []
        cap = 1024
        self._doc = np.full(cap, -1, dtype=np.int64)
        self._len = np.zeros(cap, dtype=np.float64)
        self._arch = np.zeros(cap, dtype=bool)
        self._codes = np.zeros((3, cap), dtype=np.int64)  # user, agent, session; 0 = None
        self._code_of: list[dict[str, int]] = [{}, {}, {}]
        self._total_len = 0.0
        self._next_row = 0

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, doc: object) -> bool:
        return doc in self._row

    def ids(self) -> set[int]:
        with self._lock:
            return set(self._row)

    def _grow(self) -> None:
        cap = len(self._doc) * 2
        self._doc = np.concatenate([self._doc, np.full(cap - len(self._doc), -1, dtype=np.int64)])
        self._len = np.concatenate([self._len, np.zeros(cap - len(self._len))])
        self._arch = np.concatenate([self._arch, np.zeros(cap - len(self._arch), dtype=bool)])
        self._codes = np.concatenate(
            [self._codes, np.zeros((3, cap - self._codes.shape[1]), dtype=np.int64)], axis=1
        )

    def _code(self, field: int, value: Optional[str], create: bool) -> Optional[int]:
        if value is None:
            return 0
        table = self._code_of[field]
        c = table.get(value)
        if c is None and create:
            c = table[value] = len(table) + 1
        return c

    def add(
        self,
        doc: int,
        text: Optional[str],
        scope: Scope = (None, None, None),
        archived: bool = False,
    ) -> None:
        """Index ``text`` under ``doc`` (replacing what ``doc`` held)."""
        tf = Counter(self.tokenizer(text or ""))
        doc = int(doc)
        with self._lock:
            if doc in self._row:
                self._remove(doc)
            if self._free:
                row = self._free.pop()
            else:
                row = self._next_row
                self._next_row += 1
                if row >= len(self._doc):
                    self._grow()
            for t, c in tf.items():
                p = self._postings.get(t)
                if p is None:
                    self._postings[t] = {row: c}
                else:
                    p[row] = c
                self._cache.pop(t, None)
            n = float(sum(tf.values()))
            self._row[doc] = row
            self._terms[row] = tuple(tf)
            self._doc[row] = doc
            self._len[row] = n
            self._total_len += n
            self._arch[row] = bool(archived)
            for f in range(3):
                self._codes[f, row] = self._code(f, scope[f], True)

    def add_many(self, docs: Iterable[tuple[int, Optional[str], Scope, bool]]) -> None:
        """Index many documents at once (what a rebuild on open uses): the same result as
        calling :meth:`add` for each, with the per-row arrays filled in one go."""
        rows: list[int] = []
        lens: list[float] = []
        arch: list[bool] = []
        codes: list[tuple[int, int, int]] = []
        with self._lock:
            postings = self._postings
            for doc, text, scope, archived in docs:
                doc = int(doc)
                if doc in self._row:
                    self._remove(doc)
                tf = Counter(self.tokenizer(text or ""))
                if self._free:
                    row = self._free.pop()
                else:
                    row = self._next_row
                    self._next_row += 1
                    while row >= len(self._doc):
                        self._grow()
                for t, c in tf.items():
                    p = postings.get(t)
                    if p is None:
                        postings[t] = {row: c}
                    else:
                        p[row] = c
                n = float(sum(tf.values()))
                self._row[doc] = row
                self._terms[row] = tuple(tf)
                self._doc[row] = doc
                self._total_len += n
                rows.append(row)
                lens.append(n)
                arch.append(bool(archived))
                codes.append(tuple(self._code(f, scope[f], True) for f in range(3)))  # type: ignore[misc]
            if rows:
                r = np.asarray(rows, dtype=np.int64)
                self._len[r] = lens
                self._arch[r] = arch
                self._codes[:, r] = np.asarray(codes, dtype=np.int64).T
            self._cache.clear()

    def remove(self, doc: int) -> bool:
        """Forget ``doc``; returns whether it was indexed."""
        with self._lock:
            if doc not in self._row:
                return False
            self._remove(int(doc))
            return True

    def _remove(self, doc: int) -> None:
        row = self._row.pop(doc)
        for t in self._terms.pop(row, ()):
            p = self._postings.get(t)
            if p is not None:
                p.pop(row, None)
                if not p:
                    del self._postings[t]
            self._cache.pop(t, None)
        self._total_len -= self._len[row]
        self._len[row] = 0.0
        self._doc[row] = -1
        self._arch[row] = False
        self._codes[:, row] = 0
        self._free.append(row)

    def set_archived(self, doc: int, archived: bool = True) -> None:
        with self._lock:
            row = self._row.get(doc)
            if row is not None:
                self._arch[row] = bool(archived)

    def clear(self) -> None:
        with self._lock:
            self.__init__(self.k1, self.b, self.tokenizer)  # type: ignore[misc]

    def idf(self, term: str) -> float:
        n = len(self._row)
        df = len(self._postings.get(term, ()))
        return math.log(1.0 + (n - df + 0.5) / (df + 0.5))

    def _arrays(self, term: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
        a = self._cache.get(term)
        if a is None:
            p = self._postings.get(term)
            if not p:
                return None
            rows = np.fromiter(p.keys(), dtype=np.int64, count=len(p))
            tfs = np.fromiter(p.values(), dtype=np.float64, count=len(p))
            a = self._cache[term] = (rows, tfs)
        return a

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
            n = len(self._row)
            if n == 0:
                return []
            avg = self._total_len / n if self._total_len > 0 else 1.0
            k1, b = self.k1, self.b
            scores = np.zeros(self._next_row, dtype=np.float64)
            for t, qtf in terms.items():
                a = self._arrays(t)
                if a is None:
                    continue
                rows, tfs = a
                w = qtf * math.log(1.0 + (n - len(rows) + 0.5) / (len(rows) + 0.5))
                norm = k1 * (1.0 - b + b * self._len[rows] / avg)
                scores[rows] += w * tfs * (k1 + 1.0) / (tfs + norm)
            mask = scores > 0
            for f, want in enumerate((user_id, agent_id, session_id)):
                if want is not None:
                    code = self._code(f, want, False)
                    if code is None:
                        return []
                    mask &= self._codes[f, : self._next_row] == code
            if not include_archived:
                mask &= ~self._arch[: self._next_row]
            rows = np.flatnonzero(mask)
            docs = self._doc[rows]
        sc = scores[rows]
        if accept is None and len(rows) > k:
            part = np.argpartition(-sc, k - 1)[:k]
            # keep ties with the k-th score so the id tie-break is exact
            kth = sc[part].min()
            part = np.flatnonzero(sc >= kth)
            sc, docs = sc[part], docs[part]
        order = np.lexsort((docs, -sc))
        out: list[tuple[int, float]] = []
        for j in order:
            d = int(docs[j])
            if accept is not None and not accept(d):
                continue
            out.append((d, float(sc[j])))
            if len(out) >= k:
                break
        return out
