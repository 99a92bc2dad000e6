"""Fused decode attention under Nsight Compute: one large cache, a few kernel configurations.

    ncu --kernel-name regex:_kivi_decode --section SpeedOfLight ... python benches/gpu_ncu_decode.py

The cache is timed in KIVI order (``_kivi_decode_kernel``) and in tensor-core operand order
(``_kivi_decode_mma_kernel``, 64- and 128-token tiles). Each configuration runs twice (the first call
compiles); ncu's report says, per launch, how close the kernel came to the memory and issue ceilings, its
occupancy and what its warps waited on.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))

import torch  # noqa: E402

try:
    import engramdb.gpu as G
except Exception:  # no native module: the gpu package stands alone
    import gpu as G

# (the KIVI-order kernel's profile is in benches/gpu_ncu_decode_h100.txt: NCU_KIVI=1 profiles it again)
CONFIGS = [dict(order="mma", q_in_registers=True), dict(order="mma", q_in_registers=False),
           dict(order="mma", block_t=128), dict(order="mma_w")]
if os.environ.get("NCU_ONLY") == "mma_w":  # the warps kernel's defaults alone (a short profile)
    CONFIGS = [dict(order="mma_w")]
if os.environ.get("NCU_KIVI"):
    CONFIGS = [dict(unpack="join"), dict(unpack="expand", prefetch="none")] + CONFIGS


def main() -> int:
    b, hq, hkv, d, t, bits = (int(x) for x in (sys.argv[1:] or ["32", "32", "8", "128", "16384", "4"]))
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.float16)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.float16)
    kq = G.kv_quant.quantize_keys(k[:, :, : t - 64], bits, 32)
    vq = G.kv_quant.quantize_values(v[:, :, : t - 64], bits, 32)
    kr, vr = k[:, :, t - 64:].contiguous(), v[:, :, t - 64:].contiguous()
    del k, v
    mma = (G.kv_quant.to_mma_order(kq), G.kv_quant.to_mma_order(vq))
    warps = (mma[0], G.kv_quant.to_mma_order(vq, warps=True))
    for cfg in CONFIGS:
        kw = {key: val for key, val in cfg.items() if key != "order"}
        ck, cv = {"mma": mma, "mma_w": warps}.get(cfg.get("order"), (kq, vq))
        for _ in range(2):
            G.kivi_decode_attention(q, ck, cv, kr, vr, **kw)
        torch.cuda.synchronize()
        print("ran", cfg, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
