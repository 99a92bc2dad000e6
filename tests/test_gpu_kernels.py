"""Triton kernels of engramdb.gpu against their torch references.

Without CUDA the kernels run in Triton's CPU interpreter: conftest.py sets TRITON_INTERPRET=1 before torch
(which imports triton) is first imported: Triton reads it when a function is decorated. Shapes are small so the file runs
in well under three minutes on two CPU cores; several are deliberately not multiples of the blocks.

Tolerances:
* quantize: scales and minimums equal the reference exactly; codes may differ by one step at exact
  rounding ties (at most 0.1% of them); every element dequantizes within half a step (x 1 + 1e-4).
* dequantize: equal to the reference up to 1e-6.
* decode attention: 2e-5 absolute (float32), 4e-3 (float16), and 1e-2 absolute + 2e-2 relative for
  bfloat16 (8 significant bits: one step of the output is 0.4-0.8% of it) against dequantize + softmax in
  float32. The interpreter cannot multiply bfloat16 (triton-lang/triton#11584): there the kernel's dots
  take the same values in float32.
* search: ids equal the exact float64 ranking (ties by ascending id) exactly on integer-valued data,
  where every score is exact; on real vectors a rank may differ only between scores within 1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    import engramdb.gpu as G
except Exception:  # engramdb's own __init__ needs the native module; the gpu package stands alone
    sys.path.append(str(ROOT / "python" / "engramdb"))
    import gpu as G

from importlib import import_module  # noqa: E402

kv_quant = import_module(G.__name__ + ".kv_quant")
_triton = import_module(G.__name__ + "._triton")

pytestmark = pytest.mark.gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if not _triton.triton_usable(torch.empty(0, device=DEVICE)):
    pytest.skip("Triton runs neither on CUDA nor in the interpreter here", allow_module_level=True)

DATA = ROOT.parent / "shared" / "data" / "mixed-minilm-384"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def integer_row(r: torch.Generator, d: int, dtype=torch.float16) -> torch.Tensor:
    """A row of small integers, for rows made equal to build a tie: its scores are then exact in float32 in any
    summation order. A random float row is not enough: the interpreter's dots go through numpy's BLAS, which on
    some CPUs (AVX-512 OpenBLAS kernels) sums a row differently by its place in the block, so that equal rows
    score a few ulps apart and the tie is broken by the arithmetic rather than by id."""
    return torch.randint(-3, 4, (d,), generator=r).to(dtype)


def unpack(q) -> torch.Tensor:
    """Codes of a QuantizedTensor as int64 in the (B, H, T, D) layout."""
    pw = 32 // q.bits
    shifts = torch.arange(pw, dtype=torch.int32) * q.bits
    p = q.packed.cpu()
    if q.axis == "token":
        c = (p.transpose(-1, -2)[..., None] >> shifts) & ((1 << q.bits) - 1)
        return c.reshape(*c.shape[:-2], -1).transpose(-1, -2).long()
    c = (p[..., None] >> shifts) & ((1 << q.bits) - 1)
    return c.reshape(*c.shape[:-2], -1).long()


def step_of(q) -> torch.Tensor:
    """The effective quantization step of every element (8-bit metadata: code x super-scale)."""
    s = kv_quant.effective_meta(_cpu(q))[0]
    return s.repeat_interleave(q.group_size, dim=-2 if q.axis == "token" else -1)


# ------------------------------------------------------------------------------------- quantize
# (B, H, T, D, group): rows/columns of 48 and 80 are not multiples of the kernel's 32-row block
QUANT_SHAPES = [(1, 1, 32, 32, 32), (2, 3, 64, 64, 32), (1, 2, 48, 80, 16), (1, 1, 96, 48, 16)]


@pytest.mark.parametrize("meta_bits", [16, 8])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_pack_matches_reference(bits, axis, shape, meta_bits):
    b, h, t, d, g = shape
    x = (torch.randn(b, h, t, d, generator=gen(sum(shape) + bits)) * 2.5 + 0.7).to(DEVICE)
    x[..., 0] *= 20  # an outlier channel, as keys have
    fn = kv_quant.quantize_keys if axis == "token" else kv_quant.quantize_values
    got = fn(x, bits, g, meta_bits=meta_bits, backend="triton")
    ref = fn(x.cpu(), bits, g, meta_bits=meta_bits, backend="torch")
    assert got.packed.dtype == torch.int32
    assert got.packed.shape == ref.packed.shape and got.scale.shape == ref.scale.shape
    assert torch.equal(got.scale.cpu(), ref.scale) and torch.equal(got.minimum.cpu(), ref.minimum)
    if meta_bits == 8:
        assert got.scale.dtype == torch.uint8 and got.sup.shape == (b, h, t // g, 3)
        assert torch.equal(got.sup.cpu(), ref.sup)
        # measured bytes = the formula: codes + 8-bit scale/minimum + 3 fp16 per (head, token group)
        assert got.nbytes() * 8 == b * h * t * d * kv_quant.bits_per_element(bits, g, d, 8)
    else:
        assert got.nbytes() * 8 == b * h * t * d * kv_quant.bits_per_element(bits, g, d, 16)
    diff = (unpack(got) - unpack(ref)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3
    err = (kv_quant.dequantize(got, torch.float32, backend="torch").cpu() - x.cpu()).abs()
    assert (err <= 0.5 * step_of(got) * (1 + 1e-4) + 1e-6).all(), float((err / step_of(got)).max())


@pytest.mark.parametrize("meta_bits", [16, 8])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_dequantize_kernel_matches_reference(bits, axis, meta_bits):
    x = torch.randn(1, 2, 64, 48, generator=gen(bits)).to(DEVICE)
    fn = kv_quant.quantize_keys if axis == "token" else kv_quant.quantize_values
    q = fn(x, bits, 16, meta_bits=meta_bits, backend="torch")
    got = kv_quant.dequantize(q, torch.float32, backend="triton").cpu()
    ref = kv_quant.dequantize(q, torch.float32, backend="torch").cpu()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert kv_quant.dequantize(q, torch.float16, backend="triton").dtype == torch.float16


@pytest.mark.parametrize("meta_bits", [16, 8])
def test_constant_group_keeps_its_value(meta_bits):
    # zero range: the minimum is stored rounded down (to fp16, by |x| * 2**-10), the step covers the gap
    x = torch.full((1, 1, 32, 32), 3.25, device=DEVICE)
    for fn in (kv_quant.quantize_keys, kv_quant.quantize_values):
        q = fn(x, 2, 32, meta_bits=meta_bits, backend="triton")
        err = (kv_quant.dequantize(q, torch.float32, backend="torch").cpu() - 3.25).abs()
        assert err.max() <= 3.25 * 2**-10, float(err.max())


def test_8bit_metadata_costs_half_and_keeps_the_error_close():
    """meta_bits=8: about half the metadata bytes; the effective step is at most a few % coarser."""
    x = torch.randn(1, 3, 256, 64, generator=gen(11)) * 2
    x[..., 3] = x[..., 3] * 15 + 4  # outlier channel with an offset
    for fn in (kv_quant.quantize_keys, kv_quant.quantize_values):
        for bits in (2, 4):
            a = fn(x.to(DEVICE), bits, 32, backend="triton")
            b = fn(x.to(DEVICE), bits, 32, meta_bits=8, backend="triton")
            meta_a = a.nbytes() - a.packed.numel() * 4
            meta_b = b.nbytes() - b.packed.numel() * 4
            assert meta_b < 0.53 * meta_a
            ea = (kv_quant.dequantize(a, backend="torch").cpu() - x).pow(2).mean()
            eb = (kv_quant.dequantize(b, backend="torch").cpu() - x).pow(2).mean()
            assert eb < 1.25 * ea, (fn.__name__, bits, float(ea), float(eb))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nearest_meta_round_matches_reference(bits, axis, shape):
    """meta_round="nearest": kernel and reference give identical 8-bit codes and super-scales; the effective
    minimum is within half a minimum step of the group's own, the effective scale within half a scale step of
    its own range / qmax, and every element within the loosened bound of the docstring."""
    b, h, t, d, g = shape
    qmax = (1 << bits) - 1
    x = (torch.randn(b, h, t, d, generator=gen(sum(shape) + 3 * bits)) * 2.5 + 0.7).to(DEVICE)
    x[..., 0] *= 20
    fn = kv_quant.quantize_keys if axis == "token" else kv_quant.quantize_values
    got = fn(x, bits, g, meta_bits=8, meta_round="nearest", backend="triton")
    ref = fn(x.cpu(), bits, g, meta_bits=8, meta_round="nearest", backend="torch")
    cover = fn(x.cpu(), bits, g, meta_bits=8, backend="torch")
    assert torch.equal(got.scale.cpu(), ref.scale) and torch.equal(got.minimum.cpu(), ref.minimum)
    assert torch.equal(got.sup.cpu(), ref.sup)
    assert not torch.equal(ref.minimum, cover.minimum)  # the option changes the codes
    assert got.nbytes() == cover.nbytes()  # and not the bytes
    diff = (unpack(got) - unpack(ref)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3
    # the group's own minimum and range, in the layout of the scale/minimum codes
    xc = x.cpu().float()
    if axis == "token":
        xg = xc.transpose(-1, -2).reshape(b, h, d, t // g, g)
        mn, mx = xg.amin(-1).transpose(-1, -2), xg.amax(-1).transpose(-1, -2)
        sup = ref.sup.float()
    else:
        xg = xc.reshape(b, h, t, d // g, g)
        mn, mx = xg.amin(-1), xg.amax(-1)
        sup = ref.sup.float().repeat_interleave(g, dim=2)
    sstep, mstep = sup[..., 0:1], sup[..., 2:3]
    se, me = kv_quant.effective_meta(ref)
    tol = 1e-5 * (mn.abs() + mx.abs()) + 1e-6
    assert ((me - mn).abs() <= mstep / 2 + tol).all()
    assert ((se - (mx - mn) / qmax).abs() <= sstep / 2 * (1 + 1e-3) + tol).all()
    bound = se / 2 + mstep / 2 + qmax * sstep / 2 + tol  # per group
    rep = (lambda z: z.repeat_interleave(g, dim=-2)) if axis == "token" else (lambda z: z.repeat_interleave(g, dim=-1))
    err = (kv_quant.dequantize(got, torch.float32, backend="torch").cpu() - xc).abs()
    assert (err <= rep(bound)).all(), float((err - rep(bound)).max())


def test_nearest_meta_round_lowers_the_error():
    """With an outlier channel the 'cover' rounding coarsens the step of small-range groups (scale code rounded
    up by up to one super-step); rounding to nearest brings the error back near fp16 metadata."""
    x = torch.randn(1, 3, 256, 64, generator=gen(12)) * 2
    x[..., 3] = x[..., 3] * 15 + 4
    for fn in (kv_quant.quantize_keys, kv_quant.quantize_values):
        for bits in (2, 4):
            e = {}
            for name, kw in (("fp16", {}), ("cover", dict(meta_bits=8)),
                             ("nearest", dict(meta_bits=8, meta_round="nearest"))):
                q = fn(x.to(DEVICE), bits, 32, backend="triton", **kw)
                e[name] = float((kv_quant.dequantize(q, backend="torch").cpu() - x).pow(2).mean())
            assert e["nearest"] < e["cover"] and e["nearest"] < 1.02 * e["fp16"], (fn.__name__, bits, e)
    with pytest.raises(ValueError, match="meta_round"):
        kv_quant.quantize_keys(x, 4, 32, meta_bits=8, meta_round="up")


def test_hadamard_is_orthonormal_and_symmetric():
    for d in (1, 2, 16, 64, 128):
        h = kv_quant.hadamard(d)
        torch.testing.assert_close(h @ h, torch.eye(d), atol=1e-6, rtol=0)
        assert torch.equal(h, h.T) and (h.abs() == d**-0.5).all()
    for d in (0, 48, 80):
        with pytest.raises(ValueError, match="power-of-two"):
            kv_quant.hadamard(d)


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        G.quantize_keys(torch.zeros(1, 1, 40, 32), 4, 32)
    with pytest.raises(ValueError, match="multiple of group_size"):
        G.quantize_values(torch.zeros(1, 1, 32, 48), 4, 32)
    with pytest.raises(ValueError, match="bits"):
        G.quantize_keys(torch.zeros(1, 1, 32, 32), 3, 32)
    with pytest.raises(ValueError, match="meta_bits=8 needs whole groups of tokens"):
        G.quantize_values(torch.zeros(1, 1, 48, 32), 4, 32, meta_bits=8)


@pytest.mark.parametrize("meta_bits", [16, 8])
def test_inconsistent_quantized_tensors_cannot_be_made(meta_bits):
    """A QuantizedTensor whose tensors do not fit its shape, bits or group size cannot be made (the kernels
    trust it: on a GPU a short ``packed`` would be read past its end), and a made one cannot be changed, so
    dequantize and the decode attention need not check it on every call."""
    x = torch.randn(1, 2, 64, 64, generator=gen(5)).to(DEVICE)
    kq, vq = G.quantize_keys(x, meta_bits=meta_bits), G.quantize_values(x, meta_bits=meta_bits)
    for q in (kq, vq, kv_quant.to_mma_order(kq) if meta_bits == 16 else kq):
        assert q.validate() is q
    broken = {
        "packed is": dict(packed=kq.packed[:, :, :4]),
        "scale is": dict(scale=kq.scale[:, :1]),
        "minimum is": dict(minimum=kq.minimum[..., :32]),
        "expected \\(1, 2, 1, 64\\)": dict(group_size=64),
        "packed is torch.int32 \\(1, 2, 8, 64\\)": dict(bits=2),
        "order 'warp'": dict(order="warp"),
        "shape must be": dict(shape=(2, 64, 64)),
        "different devices": dict(scale=kq.scale.to("meta")),
    }
    if meta_bits == 8:
        broken["sup is"] = dict(sup=kq.sup[:, :, :1])
    for match, change in broken.items():
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(kq, **change)
        with pytest.raises(ValueError, match=match):
            kv_quant.QuantizedTensor(**{**{f.name: getattr(kq, f.name) for f in dataclasses.fields(kq)}, **change})
    with pytest.raises(dataclasses.FrozenInstanceError):
        kq.packed = kq.packed[:, :, :4]
    # a tensor resized in place behind its back is still caught by an explicit check
    kq.packed.resize_(1, 2, 4, 64)
    with pytest.raises(ValueError, match="packed is"):
        kq.validate()


# ------------------------------------------------------------------------------ decode attention
# (B, Hq, Hkv, Tq, Tr, D, key bits, value bits, group, splits)
DECODE_CASES = [
    (1, 3, 3, 64, 5, 64, 4, 4, 32, None),     # SmolLM2's head layout, short window
    (1, 9, 3, 96, 33, 64, 2, 2, 32, 3),       # GQA 3:1, window not a multiple of the token block
    (1, 4, 1, 0, 17, 32, 4, 4, 32, None),     # window only (before the first flush)
    (1, 2, 2, 64, 0, 128, 2, 4, 32, 2),       # quantized only, mixed key/value bits
    (1, 6, 2, 48, 40, 80, 4, 2, 16, 4),       # head size 80 (padded to 128 in the kernel), 4 splits
]
# the same with 8-bit scale/minimum codes (meta_bits=8)
DECODE_CASES_DQ = [DECODE_CASES[0], DECODE_CASES[1], DECODE_CASES[3], DECODE_CASES[4]]


@pytest.mark.parametrize(
    "case,dtype,meta_bits",
    [(c, torch.float32, 16) for c in DECODE_CASES] + [(c, torch.float16, 16) for c in DECODE_CASES[:2]]
    + [(c, torch.float32, 8) for c in DECODE_CASES_DQ] + [(DECODE_CASES[1], torch.float16, 8)]
    + [(c, torch.bfloat16, 16) for c in (DECODE_CASES[0], DECODE_CASES[1], DECODE_CASES[4])],
    ids=lambda c: "-".join(map(str, c)) if isinstance(c, tuple) else str(c).replace("torch.", ""),
)
def test_decode_attention_matches_reference(case, dtype, meta_bits):
    b, hq, hkv, tq, tr, d, bk, bv, g, splits = case
    r = gen(hash(case) % 1000)
    q = torch.randn(b, hq, d, generator=r).to(DEVICE, dtype)
    kq = vq = None
    if tq:
        k = torch.randn(b, hkv, tq, d, generator=r) * 2
        v = torch.randn(b, hkv, tq, d, generator=r)
        kq = kv_quant.quantize_keys(k.to(DEVICE, dtype), bk, g, meta_bits=meta_bits)
        vq = kv_quant.quantize_values(v.to(DEVICE, dtype), bv, g, meta_bits=meta_bits)
        assert kq.meta_bits == meta_bits
    k_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE, dtype)
    v_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE, dtype)
    got = G.kivi_decode_attention(q, kq, vq, k_res, v_res, num_splits=splits, backend="triton")
    ref = G.kivi_decode_attention_ref(q.cpu(), _cpu(kq), _cpu(vq), k_res.cpu(), v_res.cpu())
    assert got.shape == (b, hq, d) and got.dtype == dtype
    tol, rtol = {torch.float32: (2e-5, 0), torch.float16: (4e-3, 0), torch.bfloat16: (1e-2, 2e-2)}[dtype]
    torch.testing.assert_close(got.float().cpu(), ref.float(), atol=tol, rtol=rtol)


@pytest.mark.parametrize("block_t,unpack", [(16, "expand"), (64, "expand"), (128, "expand"), (64, "gather"),
                                            (16, "join"), (64, "join"), (128, "join")])
@pytest.mark.parametrize("case,meta_bits", [(DECODE_CASES[1], 16), (DECODE_CASES[4], 16), (DECODE_CASES[1], 8),
                                            ((1, 4, 2, 64, 8, 64, 8, 8, 32, 2), 16)],
                         ids=["gqa-2bit", "d80-g16", "gqa-2bit-m8", "8bit"])
def test_decode_attention_tiles(case, meta_bits, block_t, unpack):
    """Every tile size and every way of unpacking (codes split in the loading thread, spread through a
    reshape, or one gather per element) agree:
    tiles larger or smaller than a group, several word rows per tile, tails shorter than a tile."""
    b, hq, hkv, tq, tr, d, bk, bv, g, splits = case
    r = gen(block_t + meta_bits)
    q = torch.randn(b, hq, d, generator=r)
    kq = kv_quant.quantize_keys((torch.randn(b, hkv, tq + 64, d, generator=r) * 2).to(DEVICE), bk, g,
                                meta_bits=meta_bits)
    vq = kv_quant.quantize_values(torch.randn(b, hkv, tq + 64, d, generator=r).to(DEVICE), bv, g, meta_bits=meta_bits)
    k_res = torch.randn(b, hkv, tr, d, generator=r)
    v_res = torch.randn(b, hkv, tr, d, generator=r)
    got = G.kivi_decode_attention(q.to(DEVICE), kq, vq, k_res.to(DEVICE), v_res.to(DEVICE), num_splits=splits,
                                  block_t=block_t, unpack=unpack, backend="triton")
    ref = G.kivi_decode_attention_ref(q, _cpu(kq), _cpu(vq), k_res, v_res)
    torch.testing.assert_close(got.cpu(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("meta_bits", [16, 8])
def test_decode_attention_prefetch_changes_nothing(meta_bits):
    """Fetching each tile's scales and minimums (the default), or also its packed words, one tile ahead
    gives the same result as fetching them with the tile, at a tail shorter than a tile and across several
    splits."""
    b, hq, hkv, tq, tr, d, bk, bv, g, splits = DECODE_CASES[1]
    r = gen(77 + meta_bits)
    q = torch.randn(b, hq, d, generator=r).to(DEVICE)
    kq = kv_quant.quantize_keys((torch.randn(b, hkv, tq + 32, d, generator=r) * 2).to(DEVICE), bk, g, meta_bits=meta_bits)
    vq = kv_quant.quantize_values(torch.randn(b, hkv, tq + 32, d, generator=r).to(DEVICE), bv, g, meta_bits=meta_bits)
    k_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE)
    v_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE)
    got = [G.kivi_decode_attention(q, kq, vq, k_res, v_res, num_splits=splits, block_t=32, prefetch=pf,
                                   num_stages=1 if pf == "all" else None, backend="triton").cpu()
           for pf in ("meta", "none", "all")]
    torch.testing.assert_close(got[0], got[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[2], got[1], atol=1e-6, rtol=0)
    ref = G.kivi_decode_attention_ref(q.cpu(), _cpu(kq), _cpu(vq), k_res.cpu(), v_res.cpu())
    torch.testing.assert_close(got[0], ref, atol=2e-5, rtol=0)


def _slot(c: int, bits: int) -> int:
    """The bit slot of code c = i0 + 2 i1 + ... in an mma-ordered word: codes 2 m and 2 m + 1 (a register
    pair of the dot operand) sit in the low and the high half at the same offset (4-bit: 0 2 4 6 1 3 5 7)."""
    return (16 // bits) * (c & 1) + (c >> 1)


def test_mma_slots_pair_the_halves():
    assert [_slot(c, 4) for c in range(8)] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert [int(x) for x in kv_quant._slot_codes(4, "cpu")] == [0, 2, 4, 6, 1, 3, 5, 7]
    assert [_slot(int(c), 2) for c in kv_quant._slot_codes(2, "cpu")] == list(range(16))


@pytest.mark.parametrize("bits,d,t", [(4, 32, 32), (4, 64, 96), (4, 128, 64), (2, 64, 96), (2, 128, 64)])
def test_mma_order_layout_and_roundtrip(bits, d, t):
    """to_mma_order's layout, checked code by code with its own index arithmetic. In a 32-element block, code
    c' of word j is element 4 j + (c' & 3) + 16 (c' >> 2), in bit slot _slot(c). 4-bit: key word (token, j * D / 32 + b) holds
    channels 32 b + ..., value word (row 4 a + j, channel) tokens 32 a + .... 2-bit: code c = c' + 8 i; key
    row 8 u + l holds tokens 16 u + l + 8 i, value word 8 p + l holds channels 16 p + l + 8 i.
    from_mma_order gives back the KIVI words exactly."""
    r = gen(d + t + bits)
    x = torch.randn(2, 3, t, d, generator=r)
    kq, vq = kv_quant.quantize_keys(x, bits, 32, backend="torch"), kv_quant.quantize_values(x, bits, 32, backend="torch")
    kc = kv_quant._unpack_last_ref(kq.packed.transpose(-1, -2), bits).transpose(-1, -2).long()  # (B, H, T, D)
    vc = kv_quant._unpack_last_ref(vq.packed, bits).long()
    km, vm = kv_quant.to_mma_order(kq), kv_quant.to_mma_order(vq)
    assert km.order == vm.order == "mma" and km.nbytes() == kq.nbytes() and vm.nbytes() == vq.nbytes()
    kwords = km.packed.long() & 0xFFFFFFFF
    vwords = vm.packed.long() & 0xFFFFFFFF
    per, mask, nb = 32 // bits, (1 << bits) - 1, d // 32
    for c in range(per):
        cc, i = c % 8, c // 8
        e = (cc & 3) + 16 * (cc >> 2)
        for j in range(4):
            for b_ in range(nb):
                got = (kwords[..., j * nb + b_] >> (bits * _slot(c, bits))) & mask  # (B, H, key rows)
                if bits == 4:
                    want = kc[..., 32 * b_ + 4 * j + e]
                else:
                    rows = torch.arange(t // 2)
                    want = kc[:, :, 16 * (rows // 8) + rows % 8 + 8 * i, 32 * b_ + 4 * j + e]
                assert torch.equal(got, want), (c, j, b_)
            for a in range(t // 32):
                got = (vwords[:, :, 4 * a + j, :] >> (bits * _slot(c, bits))) & mask  # (B, H, value columns)
                if bits == 4:
                    want = vc[:, :, 32 * a + 4 * j + e, :]
                else:
                    cols = torch.arange(d // 2)
                    want = vc[:, :, 32 * a + 4 * j + e, 16 * (cols // 8) + cols % 8 + 8 * i]
                assert torch.equal(got, want), (c, j, a)
    for q, m in ((kq, km), (vq, vm)):
        back = kv_quant.from_mma_order(m)
        assert back.order == "kivi" and torch.equal(back.packed, q.packed)
        assert torch.equal(kv_quant.dequantize(m, backend="torch"), kv_quant.dequantize(q, backend="torch"))
    with pytest.raises(ValueError, match="mma order"):
        kv_quant.to_mma_order(kv_quant.quantize_keys(x, 8, 32, backend="torch"))
    with pytest.raises(ValueError, match="mma order"):
        kv_quant.to_mma_order(kv_quant.quantize_values(torch.randn(1, 1, 48, 32), 4, 16, backend="torch"))


# (B, Hq, Hkv, Tq, Tr, D, group, splits, block_t, meta_bits, bits): caches the mma kernel takes
MMA_CASES = [
    (1, 3, 3, 64, 5, 64, 32, None, 64, 16, 4),    # SmolLM2's head layout
    (1, 9, 3, 96, 33, 64, 32, 3, 64, 16, 4),      # GQA 3:1, a tail of half a tile, window not a multiple of 64
    (2, 8, 2, 160, 40, 128, 32, 2, 128, 16, 4),   # 128-token tiles, head size 128, batch 2
    (1, 4, 1, 128, 0, 128, 64, 2, 64, 16, 4),     # groups larger than a tile's share of a thread
    (1, 4, 2, 96, 8, 64, 16, None, 64, 16, 4),    # groups of 16 tokens (values: 16 >= D / 4)
    (1, 9, 3, 96, 33, 64, 32, 3, 64, 8, 4),       # 8-bit scale/minimum codes
    (1, 9, 3, 96, 33, 64, 32, 3, 64, 16, 2),      # 2 bits: token pairs in key words, channel pairs in values
    (2, 8, 2, 160, 40, 128, 32, 2, 128, 8, 2),    # 2 bits, 128-token tiles, 8-bit metadata
    (1, 20, 1, 96, 7, 64, 32, None, 64, 16, 4),   # 20 query heads a kv head: 32-row tiles, queries via shared memory
    (1, 8, 1, 128, 7, 256, 64, None, 64, 16, 4),  # head size 256: a thread's eight key words in two loads
    (1, 8, 1, 128, 7, 256, 64, 2, 64, 16, 2),     # the same at 2 bits
]


@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_attention_mma_order_matches_reference(case):
    """The kernel for caches in tensor-core operand order (each thread dequantizes the words of its own
    mma fragments), with the queries in shared memory or in registers, against the float32 reference and
    against the KIVI-order kernel."""
    b, hq, hkv, tq, tr, d, g, splits, block_t, meta_bits, bits = case
    r = gen(sum(case[:7]) + bits)
    q = torch.randn(b, hq, d, generator=r).to(DEVICE, torch.float16)
    k = (torch.randn(b, hkv, tq, d, generator=r) * 2).to(DEVICE, torch.float16)
    v = torch.randn(b, hkv, tq, d, generator=r).to(DEVICE, torch.float16)
    kq = kv_quant.quantize_keys(k, bits, g, meta_bits=meta_bits)
    vq = kv_quant.quantize_values(v, bits, g, meta_bits=meta_bits)
    k_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE, torch.float16)
    v_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE, torch.float16)
    km, vm = kv_quant.to_mma_order(kq), kv_quant.to_mma_order(vq)
    ref = G.kivi_decode_attention_ref(q.cpu(), _cpu(kq), _cpu(vq), k_res.cpu(), v_res.cpu())
    for q_regs in (False, True):  # queries read from shared memory per tile, or held in their mma fragments
        got = G.kivi_decode_attention(q, km, vm, k_res, v_res, num_splits=splits, block_t=block_t,
                                      q_in_registers=q_regs, backend="triton")
        assert got.shape == (b, hq, d) and got.dtype == torch.float16
        torch.testing.assert_close(got.float().cpu(), ref.float(), atol=4e-3, rtol=0)
    kivi = G.kivi_decode_attention(q, kq, vq, k_res, v_res, num_splits=splits, backend="triton")
    torch.testing.assert_close(got.float().cpu(), kivi.float().cpu(), atol=4e-3, rtol=0)


def test_decode_attention_mma_order_falls_back_and_checks_orders():
    """A cache in mma order that the mma kernel cannot take (float32 queries here) is re-packed for the
    general kernel, with the same answer; keys and values in different orders are refused."""
    b, hq, hkv, tq, tr, d, g = 1, 4, 2, 64, 8, 64, 32
    r = gen(91)
    q = torch.randn(b, hq, d, generator=r).to(DEVICE)
    kq = kv_quant.quantize_keys(torch.randn(b, hkv, tq, d, generator=r).to(DEVICE), 4, g)
    vq = kv_quant.quantize_values(torch.randn(b, hkv, tq, d, generator=r).to(DEVICE), 4, g)
    k_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE)
    v_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE)
    km, vm = kv_quant.to_mma_order(kq), kv_quant.to_mma_order(vq)
    got = G.kivi_decode_attention(q, km, vm, k_res, v_res, backend="triton")
    want = G.kivi_decode_attention(q, kq, vq, k_res, v_res, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="order"):
        G.kivi_decode_attention(q, km, vq, k_res, v_res, backend="triton")


@pytest.mark.parametrize("d,t", [(64, 96), (128, 64)])
def test_mma_w_value_layout_and_roundtrip(d, t):
    """to_mma_order(values, warps=True), checked code by code with its own index arithmetic: code
    i0 + 2 i1 + 4 i2 of word (row 4 s + kl, word nl * D / 16 + j), in bit slot _slot(c), holds token 16 s + 4 kl + 2 i1 + i0 and
    channel D / 8 * nl + 2 j + i2. from_mma_order gives back the KIVI words; what it cannot hold is refused."""
    r = gen(d + t + 7)
    x = torch.randn(2, 3, t, d, generator=r)
    vq = kv_quant.quantize_values(x, 4, 32, backend="torch")
    vc = kv_quant._unpack_last_ref(vq.packed, 4).long()  # (B, H, T, D)
    vw = kv_quant.to_mma_order(vq, warps=True)
    assert vw.order == "mma_w" and vw.nbytes() == vq.nbytes() and vw.packed.shape[-2:] == (t // 4, d // 2)
    words = vw.packed.long() & 0xFFFFFFFF
    nj = d // 16
    for s_ in range(t // 16):
        for kl in range(4):
            for nl in range(8):
                for j in range(nj):
                    for c in range(8):
                        tok = 16 * s_ + 4 * kl + 2 * ((c >> 1) & 1) + (c & 1)
                        chan = d // 8 * nl + 2 * j + (c >> 2)
                        got = (words[:, :, 4 * s_ + kl, nl * nj + j] >> (4 * _slot(c, 4))) & 15
                        assert torch.equal(got, vc[:, :, tok, chan]), (s_, kl, nl, j, c)
    back = kv_quant.from_mma_order(vw)
    assert back.order == "kivi" and torch.equal(back.packed, vq.packed)
    assert torch.equal(kv_quant.dequantize(vw, backend="torch"), kv_quant.dequantize(vq, backend="torch"))
    for bad in (kv_quant.quantize_keys(x, 4, 32, backend="torch"), kv_quant.quantize_values(x, 2, 32, backend="torch"),
                kv_quant.quantize_values(torch.randn(1, 1, 32, 256), 4, 32, backend="torch")):
        with pytest.raises(ValueError, match="mma_w"):
            kv_quant.to_mma_order(bad, warps=True)


# (B, Hq, Hkv, Tq, Tr, D, group, splits, meta_bits): caches the warps kernel takes
WARPS_CASES = [
    (1, 4, 1, 128, 32, 128, 32, None, 16),  # head size 128, GQA 4
    (2, 8, 2, 96, 0, 64, 32, 2, 16),        # head size 64, no window; the second split's tile is half empty
    (1, 9, 3, 160, 17, 64, 16, 3, 8),       # groups of 16, 8-bit metadata, three splits, a ragged window
    (1, 16, 1, 64, 5, 128, 64, None, 16),   # 16 query heads a kv head, groups of 64
    (1, 4, 1, 224, 3, 128, 32, 1, 16),      # one split: 3 whole tiles (unmasked loop), then a masked half tile
    (1, 6, 2, 256, 8, 64, 16, 2, 16),       # groups of 16 at head size 64, 16-bit scales
    (1, 8, 1, 256, 0, 128, 128, 1, 16),     # groups of 128 tokens and channels
]


# the warps kernel's knob settings (decode_attention.WARPS_*): key scales each thread's own (registers) or
# spread through shared memory, scales a tile ahead or at their tile, P V as (V^T P^T)^T, scores as K Q^T (with
# P^T transposed by Triton or, GPU only, by movmatrix), the loop unrolled by two, the keys' codes as fp16
# subnormals with their scales folded into Q^T and their minimums as score offsets, and (GPU only) Triton's
# pipeline moving loads to cp.async copies. Each: (key scales in registers, scales a tile ahead, swap P V,
# swap Q K, movmatrix, unroll by 2, fold keys, Triton pipeline stages)
WARPS_SETTINGS = {
    "key-scales-in-registers": (True, True, False, False, False, False, False, 1),
    "key-scales-via-shared": (False, True, False, False, False, False, False, 1),
    "scales-at-their-tile": (True, False, False, False, False, False, False, 1),
    "scales-at-their-tile-swapped-pv": (True, False, True, False, False, False, False, 1),
    "key-scales-via-shared-swapped-pv": (False, True, True, False, False, False, False, 1),
    "key-scales-via-shared-swapped-qk": (False, True, True, True, False, False, False, 1),
    "scales-at-their-tile-swapped-qk": (True, False, False, True, False, False, False, 1),
    "swapped-qk-unrolled": (False, True, True, True, False, True, False, 1),
    "swapped-pv-unrolled": (True, True, True, False, False, True, False, 1),
    "swapped-qk-movmatrix": (False, True, True, True, True, False, False, 1),
    "swapped-qk-folded-keys": (False, True, True, True, False, False, True, 1),
    "folded-keys-unrolled": (False, True, True, True, False, True, True, 1),
    "folded-keys-3-stages": (False, True, True, True, False, False, True, 3),
}


@pytest.mark.parametrize("setting", WARPS_SETTINGS)
@pytest.mark.parametrize("case", WARPS_CASES, ids=lambda c: "-".join(map(str, c)))
def test_decode_attention_warps_kernel_matches_reference(case, setting, kernel_launches, monkeypatch):
    """Keys in mma order and values in mma_w order go to the kernel that gives each warp its own 16 tokens
    of a tile (a batched dot; the warps merge once at the end): it runs, and it matches the float32
    reference and the KIVI-order kernel, splits with warps that see no token included, in every knob
    setting (``WARPS_SETTINGS``)."""
    key_meta_regs, meta_ahead, swap_pv, swap_qk, movm, unroll2, fold, stages = WARPS_SETTINGS[setting]
    if (movm or stages > 1) and DEVICE == "cpu":
        pytest.skip("movmatrix is PTX and the interpreter has no pipeline: there this is a setting above")
    b, hq, hkv, tq, tr, d, g, splits, meta_bits = case
    da = import_module(G.__name__ + ".decode_attention")
    monkeypatch.setattr(da, "WARPS_KEY_META_IN_REGISTERS", key_meta_regs)
    monkeypatch.setattr(da, "WARPS_META_AHEAD", meta_ahead)
    monkeypatch.setattr(da, "WARPS_SWAP_PV", swap_pv)
    monkeypatch.setattr(da, "WARPS_SWAP_QK", swap_qk)
    monkeypatch.setattr(da, "WARPS_MOVMATRIX", movm)
    monkeypatch.setattr(da, "WARPS_UNROLL2", unroll2)
    monkeypatch.setattr(da, "WARPS_FOLD_KEYS", fold)
    monkeypatch.setattr(da, "WARPS_NUM_STAGES", stages)
    launched = kernel_launches(da, "_kivi_decode_warps_kernel")
    r = gen(sum(case[:7]) + meta_bits)
    q = torch.randn(b, hq, d, generator=r).to(DEVICE, torch.float16)
    k = (torch.randn(b, hkv, tq, d, generator=r) * 2).to(DEVICE, torch.float16)
    v = torch.randn(b, hkv, tq, d, generator=r).to(DEVICE, torch.float16)
    kq = kv_quant.quantize_keys(k, 4, g, meta_bits=meta_bits)
    vq = kv_quant.quantize_values(v, 4, g, meta_bits=meta_bits)
    k_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE, torch.float16)
    v_res = torch.randn(b, hkv, tr, d, generator=r).to(DEVICE, torch.float16)
    km, vw = kv_quant.to_mma_order(kq), kv_quant.to_mma_order(vq, warps=True)
    ref = G.kivi_decode_attention_ref(q.cpu(), _cpu(kq), _cpu(vq), k_res.cpu(), v_res.cpu())
    got = G.kivi_decode_attention(q, km, vw, k_res, v_res, num_splits=splits, backend="triton")
    # 8-bit scales: the kernel is not trusted with them (wrong on an H200); the cache goes the general way
    runs = 1 if meta_bits == 16 else 0
    assert len(launched) == runs and got.shape == (b, hq, d) and got.dtype == torch.float16
    torch.testing.assert_close(got.float().cpu(), ref.float(), atol=4e-3, rtol=0)
    kivi = G.kivi_decode_attention(q, kq, vq, k_res, v_res, num_splits=splits, backend="triton")
    torch.testing.assert_close(got.float().cpu(), kivi.float().cpu(), atol=4e-3, rtol=0)
    # float32 queries: the kernel does not take them, the cache is re-packed for the general kernel
    got32 = G.kivi_decode_attention(q.float(), km, vw, k_res.float(), v_res.float(), num_splits=splits,
                                    backend="triton")
    assert len(launched) == runs
    torch.testing.assert_close(got32.cpu(), ref.float(), atol=4e-3, rtol=0)
    with pytest.raises(ValueError, match="order"):  # values in mma_w order need keys in mma order
        G.kivi_decode_attention(q, kq, vw, k_res, v_res, backend="triton")


def test_warps_kernel_folds_the_keys_only_where_subnormals_multiply_exactly(monkeypatch):
    """WARPS_FOLD_KEYS feeds the keys' codes to the dot as fp16 subnormals. A probe dot decides once a device
    whether that is exact; the decode is right either way: folded where the probe passes, the keys
    dequantized as before where it fails. The probe itself says no when the dot loses the subnormals."""
    da = import_module(G.__name__ + ".decode_attention")
    dev = torch.device(DEVICE)
    key = (dev.type, dev.index)
    monkeypatch.setattr(da, "_SUBNORMAL_DOT", {})
    # the interpreter's dot is exact; on a GPU this is the tensor cores' answer
    assert da.subnormal_dot_ok(dev), "fp16 subnormals lost in the dot: the folded keys are off on this device"
    r = gen(11)
    q = torch.randn(2, 8, 128, generator=r).to(DEVICE, torch.float16)
    k = (torch.randn(2, 2, 192, 128, generator=r) * 2).to(DEVICE, torch.float16)
    v = torch.randn(2, 2, 192, 128, generator=r).to(DEVICE, torch.float16)
    kq, vq = kv_quant.quantize_keys(k, 4, 32), kv_quant.quantize_values(v, 4, 32)
    km, vw = kv_quant.to_mma_order(kq), kv_quant.to_mma_order(vq, warps=True)
    k_res = torch.randn(2, 2, 5, 128, generator=r).to(DEVICE, torch.float16)
    ref = G.kivi_decode_attention_ref(q.cpu(), _cpu(kq), _cpu(vq), k_res.cpu(), k_res.cpu())
    got = G.kivi_decode_attention(q, km, vw, k_res, k_res, backend="triton")
    assert da.LAST_LAUNCH["fold_keys"] is True
    torch.testing.assert_close(got.float().cpu(), ref.float(), atol=4e-3, rtol=0)
    # value scales in the plain (token-major) layout rather than token-contiguous: the same result
    plain = dataclasses.replace(vw, scale=vw.scale.contiguous(), minimum=vw.minimum.contiguous())
    assert vw.scale.stride(2) == 1 and plain.scale.stride(2) != 1
    got = G.kivi_decode_attention(q, km, plain, k_res, k_res, backend="triton")
    torch.testing.assert_close(got.float().cpu(), ref.float(), atol=4e-3, rtol=0)
    da._SUBNORMAL_DOT[key] = False  # a device whose dot flushes them
    got = G.kivi_decode_attention(q, km, vw, k_res, k_res, backend="triton")
    assert da.LAST_LAUNCH["fold_keys"] is False
    torch.testing.assert_close(got.float().cpu(), ref.float(), atol=4e-3, rtol=0)

    class Flushing:  # a dot that flushes subnormal inputs to zero
        def __getitem__(self, grid):
            def launch(a, b, c, **kw):
                c.copy_(torch.zeros_like(a, dtype=torch.float32) @ b.float())
            return launch

    da._SUBNORMAL_DOT.clear()
    monkeypatch.setattr(da, "_subnormal_dot_probe_kernel", Flushing())
    assert not da.subnormal_dot_ok(dev)


@pytest.mark.parametrize("meta_bits", [16, 8])
def test_key_score_offsets_are_minimums_dot_queries(meta_bits):
    """The folded keys' offsets (a Triton kernel): each token group's effective key minimums . each query
    head of its GQA group, zero past the group's heads, for 16-bit and 8-bit scales."""
    da = import_module(G.__name__ + ".decode_attention")
    r = gen(meta_bits)
    q = torch.randn(2, 6, 128, generator=r).to(DEVICE, torch.float16)
    k = (torch.randn(2, 2, 96, 128, generator=r) * 2).to(DEVICE, torch.float16)
    kq = kv_quant.quantize_keys(k, 4, 32, meta_bits=meta_bits)
    got = da.key_score_offsets(kq, q).cpu()
    mins = kv_quant.effective_meta(_cpu(kq))[1]  # (B, Hkv, T / G, D)
    want = torch.einsum("bhgd,bhrd->bhgr", mins.double(), q.cpu().double().reshape(2, 2, 3, 128))
    assert got.shape == (2, 2, 3, 8) and torch.all(got[..., 3:] == 0)
    torch.testing.assert_close(got[..., :3].double(), want, atol=1e-3, rtol=1e-4)


def test_decode_occupancy_from_registers_shared_memory_and_threads():
    """Programs an SM holds (what the default split count plans waves with): the warps kernel at 168
    registers fits three of its 4-warp programs, at 198-200 two, at 128 four; shared memory and the thread
    limit cap it too (the fourth session's Nsight run: 168 registers, 36.9 KB -> 3)."""
    da = import_module(G.__name__ + ".decode_attention")
    assert [da.occupancy(r, 1024, 4) for r in (168, 198, 200, 128, 255)] == [3, 2, 2, 4, 2]
    assert da.occupancy(168, 37_748, 4) == 3
    assert da.occupancy(32, 60_000, 4) == 3  # shared memory: 233,472 // 61,024
    assert da.occupancy(16, 0, 4) == 16  # threads: 2,048 // 128
    assert da.occupancy(255, 0, 8) == 1


def test_decode_split_count_fills_whole_waves():
    """The default split count on a GPU (``wave_splits``): as many programs as fill whole waves of the slots
    (programs an SM x SMs), each wave as short as it can be, never more splits than allowed."""
    da = import_module(G.__name__ + ".decode_attention")
    # B 32 x 8 kv heads over 16K tokens: three programs an SM on 132 SMs (396 slots) -> 3 splits, 768
    # programs in 1.94 waves (2 would leave the second wave 29% full); two an SM (264) -> 1 split, 256 programs
    assert da.wave_splits(256, 16384, 396, 64) == 3
    assert da.wave_splits(256, 16384, 264, 64) == 1
    # one sequence, 8 kv heads: up to 49 splits fit one wave; 47 give the same 704-token chunks (whole
    # 64-token tiles) with fewer programs; never more than `most`
    assert da.wave_splits(8, 32768, 396, 128) == 47
    assert da.wave_splits(8, 32768, 396, 16) == 16
    assert da.wave_splits(1, 64, 396, 1) == 1


@functools.cache
def _bench(name: str):
    """``benches/<name>.py`` loaded as a module (once)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benches" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=400, deadline=None)
@given(heads=st.integers(1, 2048), tokens=st.integers(1, 300_000), slots=st.integers(1, 1100),
       most=st.integers(0, 1200), block_t=st.sampled_from([16, 32, 64, 128]), overhead=st.integers(0, 512))
def test_wave_splits_matches_trying_every_split_count(heads, tokens, slots, most, block_t, overhead):
    """The quick wave_splits (only the split counts that can win) picks what trying every count picks."""
    da = import_module(G.__name__ + ".decode_attention")
    every_count = _bench("gpu_host").wave_splits_every_count  # (its definition as it first ran)
    assert da.wave_splits(heads, tokens, slots, most, block_t, overhead) == \
        every_count(heads, tokens, slots, most, block_t, overhead)


def test_decode_attention_rejects_bad_tuning_knobs():
    q = torch.zeros(1, 2, 32, device=DEVICE)
    k_res = torch.zeros(1, 2, 4, 32, device=DEVICE)
    for bad in (48, 8):
        with pytest.raises(ValueError, match="block_t"):
            G.kivi_decode_attention(q, None, None, k_res, k_res, block_t=bad, backend="triton")
    with pytest.raises(ValueError, match="unpack"):
        G.kivi_decode_attention(q, None, None, k_res, k_res, unpack="fold", backend="triton")
    with pytest.raises(ValueError, match="prefetch"):
        G.kivi_decode_attention(q, None, None, k_res, k_res, prefetch=True, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_attention_rejects_inputs_that_disagree(backend):
    """Shapes, dtypes and devices are checked before any kernel runs (the kernels trust them: a batch larger
    than the cache's would read past it on a GPU); each error names what is wrong."""
    r = gen(31)
    k, v = (torch.randn(2, 2, 64, 64, generator=r, device="cpu").to(DEVICE) for _ in range(2))
    kq, vq = G.quantize_keys(k), G.quantize_values(v)
    res = torch.randn(2, 2, 8, 64, generator=r).to(DEVICE)
    q = torch.randn(2, 4, 64, generator=r).to(DEVICE)
    want = G.kivi_decode_attention_ref(q, kq, vq, res, res)
    torch.testing.assert_close(G.kivi_decode_attention(q, kq, vq, res, res, backend=backend), want,
                               atol=2e-5, rtol=0)
    bad = {
        "D=": (torch.randn(2, 4, 32, device=DEVICE), kq, vq, res, res),
        "B=": (torch.randn(3, 4, 64, device=DEVICE), kq, vq, res, res),
        "multiple of the kv heads": (torch.randn(2, 3, 64, device=DEVICE), kq, vq, res, res),
        "k_res are": (q, kq, vq, res[..., :32], res[..., :32]),
        "one shape": (q, kq, vq, res, res[:, :, :7]),
        "both be given": (q, kq, vq, res, None),
        "differ in B or Hkv": (q, kq, vq, res[:, :1], res[:, :1]),
        "same tokens": (q, kq, G.quantize_values(v[:, :, :32]), res, res),
        r"\(B, Hq, D\)": (q[0], kq, vq, res, res),
        "empty cache": (q, None, None, res[:, :, :0], res[:, :, :0]),
    }
    for match, args in bad.items():
        with pytest.raises(ValueError, match=match):
            G.kivi_decode_attention(*args, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        G.kivi_decode_attention(q.long(), kq, vq, res, res, backend=backend)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="on cpu"):
            G.kivi_decode_attention(q, kq, vq, res.cpu(), res.cpu(), backend=backend)


def _cpu(q):
    if q is None:
        return None
    return kv_quant.QuantizedTensor(q.packed.cpu(), q.scale.cpu(), q.minimum.cpu(), q.bits, q.group_size, q.axis,
                                    q.shape, None if q.sup is None else q.sup.cpu(), q.order)


def test_decode_attention_error_shrinks_with_bits():
    """Against attention over the unquantized cache: small at 4 bits, and well below the 2-bit error."""
    r = gen(5)
    q = torch.randn(1, 3, 64, generator=r)
    k = torch.randn(1, 3, 160, 64, generator=r)
    v = torch.randn(1, 3, 160, 64, generator=r)
    exact = torch.softmax(torch.einsum("bhd,bhtd->bht", q, k) / 8.0, -1)
    exact = torch.einsum("bht,bhtd->bhd", exact, v)
    err = {}
    for bits in (4, 2):
        kq = kv_quant.quantize_keys(k[:, :, :128].to(DEVICE), bits, 32)
        vq = kv_quant.quantize_values(v[:, :, :128].to(DEVICE), bits, 32)
        got = G.kivi_decode_attention(q.to(DEVICE)[:, :, None], kq, vq, k[:, :, 128:].to(DEVICE),
                                      v[:, :, 128:].to(DEVICE), backend="triton")
        assert got.shape == (1, 3, 1, 64)
        err[bits] = float((got[:, :, 0].cpu() - exact).abs().max())
    assert err[4] < 0.1 and err[4] < err[2] / 2, err


# --------------------------------------------------------------------------------------- search
# (m queries, n rows, d, k, chunk_rows): n and d not multiples of the 128-row / 64-column blocks
SEARCH_CASES = [(5, 1000, 32, 10, 1 << 16), (3, 3000, 24, 1024, 1024), (17, 777, 40, 50, 300), (2, 130, 16, 1, 64),
                (4, 5000, 24, 3, 1 << 16)]  # the last: 40 tiles of 128 rows for k=3, so only the best tiles are ranked


@pytest.mark.parametrize("case", SEARCH_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_search_ties_and_ids_exact(case, metric, kind):
    m, n, d, k, chunk = case
    r = gen(n + d + k)
    # small integers: every score is exact in float32, and equal scores are everywhere
    base = torch.randint(-3, 4, (n, d), generator=r)
    scale = None
    if kind == "int8":
        base = base.to(torch.int8)
        scale = torch.randint(1, 3, (n,), generator=r).float()
    else:
        base = base.half()
    base[n // 2] = base[n // 3]  # an exact duplicate row
    q = torch.randint(-2, 3, (m, d), generator=r).float()
    s, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), k, metric,
                         base_scale=None if scale is None else scale.to(DEVICE), chunk_rows=chunk, backend="triton")
    rs, ri = G.search_topk_ref(q, base, k, metric, base_scale=scale)
    assert i.shape == (m, min(k, n)) and i.dtype == torch.int64
    assert torch.equal(i.cpu(), ri)
    torch.testing.assert_close(s.double().cpu(), rs, atol=1e-3, rtol=0)
    # the torch fallback path ranks the same way
    s2, i2 = G.search_topk(q, base, k, metric, base_scale=scale, chunk_rows=chunk, backend="torch")
    assert torch.equal(i2, ri)


def test_search_reranks_only_chunks_whose_cut_splits_ties(monkeypatch):
    """With the torch select the fast path ranks floats, and only the scores of each chunk's best tiles of
    rows; a chunk is ranked again by (score, id) keys over all its scores only when equal values cross a
    cut, and both paths give the exact ranking. (The fused select ranks by keys itself: its ties are tested
    below.)"""
    search = import_module(G.__name__ + ".search")
    calls = []
    real = search._chunk_topk

    def spy(*args):
        calls.append((args[7], args[10]))  # (first row, exact_ties)
        return real(*args)

    monkeypatch.setattr(search, "_chunk_topk", spy)
    r = gen(21)
    base = torch.randn(2000, 48, generator=r).half()  # continuous scores: no ties
    q = torch.randn(3, 48, generator=r)
    for k in (1, 5, 25):  # 8 tiles of 128 rows per chunk: k < 8 ranks only the best tiles' rows
        _, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), k, chunk_rows=1000, backend="triton", select="torch")
        assert torch.equal(i.cpu(), G.search_topk_ref(q, base, k)[1])
    assert [e for _, e in calls] == [False] * 6
    calls.clear()
    base[100] = integer_row(r, 48)
    base[700:800] = base[100]  # 101 equal rows in chunk 0: equal scores straddle its cut
    q[:] = base[100].float()
    _, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), 5, chunk_rows=1000, backend="triton", select="torch")
    assert torch.equal(i.cpu(), G.search_topk_ref(q, base, 5)[1])
    assert sorted(r0 for r0, exact in calls if exact) == [0]


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("kind", ["fp16", "int8"])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16], ids=["q32", "q16"])
def test_search_random_floats_exact_ids(metric, kind, qdtype):
    """Continuous data through the fast path (best tiles only, fp32 queries as two fp16 halves): ids equal
    the float64 ranking of the same (fp16-rounded) queries."""
    r = gen(33)
    base = torch.randn(6000, 40, generator=r)
    q = torch.randn(4, 40, generator=r).to(qdtype)
    scale = None
    if kind == "int8":
        base, scale = G.quantize_rows_int8(base)
    else:
        base = base.half()
    for k in (1, 10, 100):
        s, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), k, metric,
                             base_scale=None if scale is None else scale.to(DEVICE), backend="triton")
        rs, ri = G.search_topk_ref(q, base, k, metric, base_scale=scale)
        assert torch.equal(i.cpu(), ri), (k, (i.cpu() != ri).sum())
        torch.testing.assert_close(s.double().cpu(), rs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_brute_force_index_matches_search_topk(metric):
    """The index (CUDA-graph replay on a GPU, eager on the CPU) gives search_topk's answers, for new queries
    on every call, records one graph per shape, and still ranks ties by id."""
    r = gen(44)
    base, scale = G.quantize_rows_int8(torch.randn(3000, 40, generator=r))
    index = G.BruteForceIndex(base.to(DEVICE), metric, base_scale=scale.to(DEVICE))
    for seed in (1, 2, 3):
        q = torch.randn(3, 40, generator=gen(seed))
        s, i = index.search(q.to(DEVICE), 7)
        rs, ri = G.search_topk(q.to(DEVICE), base.to(DEVICE), 7, metric, base_scale=scale.to(DEVICE),
                               backend="triton")
        assert torch.equal(i, ri) and torch.equal(s, rs)
        assert torch.equal(i.cpu(), G.search_topk_ref(q, base, 7, metric, base_scale=scale)[1])
    assert index.recorded_shapes == ([(3, 7, torch.float32)] if DEVICE == "cuda" else [])
    tied, tscale = base.clone(), scale.clone()
    tied[5], tscale[5] = integer_row(r, 40, torch.int8) * 20, 1.0  # scores against it exact, and the best
    tied[1000:1100], tscale[1000:1100] = tied[5], tscale[5]  # 101 equal rows: the cut splits equal scores
    index = G.BruteForceIndex(tied.to(DEVICE), metric, base_scale=tscale.to(DEVICE))
    q = tied[5].float().repeat(2, 1)
    ref = G.search_topk_ref(q, tied, 5, metric, base_scale=tscale)[1]
    assert set(ref[0].tolist()) <= {5, *range(1000, 1100)}  # the tie really is at the cut
    for _ in range(2):
        _, i = index.search(q.to(DEVICE), 5)
        assert torch.equal(i.cpu(), ref)


@pytest.mark.parametrize("metric,kind,select", [("ip", "fp16", "fused"), ("l2", "int8", "fused"),
                                                ("ip", "int8", "parallel"), ("l2", "fp16", "parallel")])
def test_search_fused_select_ranks_like_the_reference(metric, kind, select):
    """select="fused" (one kernel: a threshold from the tile maxima, the rows that reach it, their top k by
    (score, id) keys) and select="parallel" (the same in three launches, many programs a query): the exact ids
    on continuous data and on small integers full of ties, for k of 1, a power of two and neither, over
    several chunks, and through BruteForceIndex. (Two metric and row kinds each: the interpreter's sort is
    slow.)"""
    r = gen(55)
    for data in ("float", "int"):
        if data == "float":
            base = torch.randn(5000, 40, generator=r)
            q = torch.randn(3, 40, generator=r)
        else:
            base = torch.randint(-3, 4, (5000, 24), generator=r).float()
            base[2500] = base[1666]
            q = torch.randint(-2, 3, (3, 24), generator=r).float()
        scale = None
        if kind == "int8" and data == "int":  # integer codes and scales: every score exact in float32
            base, scale = base.to(torch.int8), torch.randint(1, 3, (base.shape[0],), generator=r).float()
        elif kind == "int8":
            base, scale = G.quantize_rows_int8(base)
        else:
            base = base.half()
        dscale = None if scale is None else scale.to(DEVICE)
        cases = ((1, None), (33, None), (7, 1500)) if data == "float" else ((10, None), (32, None))
        for k, chunk in cases:
            s, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), k, metric, base_scale=dscale, chunk_rows=chunk,
                                 select=select, backend="triton")
            rs, ri = G.search_topk_ref(q, base, k, metric, base_scale=scale)
            assert torch.equal(i.cpu(), ri), (data, k, chunk)
            torch.testing.assert_close(s.double().cpu(), rs, atol=1e-3, rtol=1e-5)
    index = G.BruteForceIndex(base.to(DEVICE), metric, base_scale=dscale, select=select)
    assert torch.equal(index.search(q.to(DEVICE), 5)[1].cpu(), G.search_topk_ref(q, base, 5, metric, base_scale=scale)[1])
    with pytest.raises(ValueError, match="select"):
        G.search_topk(q, base, 5, select="heap")
    with pytest.raises(ValueError, match="select"):
        G.BruteForceIndex(base, select="heap")
    # the default: on a GPU the fused kernel, the parallel one from PARALLEL_FROM_K on; the torch select elsewhere
    auto = G.BruteForceIndex(base.to(DEVICE), metric, base_scale=dscale)
    search = import_module(G.__name__ + ".search")
    for k, want in ((10, "fused"), (search.PARALLEL_FROM_K - 1, "fused"), (search.PARALLEL_FROM_K, "parallel")):
        assert auto.select_for(k) == (want if DEVICE == "cuda" else "torch")


@pytest.mark.parametrize("select,launcher", [("fused", "_threshold_select"), ("parallel", "_parallel_select")])
def test_search_fused_select_threshold_keeps_few_rows_and_overflow_falls_back(monkeypatch, select, launcher):
    """The fused and parallel selects' threshold lets through few more rows than k on continuous data (it is
    what makes them cheap); a tie of 2,001 rows is ranked over several key blocks; and when more rows reach it
    than the key buffer holds (thousands of equal scores) the listed tiles are ranked instead (the parallel
    select: in its rank launch). The answer is still exact, with no exact path on the host and no host
    synchronisation."""
    search = import_module(G.__name__ + ".search")
    seen = []
    real = getattr(search, launcher)

    def spy(s, tmax, n, bn, kk, *rest):
        out = real(s, tmax, n, bn, kk, *rest)
        seen.append((s, tmax, kk, out[2].cpu()))
        return out

    monkeypatch.setattr(search, launcher, spy)
    r = gen(66)
    base = torch.randn(12000, 32, generator=r).half()
    q = torch.randn(2, 32, generator=r)
    _, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), 10, select=select, backend="triton")
    assert torch.equal(i.cpu(), G.search_topk_ref(q, base, 10)[1])
    s, tmax, kk, n_keys = seen[-1]
    # rebuild the kernel's threshold: the kk-th best of the 64 group maxima (94 tiles dealt 2 to a group)
    groups = torch.full((q.shape[0], 128), float("-inf"), device=tmax.device)
    groups[:, :tmax.shape[1]] = tmax
    thr = groups.view(-1, 64, 2).amax(2).sort(1, descending=True).values[:, kk - 1]
    passed = (s[:, :base.shape[0]] >= thr[:, None]).sum(1)
    assert bool(((passed >= kk) & (passed <= 4 * kk)).all()), passed
    assert torch.equal(n_keys.long(), passed.cpu().long())  # the kernel counted the same rows
    dup = base.clone()
    dup[7] = integer_row(r, 32)
    dup[1000:3000] = dup[7]  # 2,001 equal rows reach the threshold: ranked in several key blocks, no overflow
    q = dup[7].float().repeat(2, 1)
    _, i = G.search_topk(q.to(DEVICE), dup.to(DEVICE), 10, select=select, backend="triton")
    assert bool((seen[-1][3] == 2001).all())  # within the 4,096 keys the buffer holds
    assert torch.equal(i.cpu(), G.search_topk_ref(q, dup, 10)[1])  # the ten lowest ids of the tie
    calls = []
    real_chunk = search._chunk_topk
    monkeypatch.setattr(search, "_chunk_topk", lambda *a: calls.append(a[10]) or real_chunk(*a))
    dup = base.clone()
    dup[7] = integer_row(r, 32)
    dup[1000:6000] = dup[7]  # 5,001 equal rows: all reach the threshold, more than the 4,096 keys it keeps
    q = dup[7].float().repeat(2, 1)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail(f"the {select} select waited on the host"))
    _, i = G.search_topk(q.to(DEVICE), dup.to(DEVICE), 10, select=select, backend="triton")
    _, i6 = G.search_topk(q.to(DEVICE), dup.to(DEVICE), 64, select=select, backend="triton")
    monkeypatch.undo()
    assert bool((seen[-2][3] == 5001).all()) and bool((seen[-1][3] > 4096).all())  # the buffer overflowed ...
    assert calls == [False, False]  # ... yet no chunk went to the exact path
    assert torch.equal(i.cpu(), G.search_topk_ref(q, dup, 10)[1])  # ranked from the listed tiles, exactly
    assert torch.equal(i6.cpu(), G.search_topk_ref(q, dup, 64)[1])


def test_search_parallel_select_many_programs_a_query_matches_the_one_program_select():
    """The parallel select at a large k: more tiles than one gather program takes (2 a query, both holding
    rows of the answer), integer scores tied by the dozen at the cut. Its three outputs (scores, ids, rows that
    reached the threshold) equal the one-program kernel's, and the ids the reference's. (Key buffers of many
    blocks are in the tie test above.)"""
    search = import_module(G.__name__ + ".search")
    r = gen(77)
    n, k = 140_000, 300
    base = torch.randint(-6, 7, (n, 8), generator=r).half()
    q = torch.randint(-3, 4, (2, 8), generator=r).float()
    s, tmax, bn = search._chunk_scores_triton(q.to(DEVICE), base.to(DEVICE), None, None, False, search._TILE)
    assert tmax.shape[1] > search._GATHER_TILES  # two gather programs a query
    one = search._threshold_select(s, tmax, n, bn, k, 0)
    par = search._parallel_select(s, tmax, n, bn, k, 0)
    for a, b in zip(one, par):
        assert torch.equal(a, b)
    assert torch.equal(par[1].cpu(), G.search_topk_ref(q, base, k)[1])
    last = par[0][:, -1:]  # the k-th best score
    assert bool(((s[:, :n] == last).sum(1) > 1).all())  # ties straddle the cut in both queries
    split = search._GATHER_TILES
    assert bool(((tmax[:, :split] >= last).any(1) & (tmax[:, split:] >= last).any(1)).all())


@pytest.mark.parametrize("metric,ahead", [("ip", 1), ("l2", 1), ("ip", 2)])
def test_search_int8_fragment_kernel_and_general_kernel_agree(metric, ahead, kernel_launches, monkeypatch):
    """Int8 rows with up to 16 queries go to the kernel that loads each int32 word of four features into
    its mma fragment and turns bytes into fp16 without conversions; more queries, or a width that is not a
    multiple of 4, take the general kernel. Both give the exact ids (ties included) and the same scores,
    with the fragment kernel's words loaded one or two steps ahead (``INT8_STEPS_AHEAD``)."""
    search = import_module(G.__name__ + ".search")
    monkeypatch.setattr(search, "INT8_STEPS_AHEAD", ahead)
    used = kernel_launches(search, "_scores_int8_kernel")
    r = gen(71)
    for m, d, fragment in ((16, 48, True), (1, 384, True), (17, 48, False), (4, 30, False)):
        used.clear()
        base = torch.randint(-3, 4, (1500, d), generator=r).to(torch.int8)  # small integers: ties everywhere
        scale = torch.randint(1, 3, (1500,), generator=r).float()
        q = torch.randint(-2, 3, (m, d), generator=r).float()
        s, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), 20, metric, base_scale=scale.to(DEVICE), backend="triton")
        rs, ri = G.search_topk_ref(q, base, 20, metric, base_scale=scale)
        assert bool(used) == fragment, (m, d)
        assert torch.equal(i.cpu(), ri), (m, d)
        torch.testing.assert_close(s.double().cpu(), rs, atol=1e-3, rtol=0)


@pytest.mark.parametrize("select", ["torch", "fused"])
def test_search_rejects_bad_input_and_moves_queries(select):
    """Every bad input raises a typed error before any kernel runs; queries from numpy or another device are
    moved to the rows' device; NaN queries and NaN rows are named by row."""
    r = gen(12)
    base = torch.randint(-3, 4, (300, 16), generator=r).half()
    q = torch.randint(-2, 3, (3, 16), generator=r).float()
    want = G.search_topk_ref(q, base, 7)[1]
    xb = base.to(DEVICE)
    for queries in (q.numpy(), q, q.to(DEVICE)):  # numpy and CPU queries go to the rows' device
        s, i = G.search_topk(queries, xb, 7, select=select)
        assert i.device == xb.device and torch.equal(i.cpu(), want)
    index = G.BruteForceIndex(xb, select=select)
    assert torch.equal(index.search(q.numpy(), 7)[1].cpu(), want)
    for shape in ((2, 3, 16), ()):
        with pytest.raises(ValueError, match="dimension mismatch"):
            G.search_topk(torch.zeros(shape), xb, 3, select=select)
    with pytest.raises(TypeError, match="k must be an integer"):
        G.search_topk(q, xb, 5.0, select=select)
    for dtype in (torch.bfloat16, torch.float64, torch.int32):
        with pytest.raises(TypeError, match="float16, float32 or int8"):
            G.search_topk(q, base.to(dtype), 5, select=select)
        with pytest.raises(TypeError, match="float16, float32 or int8"):
            G.BruteForceIndex(base.to(dtype))
    with pytest.raises(ValueError, match=r"an \(n, d\) tensor"):
        G.BruteForceIndex(base[0])
    codes = base.to(torch.int8)
    with pytest.raises(ValueError, match=r"base_scale must be a \(300,\) tensor"):
        G.search_topk(q, codes, 5, base_scale=torch.ones(3), select=select)
    with pytest.raises(ValueError, match=r"base_sq_norms must be a \(300,\) tensor"):
        G.search_topk(q, base, 5, "l2", base_sq_norms=torch.ones(299), select=select)
    # NaN and inf: in the queries at each search, in the rows and scales once when an index is built
    bad_q = q.clone()
    bad_q[1, 4] = float("nan")
    bad_q[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"queries hold NaN or inf values, first at rows \[1, 2\]"):
        G.search_topk(bad_q, xb, 5, select=select)
    with pytest.raises(ValueError, match="queries hold NaN"):
        index.search(bad_q, 5)
    assert G.search_topk(bad_q, xb, 5, select="torch", check_finite=False)[1].shape == (3, 5)  # unchecked
    # numpy and CPU queries are checked where they are, before the copy: rows on the meta device (whose
    # values cannot be read) show that no check reads the queries after it
    for queries in (bad_q.numpy(), bad_q):
        with pytest.raises(ValueError, match=r"queries hold NaN or inf values, first at rows \[1, 2\]"):
            G.search_topk(queries, base.to("meta"), 5, select="torch")
    bad_rows = base.clone()
    bad_rows[100] = float("nan")
    with pytest.raises(ValueError, match=r"rows of base hold NaN or inf values, first at rows \[100\]"):
        G.BruteForceIndex(bad_rows.to(DEVICE))
    with pytest.raises(ValueError, match="base_scale's rows hold NaN"):
        G.BruteForceIndex(codes, base_scale=torch.tensor([1.0] * 299 + [float("inf")]))
    G.BruteForceIndex(bad_rows, check_finite=False)  # unchecked: the caller vouches for the rows
    with pytest.raises(ValueError, match=r"rows hold NaN or inf values, first at rows \[100\]"):
        G.quantize_rows_int8(bad_rows)
    for shape in ((16,), (3, 0)):
        with pytest.raises(ValueError, match=r"an \(n, d\) tensor with d > 0"):
            G.quantize_rows_int8(torch.zeros(shape))
    codes0, scale0 = G.quantize_rows_int8(torch.zeros(0, 16))
    assert codes0.shape == (0, 16) and scale0.shape == (0,)


def test_search_finite_check_numbers_rows_across_slices():
    """The rows are checked a slice of 65,536 at a time; a bad row past the first slice keeps its own number."""
    base = torch.zeros(70_000, 4, dtype=torch.float16)
    base[69_999, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"first at rows \[69999\]"):
        G.BruteForceIndex(base)


def test_search_fp16_queries():
    r = gen(11)
    base = torch.randint(-3, 4, (500, 64), generator=r).half()
    q = torch.randint(-2, 3, (4, 64), generator=r).half()
    _, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), 20, "ip", backend="triton")
    assert torch.equal(i.cpu(), G.search_topk_ref(q, base, 20, "ip")[1])


def test_search_argument_checks():
    base = torch.zeros(10, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="k must be"):
        G.search_topk(torch.zeros(1, 8), base, 1025)
    with pytest.raises(ValueError, match="dimension"):
        G.search_topk(torch.zeros(1, 9), base, 3)
    with pytest.raises(ValueError, match="base_scale"):
        G.search_topk(torch.zeros(1, 8), base.to(torch.int8), 3)
    s, i = G.search_topk(torch.zeros(8), base, 50, backend="torch")
    assert i.shape == (1, 10) and torch.equal(i[0], torch.arange(10))  # all tied: ascending ids
    # no rows: no results, for each query
    empty = torch.zeros(0, 8, dtype=torch.float16, device=DEVICE)
    for s, i in (G.search_topk(torch.zeros(3, 8, device=DEVICE), empty, 5, "l2"),
                 G.BruteForceIndex(empty).search(torch.zeros(3, 8, device=DEVICE), 5)):
        assert s.shape == i.shape == (3, 0) and s.dtype == torch.float32 and i.dtype == torch.int64
    # no queries: no results (k of them for each of none), on every path (a division by zero before)
    rows = base.to(DEVICE)
    for s, i in [G.search_topk(torch.zeros(0, 8, device=DEVICE), rows, 5, metric, select=select)
                 for metric in ("ip", "l2") for select in ("torch", "fused")] + [
                 G.BruteForceIndex(rows).search(torch.zeros(0, 8, device=DEVICE), 5),
                 G.search_topk(torch.zeros(0, 8), base, 5, backend="torch")]:
        assert s.shape == i.shape == (0, 5) and s.dtype == torch.float32 and i.dtype == torch.int64


def _assert_same_ranking(ids, ref_scores, ref_ids, all_scores, tol=1e-5):
    """Ranks agree exactly, except that two ids may swap when their exact scores are within tol."""
    ids, ref_ids = ids.cpu(), ref_ids.cpu()
    for row in range(ids.shape[0]):
        assert len(set(ids[row].tolist())) == ids.shape[1]
        got = all_scores[row, ids[row]]
        bad = (ids[row] != ref_ids[row]) & ((got - ref_scores[row]).abs() > tol)
        assert not bad.any(), (row, ids[row][bad], ref_ids[row][bad])


@pytest.fixture(scope="module")
def real_vectors():
    if not (DATA / "base.npy").exists() or not (DATA / "queries.npy").exists():
        pytest.skip(f"{DATA} is absent")
    np = pytest.importorskip("numpy")
    base = torch.from_numpy(np.load(DATA / "base.npy", mmap_mode="r")[:8000].copy())
    queries = torch.from_numpy(np.load(DATA / "queries.npy")[:16].copy())
    return base, queries


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_real_vectors_fp16(real_vectors, metric):
    base, queries = real_vectors
    s, i = G.search_topk(queries.to(DEVICE), base.to(DEVICE), 100, metric, backend="triton")
    rs, ri = G.search_topk_ref(queries, base, 100, metric)
    x = base.double()
    full = queries.double() @ x.T
    if metric == "l2":
        full = (queries.double() ** 2).sum(1, keepdim=True) - 2 * full + (x * x).sum(1)[None]
    _assert_same_ranking(i, rs, ri, full)
    torch.testing.assert_close(s.double().cpu(), rs, atol=1e-5, rtol=0)


def test_search_real_vectors_int8(real_vectors):
    base, queries = real_vectors
    codes, scale = G.quantize_rows_int8(base)
    s, i = G.search_topk(queries.to(DEVICE), codes.to(DEVICE), 100, "ip", base_scale=scale.to(DEVICE),
                         backend="triton")
    rs, ri = G.search_topk_ref(queries, codes, 100, "ip", base_scale=scale)
    full = queries.double() @ (codes.double() * scale.double()[:, None]).T
    _assert_same_ranking(i, rs, ri, full)
    # int8 rows keep the fp16 neighbours: recall@10 against the exact fp16 ranking
    exact10 = G.search_topk_ref(queries, base, 10, "ip")[1]
    recall = sum(len(set(a[:10].tolist()) & set(b.tolist())) for a, b in zip(i.cpu(), exact10)) / exact10.numel()
    assert recall >= 0.97, recall


def test_search_torch_path_matches_published_ground_truth():
    """The chunked two-stage merge on all 200k real vectors against the data set's own top-100."""
    if not (DATA / "gt_ids.npy").exists():
        pytest.skip(f"{DATA} is absent")
    np = pytest.importorskip("numpy")
    base = torch.from_numpy(np.load(DATA / "base.npy"))
    queries = torch.from_numpy(np.load(DATA / "queries.npy")[:50].copy())
    gt = torch.from_numpy(np.load(DATA / "gt_ids.npy")[:50].astype("int64"))
    gts = torch.from_numpy(np.load(DATA / "gt_scores.npy")[:50].copy())
    s, i = G.search_topk(queries, base, 100, "ip", chunk_rows=30000, backend="torch")
    full = queries.double() @ base.double().T
    _assert_same_ranking(i, gts.double(), gt, full, tol=1e-5)


@pytest.mark.parametrize("metric,kind", [("ip", "fp16"), ("l2", "int8")])
def test_search_rescore_select_ranks_by_exact_scores(metric, kind, monkeypatch):
    """select="rescore": the stage-1 kernel takes the float32 queries' fp16 high halves alone (one dot), and the
    rows within the error bound of the threshold are ranked by exact scores computed from the rows. The ids
    equal the reference's on continuous data, on integer rows full of ties and over several chunks. On two
    rows built so that the high halves alone rank them the wrong way round, the exact order comes out.
    search_topk can rescore only for L2 (it needs the largest row norm), and falls back to the parallel select
    for inner products."""
    search = import_module(G.__name__ + ".search")
    rescored = []
    real = search._parallel_select
    monkeypatch.setattr(search, "_parallel_select", lambda *a: rescored.append(a[6] is not None) or real(*a))
    r = gen(88)
    for data in ("float", "int"):
        base = torch.randn(6000, 24, generator=r) if data == "float" else torch.randint(-3, 4, (6000, 24), generator=r).float()
        q = torch.randn(4, 24, generator=r) if data == "float" else (
            torch.randint(-2, 3, (4, 24), generator=r) + 1e-3 * torch.randn(4, 24, generator=r))
        if kind == "int8":
            base, scale = (G.quantize_rows_int8(base) if data == "float"
                           else (base.to(torch.int8), torch.randint(1, 3, (6000,), generator=r).float()))
        else:
            base, scale = base.half(), None
        dscale = None if scale is None else scale.to(DEVICE)
        index = G.BruteForceIndex(base.to(DEVICE), metric, base_scale=dscale, select="rescore", backend="triton")
        for k, chunk in ((10, None), (20, 3000)):  # (24 tiles of rows a chunk: more than k, so the select runs)
            index._options = (chunk, None, "triton")
            rescored.clear()
            s, i = index.search(q.to(DEVICE), k)
            rs, ri = G.search_topk_ref(q, base, k, metric, base_scale=scale)
            assert rescored and all(rescored), (data, k, chunk)
            assert torch.equal(i.cpu(), ri), (data, k, chunk)
            torch.testing.assert_close(s.double().cpu(), rs, atol=1e-3, rtol=1e-5)
    # row 900 beats row 5 by 3.7e-4, but the query's first coordinate rounds up to fp16 by exactly that: with
    # the high halves alone the two tie, and the tie would go to the lower id
    base = (torch.randn(6000, 24, generator=r) * 0.05).half()
    base[5], base[900] = 0, 0
    base[5, 0], base[900, 1] = 1.0, 1.0 + 2.0 ** -10
    q = torch.zeros(2, 24)
    q[:, 0], q[:, 1] = 1.0 + 2.0 ** -11 + 2.0 ** -13, 1.0
    assert float(q[0].half().float() @ base[5].float()) == float(q[0].half().float() @ base[900].float())
    index = G.BruteForceIndex(base.to(DEVICE), "ip", select="rescore", backend="triton")
    rescored.clear()
    _, i = index.search(q.to(DEVICE), 2)  # (on CUDA recorded as a graph: the select runs twice, both rescoring)
    assert rescored and all(rescored) and i[:, :2].cpu().tolist() == [[900, 5], [900, 5]]
    # row 17 is the best by 6e-5, yet with the high halves alone it scores 6e-5 under row 4000, which then
    # sets the threshold: only the margin below it lets row 17 be rescored
    near = base.clone()
    near[17], near[4000] = 0, 0
    near[17, 0], near[4000, 1], near[4000, 2] = 1.0 + 2.0 ** -9, 1.0 + 2.0 ** -10, 0.140625
    q1 = torch.zeros(1, 24)
    q1[0, 0], q1[0, 1], q1[0, 2] = 1.0 - 2.0 ** -11 + 2.0 ** -13, 1.0, 2.0 ** -8
    hi, exact = q1.half().double() @ near.double().T, q1.double() @ near.double().T
    assert hi[0, 4000] > hi[0, 17] and exact[0, 17] > exact[0, 4000] and int(exact.argmax()) == 17
    index = G.BruteForceIndex(near.to(DEVICE), "ip", select="rescore", backend="triton")
    assert index.search(q1.to(DEVICE), 1)[1].item() == 17
    rescored.clear()
    _, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), 2, "ip", select="rescore", backend="triton")
    assert rescored == [False] and i[:, :2].cpu().tolist() == [[900, 5], [900, 5]]  # two dots, no norm needed
    rescored.clear()
    _, i = G.search_topk(q.to(DEVICE), base.to(DEVICE), 2, "l2", select="rescore", backend="triton")
    assert rescored == [True] and torch.equal(i.cpu(), G.search_topk_ref(q, base, 2, "l2")[1])
    # auto: the rescoring variant from RESCORE_FROM_M float32 queries over fp16 or int8 rows, on a GPU
    many = torch.zeros(search.RESCORE_FROM_M, 24, device=DEVICE)
    want = "rescore" if DEVICE == "cuda" else "torch"
    assert G.BruteForceIndex(base.to(DEVICE)).select_for(10, many) == want
    assert G.BruteForceIndex(base.to(DEVICE)).select_for(10, many.half()) == ("fused" if DEVICE == "cuda" else "torch")
    assert G.BruteForceIndex(base.to(DEVICE)).select_for(10, many[:-1]) == ("fused" if DEVICE == "cuda" else "torch")


def test_search_rescore_select_overflow_ranks_by_exact_scores(monkeypatch):
    """More rows reach the rescoring select's threshold than its key buffer holds (5,001 equal rows just under
    the two rows of the test above): its last launch ranks the listed tiles' rows by their exact scores
    instead, still with no host synchronisation. Row 900 comes first (the high halves alone would tie it with
    row 5 and put 5 first), then 5, then the lowest ids of the tie."""
    r = gen(99)
    base = (torch.randn(12000, 24, generator=r) * 0.05).half()
    base[5], base[900] = 0, 0
    base[5, 0], base[900, 1] = 1.0, 1.0 + 2.0 ** -10
    base[1000:6001] = 0
    base[1000:6001, 0] = 0.999
    q = torch.zeros(2, 24)
    q[:, 0], q[:, 1] = 1.0 + 2.0 ** -11 + 2.0 ** -13, 1.0
    index = G.BruteForceIndex(base.to(DEVICE), "ip", select="rescore", backend="triton")
    seen = []
    search = import_module(G.__name__ + ".search")
    real = search._parallel_select

    def spy(*a):
        out = real(*a)
        seen.append((a[6] is not None, out[2]))  # (read after the search: on CUDA this may run in a capture)
        return out

    monkeypatch.setattr(search, "_parallel_select", spy)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: pytest.fail("the rescoring select waited on the host"))
    _, i = index.search(q.to(DEVICE), 10)
    monkeypatch.undo()
    assert seen and all(r for r, _ in seen)  # rescoring ...
    assert bool((seen[-1][1].cpu() > 4096).all())  # ... and an overflow
    assert i.cpu().tolist() == [[900, 5, *range(1000, 1008)]] * 2
    assert torch.equal(i.cpu(), G.search_topk_ref(q, base, 10)[1])


def test_parallel_select_gather_atomics_compile_without_fences():
    """The parallel select's gather places rows with relaxed atomic adds: compiled for sm_90 with the installed
    Triton (no GPU needed), its code has no memory fence (the default acq_rel ordering put 16 in its loop)
    and no spills; and the check fails without ``sem="relaxed"`` (benches/gpu_sass_search.py --check-gather)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ROOT / "benches" / "gpu_sass_search.py"
    r = subprocess.run([sys.executable, str(script), "--check-gather", "--shapes", "16:100"], env=env,
                       capture_output=True, text=True, timeout=900, cwd=ROOT / "benches")
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("this Triton cannot compile for sm_90 here (no ptxas)")
    assert r.returncode == 0 and "0 memory fences" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("d", [128, 64])
def test_warps_kernel_asm_gets_one_word_a_pair(d):
    """The warps kernel's inline PTX reads one word for both elements of a code pair, which holds only if
    Triton hands it the two elements of one pair. Compiled for sm_90 with the installed Triton (no GPU
    needed; benches/gpu_sass.py --check-pairs makes the asm read the second element's word too, so that
    the PTX names both), every pair must get one word; and the check itself can fail."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ROOT / "benches" / "gpu_sass.py"
    r = subprocess.run([sys.executable, str(script), "--check-pairs", "--d", str(d)], env=env, capture_output=True,
                       text=True, timeout=900)
    if r.returncode and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("this Triton cannot compile for sm_90 here (no ptxas)")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # value pairs (8 words a thread, 4 pairs a word, the loop's body twice: whole tiles, then the partial
    # one), and at head size 128 the key pairs as well; half the words at head size 64
    n = 128 if d == 128 else 32
    assert f"asm pairs: {n}, one word for both elements: {n}, two words: 0" in r.stdout
    probe = ("import sys; sys.argv = ['x']; sys.path.insert(0, %r); from gpu_sass import asm_pair_words as f; "
             "print(f('mov.b32 t, %%r7; lop3.b32 t, %%r7, k'), f('mov.b32 t, %%r8; lop3.b32 t, %%r7, k'))"
             % str(ROOT / "benches"))
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.split("\n")[-2] == "(1, 1) (1, 0)", r.stdout + r.stderr


def test_gpu_host_bench_times_the_host_path_and_puts_the_kernels_back():
    """benches/gpu_host.py: a decode call's host side with its launches caught; the kernels it stands in for
    are put back afterwards, and the warps path launches its key offsets, the decode kernel and the merge."""
    bench = _bench("gpu_host")
    da = bench.DA
    kernels = {name: getattr(da, name) for name in bench.LAUNCHED}
    probed = dict(da._SUBNORMAL_DOT)
    row = bench.decode_host_path("mma_w", 1, 2, 4, 256)
    assert (row["kernel"], row["launches"]) == ("_kivi_decode_warps_kernel", 3)
    assert row["call_us"] > row["checks_us"] > 0
    assert {name: getattr(da, name) for name in bench.LAUNCHED} == kernels
    assert da._SUBNORMAL_DOT == probed
    assert bench.decode_host_path("kivi", 1, 2, 4, 256)["launches"] == 2  # no key offsets
    pytest.importorskip("transformers")
    step = bench.cache_step_host(1, 2, 2, prefill=64)  # a cache layer's decode steps, between two flushes
    assert step["step_us"] > step["update_us"] > 0 and step["shape"].endswith("mma/mma_w")
    assert {name: getattr(da, name) for name in bench.LAUNCHED} == kernels


@pytest.mark.skipif(DEVICE == "cuda", reason="the smoke run is for CPU-only machines; on a GPU run the benchmark")
def test_gpu_bench_smoke_run(tmp_path):
    """benches/gpu_bench.py stays runnable without a GPU: every step on tiny CPU shapes, outputs checked."""
    import json

    bench = _bench("gpu_bench")
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    kinds = {r["kernel"] for r in rows}
    assert kinds == {"kivi_decode", "search_fp16", "search_int8", "scores_only_fp16", "scores_only_int8",
                     "scores_only_int8_ahead2", "index_fp16",
                     "index_int8", "index_fp16_fused", "index_int8_fused", "index_fp16_parallel",
                     "index_int8_parallel", "index_fp16_rescore", "index_int8_rescore", "index_fp16_checked",
                     "index_fp16_numpy", "index_fp16_numpy_checked"}
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["max_err"] < 1e-2 for r in rows if r["kernel"] == "kivi_decode")
    assert {(r["order"], r["block_t"]) for r in rows if r["kernel"] == "kivi_decode" and r["bits"] == 4} >= {
        ("kivi", 64), ("mma", 64), ("mma", 128), ("mma_w", 64)}  # the mma-order kernels beside the KIVI-order one
