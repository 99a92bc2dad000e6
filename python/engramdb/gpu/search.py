"""Brute-force top-k embedding search over an fp16 or int8 ``(n, d)`` matrix for a batch of queries.

Two stages. Stage 1: a Triton kernel computes the scores of a chunk of rows against every query
(fp16 tensor-core dot products; fp32 queries as two fp16 halves; int8 dequantization and the L2
correction fused in) and, per query, the best score of each tile of 128 rows. The chunk's top ``k``
lies in the ``k`` tiles with the highest best scores, so ``torch.topk`` ranks only those tiles' scores.
Stage 2: the candidates of all chunks are ranked by a 64-bit key (monotone score bits, then the
complement of the row id), so equal scores come out in ascending row id order, deterministically, on
every backend. If equal values straddle a cut in stage 1 (the float top-k then kept an arbitrary few
of them) that chunk is ranked again by keys over all its scores. With ``select="fused"`` one Triton
kernel replaces stage 1's torch top-k calls: it reads a threshold off the tile maxima, keeps the rows
that reach it and ranks them by key, thousands of tied rows included, so the search never waits on the
host: the results come back as soon as the GPU has them.

Metrics: ``"ip"`` returns inner products, best first; ``"l2"`` returns squared Euclidean distances,
nearest first (ranked internally by ``2 q.x - |x|^2``). For int8 matrices the rows are
``x_i = scale_i * codes_i`` (symmetric, one float32 scale per row, see :func:`quantize_rows_int8`).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, pick_backend, tl, triton

__all__ = ["search_topk", "search_topk_ref", "quantize_rows_int8", "BruteForceIndex"]

MAX_K = 1024
BASE_DTYPES = (torch.float16, torch.float32, torch.int8)


def quantize_rows_int8(x: torch.Tensor):
    """Symmetric per-row int8: returns ``(codes int8 (n, d), scale float32 (n,))``. ``x``: ``(n, d)``
    without NaN or inf (a ``ValueError`` names the first rows that hold them)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"quantize_rows_int8 takes an (n, d) tensor with d > 0, got {_describe(x)}")
    xf = x.float()
    scale = xf.abs().amax(1) / 127.0
    _check_finite_rows(scale, "rows")  # (a row's largest magnitude is finite only if all its values are)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(xf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _dequant_rows(base, base_scale):
    x = base.double()
    return x * base_scale.double()[:, None] if base_scale is not None else x


def _order_key(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 key: higher score first, then lower id. Monotone in float order (-0.0 folded into +0.0)."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits << 32) | (0xFFFFFFFF - ids)


def search_topk_ref(queries, base, k, metric="ip", base_scale=None):
    """Exact float64 reference with a stable sort: ties in ascending id order."""
    x = _dequant_rows(base, base_scale)
    q = queries.double()
    s = q @ x.T
    if metric == "l2":
        s = 2 * s - (x * x).sum(1)[None, :]
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    best = s.gather(1, order)
    if metric == "l2":
        best = (q * q).sum(1, keepdim=True) - best
    return best, order


if HAS_TRITON:

    @triton.jit
    def _store_tile(acc, XS, XN, OUT, TMAX, rm, rn, mmask, nmask, so_m, st_m, pid_n, HAS_SCALE: tl.constexpr,
                    IS_L2: tl.constexpr):
        """A tile's dot products to scores (row scale, then ``2 q.x - |x|^2`` for L2), stored with each query's
        best score in the tile; rows past the end score -inf (``OUT`` is padded to whole tiles)."""
        if HAS_SCALE:
            acc = acc * tl.load(XS + rn, mask=nmask, other=0.0)[None, :]
        if IS_L2:
            acc = 2.0 * acc - tl.load(XN + rn, mask=nmask, other=0.0)[None, :]
        acc = tl.where(nmask[None, :], acc, float("-inf"))
        tl.store(OUT + rm[:, None] * so_m + rn[None, :], acc, mask=mmask[:, None])
        tl.store(TMAX + rm * st_m + pid_n, tl.max(acc, axis=1), mask=mmask)

    @triton.jit
    def _scores_kernel(
        Q, QL, X, XS, XN, OUT, TMAX, M, N, D,
        sq_m, sx_n, so_m, st_m,
        IS_L2: tl.constexpr, HAS_SCALE: tl.constexpr, SPLIT_Q: tl.constexpr, DOT_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """Scores of BLOCK_N rows against BLOCK_M queries, and each query's best score in the tile.
        SPLIT_Q: fp32 queries come as two fp16 halves (hi + lo) and take two fp16 dots, exact to ~2^-22."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < D
            qmask = mmask[:, None] & kmask[None, :]
            x = tl.load(X + rn[:, None] * sx_n + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            xt = tl.trans(x.to(DOT_DTYPE))
            q = tl.load(Q + rm[:, None] * sq_m + kk[None, :], mask=qmask, other=0.0)
            acc += tl.dot(q.to(DOT_DTYPE), xt, input_precision=PRECISION)
            if SPLIT_Q:
                ql = tl.load(QL + rm[:, None] * sq_m + kk[None, :], mask=qmask, other=0.0)
                acc += tl.dot(ql, xt)
        _store_tile(acc, XS, XN, OUT, TMAX, rm, rn, mmask, nmask, so_m, st_m, pid_n, HAS_SCALE, IS_L2)


    @triton.jit
    def _int8_words_to_f16(w):
        """The four signed bytes of each int32 word as exact fp16 values, along two new axes of two
        ``(t0, t1)``: byte ``t0 + 2 t1``. No conversion instructions: each byte, offset by 128 (an XOR), is ORed
        into the fp16 pattern of 1024, and 1152 is subtracted (both exact)."""
        wu = w.to(tl.uint32, bitcast=True) ^ 0x80808080
        x0 = (wu & 0x00FF00FF) | 0x64006400  # bytes 0 and 2 as the low and high halves
        x1 = ((wu >> 8) & 0x00FF00FF) | 0x64006400  # bytes 1 and 3
        lo = tl.join(x0.to(tl.uint16).to(tl.float16, bitcast=True), x1.to(tl.uint16).to(tl.float16, bitcast=True))
        hi = tl.join((x0 >> 16).to(tl.uint16).to(tl.float16, bitcast=True),
                     (x1 >> 16).to(tl.uint16).to(tl.float16, bitcast=True))
        return tl.join(lo, hi) - 1152.0

    @triton.jit
    def _x_words(XW, row0, N, k0, D4, sx_n):
        """This thread's int32 words of the 128-row x 64-feature tile at ``(row0, k0)``: ``(128, 4 m, 4 r)``;
        thread ``32 w + 4 nl + kl`` takes rows ``nl + 8 w + 32 r`` and words ``k0 / 4 + 4 kl + m``."""
        th = tl.arange(0, 128)
        rows = row0 + (th // 32) * 8 + (th // 4) % 8
        words = k0 // 4 + 4 * (th % 4)
        m = tl.arange(0, 4)
        r = tl.arange(0, 4)
        rr = rows[:, None, None] + 32 * r[None, None, :]
        ww = words[:, None, None] + m[None, :, None]
        return tl.load(XW + rr * sx_n + ww, mask=(rr < N) & (ww < D4), other=0)

    @triton.jit
    def _scores_int8_kernel(
        Q, QL, XW, XS, XN, OUT, TMAX, M, N, D, D4,
        sq_m, sx_n, so_m, st_m,
        IS_L2: tl.constexpr, SPLIT_Q: tl.constexpr, AHEAD: tl.constexpr,
    ):
        """:func:`_scores_kernel` for int8 rows (viewed as int32 words of four features), 16 queries, 128-row
        tiles, 4 warps. Each thread loads, a 64-feature step at a time, exactly the words its mma fragments
        of X^T need (a word is four consecutive k of one row, as the fp16 operand wants them) and turns them
        into fp16 in registers: no conversion instructions, no shared-memory hop for X. The features of a
        step are taken in a permuted order (thread kl gets words 4 kl .. 4 kl + 3, one 16-byte load); the
        queries' columns are permuted to match."""
        pid_n = tl.program_id(0)
        row0 = pid_n * 128
        rm = tl.arange(0, 16)
        mmask = rm < M
        rn = row0 + tl.arange(0, 128)
        nmask = rn < N
        kap = tl.arange(0, 64)  # operand column: 16 m + 4 kl + t -> feature 16 kl + 4 m + t
        feat = 16 * ((kap // 4) % 4) + 4 * (kap // 16) + kap % 4
        acc = tl.zeros([16, 128], tl.float32)
        w_nx = _x_words(XW, row0, N, 0, D4, sx_n)
        if AHEAD == 2:
            w_nx2 = _x_words(XW, row0, N, 64, D4, sx_n)
        for k0 in range(0, D, 64):
            w = w_nx
            if AHEAD == 2:  # two steps' words in flight
                w_nx = w_nx2
                w_nx2 = _x_words(XW, row0, N, k0 + 128, D4, sx_n)
            else:
                w_nx = _x_words(XW, row0, N, k0 + 64, D4, sx_n)
            x = _int8_words_to_f16(tl.reshape(w, (4, 8, 4, 4, 2, 2)))  # (w, nl, kl, m, r1, r0, t0, t1)
            x = tl.permute(x, (3, 2, 7, 6, 4, 5, 0, 1))  # (m, kl, t1, t0, r1, r0, w, nl): r = 2 r1 + r0
            xt = tl.reshape(x, (64, 128))
            kk = k0 + feat
            qmask = mmask[:, None] & (kk < D)[None, :]
            q = tl.load(Q + rm[:, None] * sq_m + kk[None, :], mask=qmask, other=0.0)
            acc += tl.dot(q, xt)
            if SPLIT_Q:
                acc += tl.dot(tl.load(QL + rm[:, None] * sq_m + kk[None, :], mask=qmask, other=0.0), xt)
        _store_tile(acc, XS, XN, OUT, TMAX, rm, rn, mmask, nmask, so_m, st_m, pid_n, True, IS_L2)

    @triton.jit
    def _group_threshold(tmax, nt, kk, KP: tl.constexpr, GN: tl.constexpr, TB: tl.constexpr):
        """A score that at least ``kk`` rows reach, from one query's best score per tile ``tmax`` alone: the
        tiles are dealt into ``GN`` groups; ``kk`` groups whose best is at least t hold ``kk`` distinct rows
        scoring at least t, so t = the ``kk``-th highest group maximum will do."""
        gmax = tl.full([GN], float("-inf"), tl.float32)
        for b0 in range(0, nt, TB):
            t = b0 + tl.arange(0, TB)
            v = tl.load(tmax + t, mask=t < nt, other=float("-inf"))
            gmax = tl.maximum(gmax, tl.max(tl.reshape(v, [GN, TB // GN]), axis=1))
        ranked = tl.topk(gmax, KP)  # descending
        return tl.max(tl.where(tl.arange(0, KP) == kk - 1, ranked, float("-inf")), axis=0)

    @triton.jit
    def _list_tiles(tmax, tiles_out, t0, t1, thr, TB: tl.constexpr):
        """The tiles in ``[t0, t1)`` whose best score reaches ``thr``, written in order to ``tiles_out`` (a
        prefix-sum compaction); returns how many. The caller reads the list back only after a barrier."""
        n_tiles = tl.zeros([], tl.int32)
        for b0 in range(t0, t1, TB):
            t = b0 + tl.arange(0, TB)
            hit = (tl.load(tmax + t, mask=t < t1, other=float("-inf")) >= thr) & (t < t1)
            pos = n_tiles + tl.cumsum(hit.to(tl.int32), axis=0) - 1
            tl.store(tiles_out + pos, t, mask=hit)
            n_tiles += tl.sum(hit.to(tl.int32), axis=0)
        return n_tiles

    @triton.jit
    def _listed_rows(S, tiles_in, i0, n_tiles, n, thr, BN: tl.constexpr, BT: tl.constexpr):
        """Listed tiles ``i0 .. i0 + BT`` (of ``n_tiles``) as ``BT * BN`` rows: ``(rows, scores, keep)``, keep =
        the row exists and reaches ``thr``. -0.0 is folded into +0.0, so the keys rank it as equal."""
        j = i0 + tl.arange(0, BT)
        tiles = tl.load(tiles_in + j, mask=j < n_tiles, other=0)
        rows = tl.reshape(tiles[:, None] * BN + tl.arange(0, BN)[None, :], [BT * BN])
        valid = tl.reshape(tl.broadcast_to((j < n_tiles)[:, None], [BT, BN]), [BT * BN]) & (rows < n)
        sc = tl.load(S + rows, mask=valid, other=float("-inf")) + 0.0
        return rows, sc, valid & (sc >= thr)

    @triton.jit
    def _score_keys(sc, rows, row0):
        """64-bit keys: the score's bits made monotone in the float order (signed), then the complement of the
        row id, so that a higher key is a better row and equal scores rank by ascending id."""
        b = sc.to(tl.int32, bitcast=True)
        return (tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.int64) << 32) | (0xFFFFFFFF - (rows + row0).to(tl.int64))

    @triton.jit
    def _key_score(key):
        k32 = (key >> 32).to(tl.int32)
        return tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)

    @triton.jit
    def _rank_listed_tiles(S, tiles_in, n_tiles, n, thr, row0, BN: tl.constexpr, BT: tl.constexpr,
                           KP: tl.constexpr):
        """The best ``KP`` keys of the listed tiles' rows that reach ``thr``, ``BT`` tiles at a time: the exact
        path whatever the number of such rows (thousands of equal scores)."""
        MIN: tl.constexpr = -9223372036854775807 - 1
        best = tl.full([KP], MIN, tl.int64)
        for i0 in range(0, n_tiles, BT):
            rows, sc, keep = _listed_rows(S, tiles_in, i0, n_tiles, n, thr, BN, BT)
            key = tl.where(keep, _score_keys(sc, rows, row0), MIN)
            best = tl.topk(tl.reshape(tl.join(best, tl.topk(key, KP)), [2 * KP]), KP)
        return best

    @triton.jit
    def _exact_scores(X, XS, XN, QF, rows, mask, D, sx_n, HAS_SCALE: tl.constexpr, IS_L2: tl.constexpr,
                      BD: tl.constexpr):
        """Scores of the chunk's ``rows`` (where ``mask``) against one float32 query ``QF``, in float32 from the
        rows themselves (``BD`` features at a time): what the stage-1 kernel computes with the query split in
        two fp16 halves, to fp32 accuracy. ``X`` int8 rows are scaled by ``XS``; L2 gives ``2 q.x - |x|^2``."""
        acc = tl.zeros(rows.shape, tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + tl.arange(0, BD)
            x = tl.load(X + rows[:, None].to(tl.int64) * sx_n + d[None, :], mask=mask[:, None] & (d < D)[None, :],
                        other=0).to(tl.float32)
            acc += tl.sum(x * tl.load(QF + d, mask=d < D, other=0.0)[None, :], axis=1)
        if HAS_SCALE:
            acc = acc * tl.load(XS + rows, mask=mask, other=0.0)
        if IS_L2:
            acc = 2.0 * acc - tl.load(XN + rows, mask=mask, other=0.0)
        return acc + 0.0  # -0.0 ranks as +0.0

    @triton.jit
    def _rank_listed_tiles_exact(S, tiles_in, n_tiles, n, thr, row0, X, XS, XN, QF, D, sx_n, BN: tl.constexpr,
                                 BT: tl.constexpr, KP: tl.constexpr, HAS_SCALE: tl.constexpr, IS_L2: tl.constexpr,
                                 BD: tl.constexpr):
        """:func:`_rank_listed_tiles` for scores from the queries' high halves alone: the rows that reach ``thr``
        in ``S`` are ranked by their exact scores (:func:`_exact_scores`), ``BT`` tiles at a time."""
        MIN: tl.constexpr = -9223372036854775807 - 1
        best = tl.full([KP], MIN, tl.int64)
        for i0 in range(0, n_tiles, BT):
            rows, sc, keep = _listed_rows(S, tiles_in, i0, n_tiles, n, thr, BN, BT)
            exact = _exact_scores(X, XS, XN, QF, rows, keep, D, sx_n, HAS_SCALE, IS_L2, BD)
            key = tl.where(keep, _score_keys(exact, rows, row0), MIN)
            best = tl.topk(tl.reshape(tl.join(best, tl.topk(key, KP)), [2 * KP]), KP)
        return best

    @triton.jit
    def _best_keys(keys, n_keys, KP: tl.constexpr, CB: tl.constexpr):
        """The best ``KP`` of ``n_keys`` keys (``CB >= KP``), sorted: the first block's top ``KP``, then each
        further block's merged in (at most ~1.6 k keys reach the threshold on real data, k = 1024: one block)."""
        MIN: tl.constexpr = -9223372036854775807 - 1
        c = tl.arange(0, CB)
        best = tl.topk(tl.load(keys + c, mask=c < n_keys, other=MIN), KP)
        for c0 in range(CB, n_keys, CB):
            block = tl.topk(tl.load(keys + c0 + c, mask=c0 + c < n_keys, other=MIN), KP)
            best = tl.topk(tl.reshape(tl.join(best, block), [2 * KP]), KP)
        return best

    @triton.jit
    def _store_best(best, OUT_S, OUT_I, kk, KP: tl.constexpr):
        o = tl.arange(0, KP)
        tl.store(OUT_S + o, _key_score(best), mask=o < kk)
        tl.store(OUT_I + o, 0xFFFFFFFF - (best & 0xFFFFFFFF), mask=o < kk)

    @triton.jit
    def _threshold_select_kernel(S, TMAX, TL, KB, OUT_S, OUT_I, NKEYS, n, nt, row0, kk, ss_m, st_m, stl_m, skb_m,
                                 so_m, BN: tl.constexpr, KP: tl.constexpr, GN: tl.constexpr, TB: tl.constexpr,
                                 BT: tl.constexpr, CB: tl.constexpr, CAP: tl.constexpr):
        """One query's top ``kk`` rows of a chunk, from its scores ``S`` and best score per tile ``TMAX``, in one
        program, ranked by 64-bit keys (:func:`_score_keys`): best first, equal scores by ascending id.

        1. A threshold that at least ``kk`` rows reach (:func:`_group_threshold`).
        2. The tiles whose maximum reaches it are listed (``TL``).
        3. Their rows that reach it are written as keys to ``KB`` (at most ``CAP``) and counted (``NKEYS``).
        4. The top ``KP`` of those keys, merged a block of ``CB`` at a time. If more than ``CAP`` rows reached
           the threshold (thousands of equal scores), the listed tiles are ranked instead, ``BT`` tiles of
           rows at a time, rows under the threshold masked out: slower, still exact, and still on the GPU."""
        q = tl.program_id(0)
        S += q * ss_m
        tiles = TL + q * stl_m
        keys = KB + q * skb_m
        thr = _group_threshold(TMAX + q * st_m, nt, kk, KP, GN, TB)
        n_tiles = _list_tiles(TMAX + q * st_m, tiles, 0, nt, thr, TB)
        tl.debug_barrier()  # the list is read back by other threads of this program
        n_keys = tl.zeros([], tl.int32)
        for i0 in range(0, n_tiles, BT):
            rows, sc, keep = _listed_rows(S, tiles, i0, n_tiles, n, thr, BN, BT)
            pos = n_keys + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(keys + pos, _score_keys(sc, rows, row0), mask=keep & (pos < CAP))
            n_keys += tl.sum(keep.to(tl.int32), axis=0)
        tl.debug_barrier()
        if n_keys > CAP:
            best = _rank_listed_tiles(S, tiles, n_tiles, n, thr, row0, BN, BT, KP)
        else:
            best = _best_keys(keys, n_keys, KP, CB)
        _store_best(best, OUT_S + q * so_m, OUT_I + q * so_m, kk, KP)
        tl.store(NKEYS + q, n_keys)

    @triton.jit
    def _parallel_threshold_kernel(TMAX, THR, NKEYS, EPS, nt, kk, st_m, KP: tl.constexpr, GN: tl.constexpr,
                                   TB: tl.constexpr, MARGIN: tl.constexpr):
        """Parallel select, launch 1 of 3 (one program per query): the threshold, and the key count zeroed.
        ``MARGIN`` (scores from the queries' high halves, rescored later): the threshold lowered by twice the
        query's bound ``EPS`` on the distance between such a score and the exact one, so that every row of the
        exact top k reaches it."""
        q = tl.program_id(0)
        thr = _group_threshold(TMAX + q * st_m, nt, kk, KP, GN, TB)
        if MARGIN:
            thr = thr - 2.0 * tl.load(EPS + q)
        tl.store(THR + q, thr)
        tl.store(NKEYS + q, 0)

    @triton.jit
    def _parallel_gather_kernel(S, TMAX, THR, TL, KB, NKEYS, n, nt, row0, ss_m, st_m, stl_m, skb_m,
                                BN: tl.constexpr, TP: tl.constexpr, BT: tl.constexpr, CAP: tl.constexpr):
        """Launch 2 (``TP`` tiles per program, many programs per query): the program's tiles that reach the
        threshold are listed in its own stretch of ``TL``; each of their rows that reaches it takes a place in
        the query's key buffer with an atomic add on the query's count (about one row a listed tile does, so
        this is cheaper than a prefix sum over the block; the order in the buffer does not matter: launch 3
        sorts by key). Every such row is counted, those past ``CAP`` are not stored."""
        q = tl.program_id(0)
        t0 = tl.program_id(1) * TP
        thr = tl.load(THR + q)
        tiles = TL + q * stl_m + t0
        n_tiles = _list_tiles(TMAX + q * st_m, tiles, t0, tl.minimum(t0 + TP, nt), thr, TP)
        if n_tiles > 0:
            tl.debug_barrier()
            counter = NKEYS + q + tl.zeros([BT * BN], tl.int32)
            for i0 in range(0, n_tiles, BT):
                rows, sc, keep = _listed_rows(S + q * ss_m, tiles, i0, n_tiles, n, thr, BN, BT)
                pos = tl.atomic_add(counter, 1, mask=keep, sem="relaxed")  # launch 3 reads it, no fence needed
                tl.store(KB + q * skb_m + pos, _score_keys(sc, rows, row0), mask=keep & (pos < CAP))

    @triton.jit
    def _parallel_rescore_kernel(KB, NKEYS, X, XS, XN, QF, row0, D, sx_n, sq_m, skb_m, HAS_SCALE: tl.constexpr,
                                 IS_L2: tl.constexpr, RB: tl.constexpr, BD: tl.constexpr, CAP: tl.constexpr):
        """Between launches 2 and 3 when the scores came from the queries' high halves alone: each key in the
        buffer (programs ``r`` of a query take blocks ``r, r + R, ...`` of ``RB``) is rebuilt from its row's
        exact score (:func:`_exact_scores`). Nothing to do if the buffer overflowed (launch 3 then rescores)."""
        q = tl.program_id(0)
        n_keys = tl.load(NKEYS + q)
        keys = KB + q * skb_m
        for b0 in range(tl.program_id(1) * RB, tl.where(n_keys <= CAP, n_keys, 0), tl.num_programs(1) * RB):
            b = b0 + tl.arange(0, RB)
            valid = b < n_keys
            key = tl.load(keys + b, mask=valid, other=0)
            rows = (0xFFFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32) - row0
            exact = _exact_scores(X, XS, XN, QF + q * sq_m, rows, valid, D, sx_n, HAS_SCALE, IS_L2, BD)
            tl.store(keys + b, _score_keys(exact, rows, row0), mask=valid)

    @triton.jit
    def _parallel_rank_kernel(S, TMAX, THR, TL, KB, NKEYS, OUT_S, OUT_I, X, XS, XN, QF, n, nt, row0, kk, D, ss_m, st_m,
                              stl_m, skb_m, so_m, sx_n, sq_m, BN: tl.constexpr, KP: tl.constexpr, TB: tl.constexpr,
                              BT: tl.constexpr, CB: tl.constexpr, CAP: tl.constexpr, EXACT: tl.constexpr,
                              BTE: tl.constexpr, BD: tl.constexpr, HAS_SCALE: tl.constexpr, IS_L2: tl.constexpr):
        """Launch 3 (one program per query): the top ``KP`` of the query's keys (:func:`_best_keys`), or, if more
        than ``CAP`` rows reached the threshold (thousands of equal scores), of the listed tiles' rows
        (:func:`_rank_listed_tiles`), as the one-program select ranks them; ``EXACT`` (scores from the queries'
        high halves): those rows by their exact scores (:func:`_rank_listed_tiles_exact`)."""
        q = tl.program_id(0)
        n_keys = tl.load(NKEYS + q)
        if n_keys > CAP:
            tiles = TL + q * stl_m
            thr = tl.load(THR + q)
            n_tiles = _list_tiles(TMAX + q * st_m, tiles, 0, nt, thr, TB)
            tl.debug_barrier()
            if EXACT:
                best = _rank_listed_tiles_exact(S + q * ss_m, tiles, n_tiles, n, thr, row0, X, XS, XN, QF + q * sq_m,
                                                D, sx_n, BN, BTE, KP, HAS_SCALE, IS_L2, BD)
            else:
                best = _rank_listed_tiles(S + q * ss_m, tiles, n_tiles, n, thr, row0, BN, BT, KP)
        else:
            best = _best_keys(KB + q * skb_m, n_keys, KP, CB)
        _store_best(best, OUT_S + q * so_m, OUT_I + q * so_m, kk, KP)


def _select_sizes(nt, bn, kk):
    """Block sizes shared by both selects: ``(KP, GN, TB, BT, CAP)``."""
    kp = max(2, next_pow2(kk))
    gn = max(64, 4 * kp)  # groups: more of them, a threshold closer to the kk-th best score
    tb = max(gn, min(4096, next_pow2(nt)))
    # blocks sized for the ~1.1 k rows that typically reach the threshold (more only loop more): tiles of rows
    # gathered BT at a time (was 32 tiles whatever k; on an H100 the one-program kernel went from 16.5 to
    # 12.4 us at m = 1, k = 10 and from 39.0 to 32.8 us at m = 16, k = 100)
    return kp, gn, tb, max(1, min(4096 // bn, kp)), max(4096, 16 * kp)


def _threshold_select(s, tmax, n, bn, kk, row0):
    """:func:`_threshold_select_kernel` over every query: ``(scores (m, kk) float32, ids (m, kk) int64, rows that
    reached the threshold (m,) int32)``, exact whatever that count (past the key buffer's ``cap`` the kernel
    ranks the listed tiles instead)."""
    m, nt = tmax.shape
    kp, gn, tb, bt, cap = _select_sizes(nt, bn, kk)
    tiles = torch.empty(m, nt, dtype=torch.int32, device=s.device)
    keys = torch.empty(m, cap, dtype=torch.int64, device=s.device)
    out_s = torch.empty(m, kk, dtype=torch.float32, device=s.device)
    out_i = torch.empty(m, kk, dtype=torch.int64, device=s.device)
    n_keys = torch.empty(m, dtype=torch.int32, device=s.device)
    _threshold_select_kernel[(m,)](s, tmax, tiles, keys, out_s, out_i, n_keys, n, nt, row0, kk, s.stride(0),
                                   tmax.stride(0), tiles.stride(0), keys.stride(0), out_s.stride(0),
                                   BN=bn, KP=kp, GN=gn, TB=tb, BT=bt, CB=max(64, 2 * kp), CAP=cap, num_warps=8)
    return out_s, out_i, n_keys


# the parallel select: tiles of maxima per gather program
_GATHER_TILES = 1024


def _parallel_select(s, tmax, n, bn, kk, row0, exact=None):
    """The same answer as :func:`_threshold_select` in three launches: the threshold, one program a query
    (:func:`_parallel_threshold_kernel`); the rows that reach it, gathered by ``ceil(tiles / 1024)`` programs a
    query (:func:`_parallel_gather_kernel`); their top ``kk``, one program a query (:func:`_parallel_rank_kernel`).
    In the one-program select the gather is a chain of ~k / 32 dependent rounds of loads: at k = 1024 and 64
    queries that select took 270 us (H200), the chain ~54 k instructions a thread (sm_90, Triton 3.6), with
    half the SMs idle. Here it is split ~8 ways a query.

    ``exact``: ``(rows, row scales or None, squared norms or None, float32 queries, margins)`` when ``s`` holds
    scores from the queries' fp16 high halves alone (:func:`_rescore_margins`): the threshold is lowered by
    twice each query's margin, and the rows that reach it are ranked by exact scores computed from the rows
    (:func:`_parallel_rescore_kernel`)."""
    m, nt = tmax.shape
    kp, gn, tb, bt, cap = _select_sizes(nt, bn, kk)
    tp = min(_GATHER_TILES, max(16, next_pow2(nt)))
    dev = s.device
    thr = torch.empty(m, dtype=torch.float32, device=dev)
    n_keys = torch.empty(m, dtype=torch.int32, device=dev)
    tiles = torch.empty(m, nt, dtype=torch.int32, device=dev)
    keys = torch.empty(m, cap, dtype=torch.int64, device=dev)
    out_s = torch.empty(m, kk, dtype=torch.float32, device=dev)
    out_i = torch.empty(m, kk, dtype=torch.int64, device=dev)
    if exact is not None:
        xc, xs, xn, qf, eps = exact
        d = xc.shape[1]
        flags = dict(HAS_SCALE=xs is not None, IS_L2=xn is not None)
        xs, xn = (xs if xs is not None else s), (xn if xn is not None else s)
    else:
        xc, xs, xn, qf, eps, d, flags = s, s, s, s, s, 1, dict(HAS_SCALE=False, IS_L2=False)
    _parallel_threshold_kernel[(m,)](tmax, thr, n_keys, eps, nt, kk, tmax.stride(0), KP=kp, GN=gn, TB=tb,
                                     MARGIN=exact is not None, num_warps=8)
    _parallel_gather_kernel[(m, cdiv(nt, tp))](
        s, tmax, thr, tiles, keys, n_keys, n, nt, row0, s.stride(0), tmax.stride(0), tiles.stride(0),
        keys.stride(0), BN=bn, TP=tp, BT=bt, CAP=cap, num_warps=8)
    if exact is not None:
        _parallel_rescore_kernel[(m, max(1, cdiv(2 * kp, _RESCORE_ROWS)))](
            keys, n_keys, xc, xs, xn, qf, row0, d, xc.stride(0), qf.stride(0), keys.stride(0), **flags,
            RB=_RESCORE_ROWS, BD=64, CAP=cap, num_warps=4)
    bte = max(1, kp // bn)  # the exact overflow path: at least KP rows a step, at most 16 K elements a block
    _parallel_rank_kernel[(m,)](
        s, tmax, thr, tiles, keys, n_keys, out_s, out_i, xc, xs, xn, qf, n, nt, row0, kk, d, s.stride(0),
        tmax.stride(0), tiles.stride(0), keys.stride(0), out_s.stride(0), xc.stride(0), qf.stride(0), BN=bn, KP=kp,
        TB=tb, BT=bt, CB=max(64, 2 * kp), CAP=cap, EXACT=exact is not None, BTE=bte,
        BD=max(16, 16384 // (bte * bn)), **flags, num_warps=8)
    return out_s, out_i, n_keys


# rows rescored per block by the rescoring launch
_RESCORE_ROWS = 64


def _rescore_margins(queries, max_norm, d, is_l2):
    """``(the float32 queries' fp16 high halves, margins)``: per query, a bound on the distance between a row's
    score from the query's high half alone (one fp16 dot, as fp16 queries take) and its exact score: the low
    half's share, at most ``|q - hi| * max|x|``, plus both float32 accumulations (``d`` terms each, at most
    ``d * 2^-24 * |q| max|x|``), plus for L2 the doubling and the subtraction of ``|x|^2``; times 4 for safety
    (tensor cores truncate their sums). Any row of the exact top k then scores within twice this of the
    threshold."""
    qf = queries.float()
    hi = qf.half()
    lo = qf - hi.float()
    u = 2.0 ** -24
    qn = qf.norm(dim=1)
    eps = lo.norm(dim=1) * max_norm + (2 * d + 2) * u * qn * max_norm
    if is_l2:
        eps = 2 * eps + 4 * u * (2 * qn * max_norm + max_norm * max_norm)
    return hi, (4 * eps).contiguous()


def _topk_with_ids(scores: torch.Tensor, ids: torch.Tensor, k: int):
    key = _order_key(scores, ids)
    _, pos = torch.topk(key, k, dim=1, sorted=True)
    return scores.gather(1, pos), ids.gather(1, pos)


def _chunk_scores_triton(q, xc, xs, xn, is_l2, tile):
    """``(scores (m, tiles * rows per tile) float32, -inf past row n; best score per query and tile of rows
    (m, tiles); rows per tile)``."""
    m, d = q.shape
    n = xc.shape[0]
    block_n, num_warps = tile
    tiles = cdiv(n, block_n)
    out = torch.empty(m, tiles * block_n, dtype=torch.float32, device=q.device)
    tmax = torch.empty(m, tiles, dtype=torch.float32, device=q.device)
    ql = q
    split = False
    if xc.dtype == torch.float32:  # fp32 rows: fp32 products (tf32x3 on a GPU, ~fp32 accurate)
        dot_dtype, precision = tl.float32, ("tf32x3" if q.is_cuda else "ieee")
    else:  # fp16 and int8 rows are exact in fp16: fp16 tensor-core dots
        dot_dtype, precision = tl.float16, "ieee"
        if q.dtype == torch.float32:
            hi = q.half()
            ql, q, split = (q - hi.float()).half(), hi, True
    block_m = min(64, max(16, next_pow2(m)))
    block_k = 64 if d >= 64 else max(16, next_pow2(d))
    if xc.dtype == torch.int8 and block_m == 16 and tile == _TILE and d % 4 == 0 and xc.data_ptr() % 4 == 0:
        # int8 rows, up to 16 queries: words loaded into their mma fragments, bytes to fp16 without conversions
        _scores_int8_kernel[(tiles,)](
            q, ql, xc.view(torch.int32), xs, xn if xn is not None else out, out, tmax, m, n, d, d // 4,
            q.stride(0), xc.stride(0) // 4, out.stride(0), tmax.stride(0), IS_L2=is_l2, SPLIT_Q=split,
            AHEAD=INT8_STEPS_AHEAD, num_warps=4,
        )
        return out, tmax, block_n
    grid = (cdiv(n, block_n), cdiv(m, block_m))
    _scores_kernel[grid](
        q, ql, xc, xs if xs is not None else out, xn if xn is not None else out, out, tmax, m, n, d,
        q.stride(0), xc.stride(0), out.stride(0), tmax.stride(0),
        IS_L2=is_l2, HAS_SCALE=xs is not None, SPLIT_Q=split, DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out, tmax, block_n


def _chunk_scores_torch(q, xc, xs, xn, is_l2, tile):
    s = q.float() @ xc.float().T
    if xs is not None:
        s = s * xs[None, :]
    if is_l2:
        s = 2.0 * s - xn[None, :]
    return s, None, None


def _float_topk(s, kk):
    """Top ``kk`` of each row of ``s`` by float value (sorted), their positions, and whether equal values
    straddle the cut (the ``kk``-th and ``kk+1``-th values are equal: which of them a float top-k keeps is
    arbitrary); ``None`` when the row has no more than ``kk`` values."""
    if kk >= s.shape[1]:
        top, pos = torch.topk(s, kk, dim=1, sorted=True)
        return top, pos, None
    top, pos = torch.topk(s, kk + 1, dim=1, sorted=True)
    return top[:, :kk], pos[:, :kk], top[:, kk - 1] == top[:, kk]


def _chunk_topk(scores_fn, queries, base, xs, xn, k, is_l2, r0, r1, tile, exact_ties, select="torch",
                margins=None):
    """Stage 1 over rows ``[r0, r1)``: ``(scores, ids, tied, keyed)``, ``tied`` a bool per query or ``None``,
    ``keyed`` whether the rows are already in (score, id) key order.

    Fast path (``exact_ties=False``): the kernel also returns each query's best score per tile of rows.
    The chunk's top ``kk`` all lie in the ``kk`` tiles with the highest best scores (the ``kk``-th best tile
    maximum is a score no higher than the ``kk``-th best score), so only those tiles' scores are ranked.
    ``tied`` flags queries where equal values straddle a cut (tile maxima or scores). ``exact_ties=True``
    ranks every score of the chunk by its (score, id) key instead. No host synchronisation.

    ``select="rescore"`` with ``margins`` (:func:`_rescore_margins`: the queries' high halves and their margins;
    float32 queries over fp16 or int8 rows, and more than ``k`` tiles in the chunk): the scores come from the queries' fp16 high halves alone (one
    dot instead of two) and the parallel select ranks the rows near its threshold by exact scores. Otherwise
    it is ``"parallel"``."""
    m, n = queries.shape[0], r1 - r0
    kk = min(k, n)
    rescore = (select == "rescore" and margins is not None and not exact_ties and queries.dtype == torch.float32
               and base.dtype in (torch.float16, torch.int8) and kk < -(-n // tile[0]))
    xs_c = None if xs is None else xs[r0:r1]
    xn_c = None if xn is None else xn[r0:r1]
    s, tmax, bn = scores_fn(margins[0] if rescore else queries, base[r0:r1], xs_c, xn_c, is_l2, tile)
    if exact_ties:
        ids = torch.arange(r0, r1, device=s.device, dtype=torch.int64).expand(m, -1)
        return (*_topk_with_ids(s[:, :n], ids, kk), None, True)
    if tmax is None or kk >= tmax.shape[1]:
        top, i, tied = _float_topk(s[:, :n], kk)
        return top, i + r0, tied, False
    if select == "fused":  # exact and already in key order: nothing to check on the host
        top, ids, _ = _threshold_select(s, tmax, n, bn, kk, r0)
        return top, ids, None, True
    if select in ("parallel", "rescore"):
        exact = (base[r0:r1], xs_c, xn_c, queries, margins[1]) if rescore else None
        top, ids, _ = _parallel_select(s, tmax, n, bn, kk, r0, exact)
        return top, ids, None, True
    _, ti, tile_tied = _float_topk(tmax, kk)
    pos = (ti[:, :, None] * bn + torch.arange(r0, r0 + bn, device=s.device)).reshape(m, -1)
    top, j, tied = _float_topk(s.gather(1, pos - r0), kk)
    return top, pos.gather(1, j), tied | tile_tied, False


def _merge(parts, k):
    if len(parts) == 1 and parts[0][3]:  # one chunk, already in key order
        return parts[0][0], parts[0][1]
    return _topk_with_ids(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), k)


def _fast_search(scores_fn, queries, base, xs, xn, k, is_l2, chunk, tile, select="torch", max_norm=None):
    """Every chunk by the fast path, merged; no host synchronisation (so a CUDA graph can hold it).
    Returns ``(scores, ids, tied, parts)``: ``tied`` a bool per chunk (its cut split equal values), or
    ``None`` when no chunk can be cut wrongly (the fused and parallel selects), and ``parts`` each chunk's
    candidates. ``max_norm``: the largest row norm (a tensor), which ``select="rescore"`` needs."""
    n = base.shape[0]
    margins = None
    if select == "rescore" and max_norm is not None and scores_fn is _chunk_scores_triton:
        margins = _rescore_margins(queries, max_norm, base.shape[1], is_l2)
    parts = [_chunk_topk(scores_fn, queries, base, xs, xn, k, is_l2, r0, min(n, r0 + chunk), tile, False, select,
                         margins)
             for r0 in range(0, n, chunk)]
    tied = None
    if any(p[2] is not None for p in parts):
        none = torch.zeros((), dtype=torch.bool, device=queries.device)
        tied = torch.stack([none if p[2] is None else p[2].any() for p in parts])
    return (*_merge(parts, k), tied, parts)


def _search_chunks(scores_fn, queries, base, xs, xn, k, is_l2, chunk, tile, select="torch", max_norm=None,
                   fast=None):
    """The fast path (or its result ``fast``); with the torch select, then, after one host synchronisation,
    the chunks whose cut split equal values scored again and ranked by (score, id) keys."""
    if fast is None:
        fast = _fast_search(scores_fn, queries, base, xs, xn, k, is_l2, chunk, tile, select, max_norm)
    s, i, tied, parts = fast
    if tied is None:  # no host synchronisation: the caller gets the results as soon as the GPU has them
        return s, i
    redo = tied.tolist()
    if not any(redo):
        return s, i
    n = base.shape[0]
    bounds = [(r0, min(n, r0 + chunk)) for r0 in range(0, n, chunk)]
    parts = [_chunk_topk(scores_fn, queries, base, xs, xn, k, is_l2, r0, r1, tile, True) if again else p
             for p, (r0, r1), again in zip(parts, bounds, redo)]
    return _merge(parts, k)


SELECTS = ("auto", "torch", "fused", "parallel", "rescore")
# "auto" on a GPU: the parallel select from this k on, and from this many float32 queries its rescoring
# variant (predictions, not yet timed: gpu/NOTES.md)
PARALLEL_FROM_K = 64
RESCORE_FROM_M = 32

# scores of one chunk held at once: m * chunk_rows * 4 bytes, at most 256 MiB
_CHUNK_SCORES = 1 << 26
_TILE = (128, 4)  # (rows per program, warps)
# the int8 fragment kernel's words of X loaded 1 or 2 64-feature steps ahead (Triton's pipeline does not take
# these loads: they feed bit operations, not a dot). At 1 a program has 8 KB in flight, ~32 KB an SM at four
# programs an SM: about what an H200 needs to hide DRAM latency, and the kernel ran at 56% of the copy
# bandwidth. 2: twice that, 16 more registers (offline, Triton 3.6: see gpu/NOTES.md). Untimed: stays 1
INT8_STEPS_AHEAD = 1


def _check_base(base, base_scale, base_sq_norms):
    """``base`` (and its per-row vectors) as the kernels take them, or a ``ValueError`` / ``TypeError``."""
    if not isinstance(base, torch.Tensor) or base.dim() != 2:
        raise ValueError(f"base must be an (n, d) tensor, got {_describe(base)}")
    if base.dtype not in BASE_DTYPES:
        raise TypeError(f"base must be float16, float32 or int8 (with base_scale), got {base.dtype}: convert it "
                        "once (base.float() or base.half()), not at every search")
    if base.shape[1] == 0:
        raise ValueError("base has rows of dimension 0")
    if base.dtype == torch.int8 and base_scale is None:
        raise ValueError("an int8 base needs base_scale")
    n = base.shape[0]
    for name, v in (("base_scale", base_scale), ("base_sq_norms", base_sq_norms)):
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,)):
            raise ValueError(f"{name} must be a ({n},) tensor, one value a row of base; got {_describe(v)}")
        if v is not None and v.device != base.device:
            raise ValueError(f"{name} is on {v.device} but base is on {base.device}")


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_finite_rows(x, what, first_row=0):
    """A ``ValueError`` naming the first rows of ``x`` (2-D, or 1-D: one value a row; numbered from
    ``first_row``) that hold NaN or inf."""
    bad = ~torch.isfinite(x)
    bad = bad.any(1) if bad.dim() == 2 else bad
    if bool(bad.any()):
        rows = (bad.nonzero().flatten()[:5] + first_row).tolist()
        raise ValueError(f"{what} hold NaN or inf values, first at rows {rows}")


def _prepare(queries, base, k, metric, base_scale, base_sq_norms, check_finite=False, base_checked=False):
    """Checked, contiguous inputs: ``(queries, base, scale or None, squared norms or None, k, is_l2)``.
    Queries may be a numpy array or sit on another device than ``base``: they are moved to it.
    ``base_checked``: the rows and their vectors passed :func:`_check_base` already (an index's own)."""
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    if not base_checked:
        _check_base(base, base_scale, base_sq_norms)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    queries = torch.as_tensor(queries)  # (numpy and lists: on the CPU, where they are checked before the copy)
    if queries.dim() == 1:
        queries = queries[None]
    if queries.dim() != 2 or queries.shape[1] != base.shape[1]:
        raise ValueError(f"dimension mismatch: queries {tuple(queries.shape)} (expected (m, d) or (d,)), "
                         f"base {tuple(base.shape)}")
    if queries.dtype not in (torch.float16, torch.float32):
        queries = queries.float()
    if check_finite:  # (queries on a GPU: one small reduction and a wait for it; on the CPU, no wait)
        _check_finite_rows(queries, "queries")
    queries = queries.to(base.device)
    n = base.shape[0]
    k = min(k, n)
    is_l2 = metric == "l2"
    queries = queries.contiguous()
    base = base.contiguous()
    xs = base_scale.float().contiguous() if base_scale is not None else None
    xn = None
    if is_l2:
        if base_sq_norms is None:
            xd = base.float() * xs[:, None] if xs is not None else base.float()
            base_sq_norms = (xd * xd).sum(1)
        xn = base_sq_norms.float().contiguous()
    return queries, base, xs, xn, k, is_l2


def _plan(queries, base, k, chunk_rows, tile, backend):
    use_triton = pick_backend(backend, base) == "triton"
    if chunk_rows is None:
        chunk_rows = max(1 << 14, _CHUNK_SCORES // queries.shape[0])
    return (_chunk_scores_triton if use_triton else _chunk_scores_torch), max(chunk_rows, k), tile or _TILE


def _check_select(select):
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    return select


def _pick_select(select, base, k, queries=None):
    """``"auto"`` resolved for ``queries`` (``None``: one float32 query) and ``k`` results over ``base``: on the
    CPU the torch ops (in Triton's interpreter the kernels are the slower); on a GPU the one-program fused
    kernel (an H100 measured it 1.24-1.62x faster than the torch select, and 9x where int8 rows tie by the
    thousand; benches/RESULTS.md), from ``PARALLEL_FROM_K`` on the parallel select, whose many programs per
    query replace the one program's long sequential chain, and from ``RESCORE_FROM_M`` float32 queries over
    fp16 or int8 rows its rescoring variant, which spares the stage-1 kernel its second dot."""
    if _check_select(select) != "auto":
        return select
    if not base.is_cuda:
        return "torch"
    m, dtype = (1, torch.float32) if queries is None else (queries.shape[0], queries.dtype)
    if m >= RESCORE_FROM_M and dtype == torch.float32 and base.dtype in (torch.float16, torch.int8):
        return "rescore"
    return "parallel" if k >= PARALLEL_FROM_K else "fused"


def _max_row_norm(base, xs, xn):
    """The largest norm of the (dequantized) rows, as a 0-d float32 tensor (no host synchronisation)."""
    if base.shape[0] == 0:
        return torch.zeros((), dtype=torch.float32, device=base.device)
    if xn is not None:
        return xn.max().clamp_min(0).sqrt()
    step = 1 << 16  # rows at a time, so that no float copy of the whole matrix is made
    norms = torch.cat([torch.linalg.vector_norm(base[r:r + step].float(), dim=1) for r in range(0, base.shape[0], step)])
    return (norms * xs.abs() if xs is not None else norms).max()


def _no_results(queries, k: int):
    """What a search returns when there is nothing to search: no rows (``k`` is 0) or no queries."""
    m = queries.shape[0]
    return (torch.empty(m, k, dtype=torch.float32, device=queries.device),
            torch.empty(m, k, dtype=torch.int64, device=queries.device))


def _finish(queries, s, is_l2):
    return ((queries.float() ** 2).sum(1, keepdim=True) - s) if is_l2 else s


def search_topk(queries: torch.Tensor, base: torch.Tensor, k: int, metric: str = "ip", *,
                base_scale: Optional[torch.Tensor] = None, base_sq_norms: Optional[torch.Tensor] = None,
                chunk_rows: Optional[int] = None, backend: str = "auto",
                tile: Optional[tuple] = None, select: str = "auto", check_finite: bool = True):
    """Top-``k`` rows of ``base`` for each query; returns ``(scores float32 (m, k), ids int64 (m, k))``.

    ``queries``: ``(m, d)`` float32 or float16 (float32 queries are kept exact to ~2^-22 by two fp16 dots, one
    for each half; float16 queries take one: on an H200 a batch of 64 searched 1M rows in 766 us against 857,
    and one query in about the same time). ``base``: ``(n, d)`` float16/float32, or int8 with
    ``base_scale`` ``(n,)``. ``metric``: ``"ip"`` or ``"l2"``; for L2 pass ``base_sq_norms`` (the
    squared norms of the dequantized rows) to avoid recomputing them on every call.
    ``k`` is capped at ``n``; at most 1024. No queries (``m = 0``) give ``(0, k)`` results.
    ``chunk_rows`` (rows scored per stage-1 step; default ``64M / m``, i.e. 256 MiB of scores) and
    ``tile`` (``(rows per program, warps)`` of the Triton kernel) are tuning knobs. ``select``: how each chunk's top ``k`` is picked from its scores:
    - ``"torch"``: a float top-k over the tile maxima, a gather of the best tiles, a float top-k and a merge
      by keys (~25 small launches per search);
    - ``"fused"``: one Triton kernel, one program a query: a threshold that at least ``k`` rows reach, read
      from the tile maxima; the rows that reach it, typically 1.0-1.2 ``k`` of them; their top ``k`` by
      (score, id) keys;
    - ``"parallel"``: the same in three launches, ~8 programs a query gathering the rows (for large ``k``);
    - ``"rescore"``: ``"parallel"`` over scores from the float32 queries' fp16 high halves alone (one dot
      instead of two), the rows near the threshold rescored exactly from ``base``. It needs the largest row
      norm, which only the L2 metric gives here (:class:`BruteForceIndex` keeps it for both); without it,
      it is ``"parallel"``.

    All give the same exact answer. ``"auto"`` (the default): on a GPU ``"fused"``, ``"parallel"`` from
    ``k = PARALLEL_FROM_K``, ``"rescore"`` from ``RESCORE_FROM_M`` float32 queries; ``"torch"`` on the CPU.
    For many searches over one matrix, :class:`BruteForceIndex` replays a CUDA graph.

    Bad input raises before any kernel runs: ``ValueError`` for shapes that do not agree, ``k`` out of range
    or, with ``check_finite`` (the default), queries that hold NaN or inf (numpy or CPU queries are checked
    before they are copied; for queries already on a GPU the check waits for one small reduction: pass
    ``False`` in a tight loop over trusted queries). The rows of ``base`` are not
    scanned here, which would read them twice: :class:`BruteForceIndex` checks them once. ``TypeError``
    for a ``base`` that is not float16, float32 or int8, or a ``k`` that is not an integer. Queries on
    another device than ``base`` (or a numpy array) are moved to it.
    """
    _check_select(select)
    queries, base, xs, xn, k, is_l2 = _prepare(queries, base, k, metric, base_scale, base_sq_norms, check_finite)
    if k == 0 or queries.shape[0] == 0:  # no rows, or no queries
        return _no_results(queries, k)
    select = _pick_select(select, base, k, queries)
    scores_fn, chunk, tile = _plan(queries, base, k, chunk_rows, tile, backend)
    max_norm = _max_row_norm(base, xs, xn) if select == "rescore" and xn is not None else None
    # float top-k per chunk; a chunk where equal scores straddle the cut (duplicate rows, integer data) is
    # ranked again by (score, id) keys, so ties always come out in ascending id order
    s, i = _search_chunks(scores_fn, queries, base, xs, xn, k, is_l2, chunk, tile, select, max_norm)
    return _finish(queries, s, is_l2), i


class BruteForceIndex:
    """Rows searched by brute force, for many searches over the same matrix.

    ``base``, ``metric``, ``base_scale`` as in :func:`search_topk` (the squared norms for L2 are computed
    once here). On CUDA, the first search for each (number of queries, ``k``, query dtype) records the
    search into a CUDA graph, and later searches of that shape copy the queries in and replay it: one
    launch instead of some thirty, which matters when a search takes well under a millisecond. Each
    recorded shape keeps its own buffers (``m x n x 4`` bytes of scores at most 256 MiB). With the fused,
    parallel or rescoring select (the defaults on a GPU) and ``check_finite=False`` a search never waits on
    the GPU (the queries' NaN check, on by default, waits for one small reduction when the queries are
    already on the GPU; numpy or CPU queries are checked before their copy); with the torch select it
    waits once more, for the tie flags, and a search whose chunk cut splits equal scores is finished
    eagerly, ranking (score, id) keys, as in ``search_topk``.
    ``use_graphs=False`` (or a CPU tensor) always searches eagerly. ``select`` as in ``search_topk``.
    ``check_finite`` (default) checks the rows (and int8 scales) once here, and each search's queries, for
    NaN and inf: a ``ValueError`` names the first rows that hold them.
    """

    def __init__(self, base: torch.Tensor, metric: str = "ip", *, base_scale: Optional[torch.Tensor] = None,
                 use_graphs: bool = True, chunk_rows: Optional[int] = None, tile: Optional[tuple] = None,
                 backend: str = "auto", select: str = "auto", check_finite: bool = True):
        _check_select(select)
        _check_base(base, base_scale, None)
        probe = torch.zeros(1, base.shape[1], dtype=torch.float32, device=base.device)
        _, self.base, self.scale, self.sq_norms, _, self.is_l2 = _prepare(probe, base, 1, metric, base_scale, None,
                                                                          base_checked=True)
        if check_finite:
            if self.base.is_floating_point():
                for r in range(0, self.base.shape[0], 1 << 16):  # (a slice at a time: no n x d mask)
                    _check_finite_rows(self.base[r:r + (1 << 16)], "rows of base", r)
            if self.scale is not None:
                _check_finite_rows(self.scale, "base_scale's rows")
        self.check_finite = check_finite
        self.metric = metric
        self.use_graphs = use_graphs and base.is_cuda
        self._options = (chunk_rows, tile, backend)
        self.select = select
        self._max_norm = None  # the largest row norm, for select="rescore": computed on first need
        self._graphs: dict = {}

    def select_for(self, k: int, queries: Optional[torch.Tensor] = None) -> str:
        """The select a search for ``k`` results (and ``queries``; default one float32 query) uses:
        ``select="auto"`` resolved."""
        return _pick_select(self.select, self.base, min(k, self.base.shape[0]), queries)

    @property
    def recorded_shapes(self) -> list:
        """The (queries, k, dtype) shapes with a recorded CUDA graph."""
        return list(self._graphs)

    def search(self, queries: torch.Tensor, k: int):
        """Top-``k`` rows for each query: ``(scores float32 (m, k), ids int64 (m, k))``."""
        queries, base, xs, xn, k, is_l2 = _prepare(queries, self.base, k, self.metric, self.scale, self.sq_norms,
                                                   self.check_finite, base_checked=True)
        if k == 0 or queries.shape[0] == 0:  # no rows, or no queries
            return _no_results(queries, k)
        scores_fn, chunk, tile = _plan(queries, base, k, *self._options)
        select = self.select_for(k, queries)
        if select == "rescore" and self._max_norm is None:  # (outside any graph: one pass over the rows, once)
            self._max_norm = _max_row_norm(self.base, self.scale, self.sq_norms)
        args = (scores_fn, queries, base, xs, xn, k, is_l2, chunk, tile, select, self._max_norm)
        if not (self.use_graphs and queries.is_cuda):
            s, i = _search_chunks(*args)
            return _finish(queries, s, is_l2), i
        key = (queries.shape[0], k, queries.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._record(queries, args)
        graph, static_q, out = self._graphs[key]
        static_q.copy_(queries)
        graph.replay()
        # the graph's outputs change at the next replay: copied out now, queued behind the replay, so that
        # nothing is left to launch after the host waits on the tie flags (the torch select; the fused one
        # has none to wait on)
        s, i, tied, parts = out
        s, i = _search_chunks(*args, fast=(s.clone(), i.clone(), tied, parts))
        return _finish(queries, s, is_l2), i

    @staticmethod
    def _record(queries, args):
        static_q = queries.clone()
        rec_args = (args[0], static_q, *args[2:])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the kernels and warm the allocator outside the capture
            _fast_search(*rec_args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _fast_search(*rec_args)
        return graph, static_q, out
