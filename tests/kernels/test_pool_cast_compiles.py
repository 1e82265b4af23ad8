"""The fused kernels stay valid GPU Triton: compile them ahead of time for NVIDIA GPUs, without one.

The interpreter runs the kernels' logic in the other tests; it does not check that they lower to a
GPU program. Triton compiles for a named target with no device present, down to a cubin with its
bundled ``ptxas``, so every specialisation the launcher can produce is compiled here for Ampere (sm_80)
and Hopper (sm_90): the single pass and both stages of the split (partial sums/maxima, finalize). This
runs in a fresh interpreter without ``TRITON_INTERPRET``, because this test process imported triton in
interpreter mode (the test configuration's switch for CPU runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import itertools, json, sys
import triton
from triton.backends.compiler import GPUTarget
from cellstrata.kernels import pool_cast_triton as m

assert not m.INTERPRETING
KERNELS = {"single": m._pool_cast_kernel, "partial": m._pool_partial_kernel, "finalize": m._pool_finalize_kernel}
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
cases = json.loads(sys.argv[1])
done = []
for c in cases:
    kernel = KERNELS[c["kernel"]]
    block_t, block_h, warps = m.block_sizes(c["hidden"], {"float32": 4}.get(c["in"], 2))
    mean, total, peak = c["slots"]
    every = dict(SLOT_MEAN=mean, SLOT_SUM=total, SLOT_MAX=peak, N_PICKS=c["picks"], PADDED=c["padded"],
                 COUNT_OVERFLOW=c["count"], BLOCK_T=block_t, BLOCK_H=block_h, DO_SUM=mean >= 0 or total >= 0,
                 DO_MAX=peak >= 0)
    consts = {p.name: every[p.name] for p in kernel.params if p.is_constexpr}
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name == "out_ptr":
            sig[p.name] = "*" + TYPES[c["out"]]
        elif p.name == "hidden_ptr":
            sig[p.name] = "*" + TYPES[c["in"]]
        elif p.name.startswith("ws_"):
            sig[p.name] = "*fp32"
        elif p.name == "overflow_ptr":
            sig[p.name] = "*i64"
        elif p.name == "picks_ptr":
            sig[p.name] = "*i32"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*i64"
        else:
            sig[p.name] = "i64" if p.name.startswith("stride") else "i32"
    target = GPUTarget("cuda", c["arch"], 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": warps})
    compiled = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts),
                              target=target, options=options.__dict__)
    assert compiled.asm["cubin"], c
    done.append({"case": c, "block": [block_t, block_h, warps], "ptx_bytes": len(compiled.asm["ptx"])})
print(json.dumps(done))
"""

ALL_SLOTS = [0, 1, 2]  # mean, sum, max all requested
CASES = [
    # every pooling, float16 store with overflow counting, bf16 input (GPU autocast), padded, both archs
    {"arch": 90, "in": "bfloat16", "out": "float16", "hidden": 512, "slots": ALL_SLOTS, "picks": 4, "padded": True},
    {"arch": 80, "in": "bfloat16", "out": "float16", "hidden": 2560, "slots": ALL_SLOTS, "picks": 4, "padded": True},
    # packed layout (cu_seqlens), float32 everything, scFoundation-like picks from the end
    {"arch": 90, "in": "float32", "out": "float32", "hidden": 768, "slots": [0, -1, 1], "picks": 2, "padded": False},
    # mean only; picks only; tiny hidden
    {"arch": 90, "in": "float16", "out": "float16", "hidden": 8, "slots": [0, -1, -1], "picks": 0, "padded": True},
    {"arch": 90, "in": "float16", "out": "float32", "hidden": 2048, "slots": [-1, -1, -1], "picks": 1, "padded": False},
    # max only (the split's sum plane unused), odd hidden
    {"arch": 80, "in": "float32", "out": "float16", "hidden": 33, "slots": [-1, -1, 0], "picks": 0, "padded": False},
]


STAGES = ("partial", "finalize")
SPLIT = (0, 1, 2, 3, 5)  # CASES that can split (a span op requested): their two stages are compiled too


def test_kernel_compiles_for_nvidia_targets(tmp_path):
    cases = [{**c, "count": c["out"] == "float16", "kernel": "single"} for c in CASES]
    cases += [{**CASES[i], "count": CASES[i]["out"] == "float16", "kernel": k} for i in SPLIT for k in STAGES]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # import the installed package, not the checkout's cellstrata/ folder (python -c puts cwd first)
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(done) == len(cases)
    for row in done:
        block_t, block_h, _ = row["block"]
        assert block_t & (block_t - 1) == 0 and block_h & (block_h - 1) == 0  # powers of two
        assert row["ptx_bytes"] > 0
