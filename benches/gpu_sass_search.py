"""Offline look at the search selects' machine code (no GPU needed): compile the one-program select
(``select="fused"``), the three kernels of the parallel select (``select="parallel"``) and the four of its
rescoring variant (``select="rescore"``, fp16 rows of 384 features) for sm_90 as the JIT
would for a search of ``m`` queries and ``k`` results over ``n`` rows, and print each kernel's registers,
spills, whole-kernel instruction count and the instruction count of each loop.

    python benches/gpu_sass_search.py [--n 1048576] [--shapes 1:10,16:100,64:1024]

Use the lent GPUs' Triton (3.6.0): the same source compiles differently under other versions. The launches
are caught on CPU tensors (nothing runs); see ``gpu_sass.py`` for the method.
"""

from __future__ import annotations

import argparse
import re
import sys

from gpu_sass import G, compile_kernel, listing_loops, torch

S = sys.modules[G.__name__ + ".search"]
KERNELS = ("_threshold_select_kernel", "_parallel_threshold_kernel", "_parallel_gather_kernel",
           "_parallel_rescore_kernel", "_parallel_rank_kernel")


def capture(select: str, m: int, n: int, k: int) -> list:
    """(kernel, grid, args, kwargs) of each launch the select makes for one chunk of ``n`` rows."""
    caught = []
    saved = {name: getattr(S, name) for name in KERNELS}

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: caught.append((self.fn, grid, a, kw))

    for name, fn in saved.items():
        setattr(S, name, Recorder(fn))
    try:
        nt = -(-n // 128)
        s = torch.empty(m, nt * 128)
        tmax = torch.empty(m, nt)
        if select == "fused":
            S._threshold_select(s, tmax, n, 128, k, 0)
        else:  # "rescore": fp16 rows of 384 features, inner products
            exact = (torch.empty(n, 384, dtype=torch.float16), None, None, torch.empty(m, 384), torch.empty(m))
            S._parallel_select(s, tmax, n, 128, k, 0, exact if select == "rescore" else None)
    finally:
        for name, fn in saved.items():
            setattr(S, name, fn)
    return caught


def loops(sass: str) -> tuple[int, list]:
    """The listing's instruction count, and ``(first, last, instructions)`` of each loop, outermost first."""
    ins, found = listing_loops(sass)
    return len(ins), sorted((a, b, b - a + 1) for a, b in found)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--shapes", default="1:10,16:100,64:1024", help="m:k pairs")
    ap.add_argument("--check-gather", action="store_true",
                    help="compile only the parallel select's gather kernel; exit 1 if its code has a memory fence "
                         "(its atomics must stay relaxed) or spills")
    args = ap.parse_args(argv)
    import triton

    if args.check_gather:
        m, k = map(int, args.shapes.split(",")[0].split(":"))
        fn, _, a, kw = next(c for c in capture("parallel", m, args.n, k) if c[0].fn.__name__ == "_parallel_gather_kernel")
        sass, usage, _ = compile_kernel(fn, a, dict(kw))
        fences = len(re.findall(r"\bMEMBAR\b", sass))
        spills = int((re.findall(r"STACK:(\d+)", usage) or ["0"])[0])
        print(f"_parallel_gather_kernel m{m} k{k}: {fences} memory fences, {spills} bytes of stack")
        return 1 if fences or spills else 0

    for shape in args.shapes.split(","):
        m, k = map(int, shape.split(":"))
        for select in ("fused", "parallel", "rescore"):
            for fn, grid, a, kw in capture(select, m, args.n, k):
                kw = dict(kw)
                sass, usage, _ = compile_kernel(fn, a, kw)
                total, found = loops(sass)
                res = " ".join(re.findall(r"(?:REG|STACK|SHARED):\d+", usage))
                name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
                print(f"m{m} k{k} {select:8s} {name:28s} grid {str(tuple(grid)):12s} (triton {triton.__version__}, "
                      f"sm_90): {total} instructions; {res}")
                print("    loops (first, last, size): " + ", ".join(f"{a_}-{b_}:{c_}" for a_, b_, c_ in found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
