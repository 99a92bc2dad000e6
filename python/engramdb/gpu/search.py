"""Brute-force top-k embedding search over an fp16 or int8 ``(n, d)`` matrix for a batch of queries.

Two stages. Stage 1: a Triton kernel computes the scores of a chunk of rows against every query
(fp16 tensor-core dot products; fp32 queries as two fp16 halves; int8 dequantization and the L2
correction fused in) and, per query, the best score of each tile of 128 rows. The chunk's top ``k``
lies in the ``k`` tiles with the highest best scores, so ``torch.topk`` ranks only those tiles' scores.
Stage 2: the candidates of all chunks are ranked by a 64-bit key (monotone score bits, then the
complement of the row id), so equal scores come out in ascending row id order, deterministically, on
every backend. If equal values straddle a cut in stage 1 (the float top-k then kept an arbitrary few
of them) that chunk is ranked again by keys over all its scores.

Metrics: ``"ip"`` returns inner products, best first; ``"l2"`` returns squared Euclidean distances,
nearest first (ranked internally by ``2 q.x - |x|^2``). For int8 matrices the rows are
``x_i = scale_i * codes_i`` (symmetric, one float32 scale per row, see :func:`quantize_rows_int8`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._triton import HAS_TRITON, next_pow2, pick_backend, tl, triton

__all__ = ["search_topk", "search_topk_ref", "quantize_rows_int8"]

MAX_K = 1024


def quantize_rows_int8(x: torch.Tensor):
    """Symmetric per-row int8: returns ``(codes int8 (n, d), scale float32 (n,))``."""
    xf = x.float()
    scale = xf.abs().amax(1) / 127.0
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
        if HAS_SCALE:
            acc = acc * tl.load(XS + rn, mask=nmask, other=0.0)[None, :]
        if IS_L2:
            acc = 2.0 * acc - tl.load(XN + rn, mask=nmask, other=0.0)[None, :]
        tl.store(OUT + rm[:, None] * so_m + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])
        best = tl.max(tl.where(nmask[None, :], acc, float("-inf")), axis=1)
        tl.store(TMAX + rm * st_m + pid_n, best, mask=mmask)


def _topk_with_ids(scores: torch.Tensor, ids: torch.Tensor, k: int):
    key = _order_key(scores, ids)
    _, pos = torch.topk(key, k, dim=1, sorted=True)
    return scores.gather(1, pos), ids.gather(1, pos)


def _chunk_scores_triton(q, xc, xs, xn, is_l2, tile):
    """``(scores (m, n) float32, best score per query and tile of rows (m, tiles), rows per tile)``."""
    m, d = q.shape
    n = xc.shape[0]
    block_n, num_warps = tile
    out = torch.empty(m, n, dtype=torch.float32, device=q.device)
    tmax = torch.empty(m, triton.cdiv(n, block_n), dtype=torch.float32, device=q.device)
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
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
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


def _float_topk(s, pos, kk):
    """Top ``kk`` of ``s`` by float value, the row ids ``pos`` of them, and whether equal scores straddle
    the cut (then which of them a float top-k keeps is arbitrary)."""
    top, j = torch.topk(s, kk, dim=1, sorted=False)
    tied = (s >= top.amin(1, keepdim=True)).sum(1) > kk if kk < s.shape[1] else None
    return top, pos.gather(1, j) if pos is not None else j, tied


def _chunk_topk(scores_fn, queries, base, xs, xn, k, is_l2, r0, r1, tile, exact_ties):
    """Stage 1 over rows ``[r0, r1)``: ``(scores, ids, tied)``.

    Fast path (``exact_ties=False``): the kernel also returns each query's best score per tile of rows.
    The chunk's top ``kk`` all lie in the ``kk`` tiles with the highest best scores (the ``kk``-th best tile
    maximum is a score no higher than the ``kk``-th best score), so only those tiles' scores are ranked.
    ``tied`` flags queries where equal values straddle a cut (tile maxima or scores). ``exact_ties=True``
    ranks every score of the chunk by its (score, id) key instead."""
    s, tmax, bn = scores_fn(queries, base[r0:r1], None if xs is None else xs[r0:r1],
                            None if xn is None else xn[r0:r1], is_l2, tile)
    m, n = s.shape
    kk = min(k, n)
    if exact_ties:
        ids = torch.arange(r0, r1, device=s.device, dtype=torch.int64).expand(m, -1)
        return (*_topk_with_ids(s, ids, kk), None)
    if tmax is None or kk >= tmax.shape[1]:
        top, i, tied = _float_topk(s, None, kk)
        return top, i + r0, tied
    tv, ti = torch.topk(tmax, kk, dim=1, sorted=False)
    tile_tied = (tmax >= tv.amin(1, keepdim=True)).sum(1) > kk
    pos = (ti[:, :, None] * bn + torch.arange(bn, device=s.device)).reshape(m, -1)
    cand = s.gather(1, pos.clamp(max=n - 1))
    cand = cand.masked_fill_(pos >= n, float("-inf"))  # the last tile's rows past the end
    top, i, tied = _float_topk(cand, pos, kk)
    return top, i + r0, tile_tied if tied is None else tied | tile_tied


def _search_chunks(scores_fn, queries, base, xs, xn, k, is_l2, chunk, tile):
    n = base.shape[0]
    bounds = [(r0, min(n, r0 + chunk)) for r0 in range(0, n, chunk)]
    parts = [_chunk_topk(scores_fn, queries, base, xs, xn, k, is_l2, r0, r1, tile, False) for r0, r1 in bounds]
    flags = [p[2] for p in parts if p[2] is not None]
    if flags:  # one host sync per search; a chunk with ties at a cut is scored again, ranking keys
        redo = torch.stack([p[2].any() if p[2] is not None else p[0].new_zeros((), dtype=torch.bool)
                            for p in parts]).tolist()
        parts = [_chunk_topk(scores_fn, queries, base, xs, xn, k, is_l2, r0, r1, tile, True) if again else p
                 for p, (r0, r1), again in zip(parts, bounds, redo)]
    return _topk_with_ids(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), k)


# scores of one chunk held at once: m * chunk_rows * 4 bytes, at most 256 MiB
_CHUNK_SCORES = 1 << 26
_TILE = (128, 4)  # (rows per program, warps)


def search_topk(queries: torch.Tensor, base: torch.Tensor, k: int, metric: str = "ip", *,
                base_scale: Optional[torch.Tensor] = None, base_sq_norms: Optional[torch.Tensor] = None,
                chunk_rows: Optional[int] = None, backend: str = "auto",
                tile: Optional[tuple] = None):
    """Top-``k`` rows of ``base`` for each query; returns ``(scores float32 (m, k), ids int64 (m, k))``.

    ``queries``: ``(m, d)`` float32 or float16. ``base``: ``(n, d)`` float16/float32, or int8 with
    ``base_scale`` ``(n,)``. ``metric``: ``"ip"`` or ``"l2"``; for L2 pass ``base_sq_norms`` (the
    squared norms of the dequantized rows) to avoid recomputing them on every call.
    ``k`` is capped at ``n``; at most 1024. ``chunk_rows`` (rows scored per stage-1 step; default
    ``64M / m``, i.e. 256 MiB of scores) and ``tile`` (``(rows per program, warps)`` of the Triton kernel) are tuning knobs.
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    if queries.dim() == 1:
        queries = queries[None]
    m, d = queries.shape
    n = base.shape[0]
    if base.dim() != 2 or base.shape[1] != d:
        raise ValueError(f"dimension mismatch: queries {tuple(queries.shape)}, base {tuple(base.shape)}")
    if base.dtype == torch.int8 and base_scale is None:
        raise ValueError("an int8 base needs base_scale")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}], got {k}")
    k = min(k, n)
    is_l2 = metric == "l2"
    if queries.dtype not in (torch.float16, torch.float32):
        queries = queries.float()
    queries = queries.contiguous()
    base = base.contiguous()
    xs = base_scale.float().contiguous() if base_scale is not None else None
    xn = None
    if is_l2:
        if base_sq_norms is None:
            xd = base.float() * xs[:, None] if xs is not None else base.float()
            base_sq_norms = (xd * xd).sum(1)
        xn = base_sq_norms.float().contiguous()
    use_triton = pick_backend(backend, base) == "triton"
    scores_fn = _chunk_scores_triton if use_triton else _chunk_scores_torch
    if chunk_rows is None:
        chunk_rows = max(1 << 14, _CHUNK_SCORES // m)
    chunk = max(chunk_rows, k)
    tile = tile or _TILE
    # float top-k per chunk; a chunk where equal scores straddle the cut (duplicate rows, integer data) is
    # ranked again by (score, id) keys, so ties always come out in ascending id order
    s, i = _search_chunks(scores_fn, queries, base, xs, xn, k, is_l2, chunk, tile)
    if is_l2:
        qn = (queries.float() ** 2).sum(1, keepdim=True)
        s = qn - s
    return s, i
