"""Compile every shipped Triton kernel config for sm_90 without a GPU; check it fits an H100.

The interpreter accepts tiles a GPU cannot launch, so this compiles the real configs
(prefill_config by page size, DECODE_CONFIGS) with triton's bundled ptxas for
GPUTarget("cuda", 90, 32) and asserts their shared memory fits 232448 bytes.
TRITON_INTERPRET must be unset while the kernels are defined, so the compiles run in a
subprocess (this file run as a script), with the divisibility specialization a real launch
would get for 16-aligned arguments.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_MEMORY = 232448
REPO = Path(__file__).resolve().parents[2]

# Example launch values of the Qwen2.5-7B layout (28 q / 4 kv heads, 64-token blocks).
_PREFILL_PTRS = dict(
    BT="*i64",
    LSE="*fp32",
    CU_Q="*i32",
    Q_POS0="*i32",
    K_START="*i32",
    K_END="*i32",
    INV_FREQ="*fp32",
)
_PREFILL_INTS = dict(
    chunk_len=253952,
    chunk_size=262144,
    stride_qt=3584,
    stride_qh=128,
    stride_kb=32768,
    stride_ks=512,
    stride_kh=128,
    stride_sb=256,
    stride_ss=4,
    stride_sh=1,
    stride_ot=3584,
    stride_oh=128,
    stride_lh=32768,
    stride_bt=2049,
)
_DECODE_PTRS = dict(BT="*i64", CTX="*i64", O_PART="*fp32", LSE_PART="*fp32", INV_FREQ="*fp32")
_DECODE_INTS = dict(
    chunk_len=253952,
    chunk_size=262144,
    partition_size=1024,
    max_keys=131072,
    stride_qb=3584,
    stride_qh=128,
    stride_kb=32768,
    stride_ks=512,
    stride_kh=128,
    stride_sb=256,
    stride_ss=4,
    stride_sh=1,
    stride_bt=2049,
    stride_pb=3584 * 128,
    stride_ph=128 * 128,
    stride_pp=128,
    stride_lb=3584,
    stride_lh=128,
)
_REDUCE_PTRS = dict(O_PART="*fp32", LSE_PART="*fp32", CTX="*i64", LSE="*fp32")
_REDUCE_INTS = dict(
    partition_size=1024,
    stride_pb=3584 * 128,
    stride_ph=128 * 128,
    stride_pp=128,
    stride_lb=3584,
    stride_lh=128,
    stride_ob=3584,
    stride_oh=128,
    stride_lse_h=8,
)


def _cases() -> dict[str, dict]:
    """name -> kernel, dtype, constexprs, launch options."""
    cases = {}
    for d in (64, 128):
        for dca in (False, True):
            for dtype in ("bf16", "fp16"):
                cases[f"prefill-d{d}-{dtype}-{'dca' if dca else 'dense'}"] = dict(
                    kernel="prefill", d=d, dtype=dtype, paged=True, page=64, dca=dca
                )
    cases["prefill-d128-bf16-contiguous"] = dict(
        kernel="prefill", d=128, dtype="bf16", paged=False, page=64, dca=False
    )
    for dca in (False, True):  # 128-token pages: 128-key tiles (LARGE_PAGE_PREFILL_CONFIGS)
        cases[f"prefill-d128-bf16-page128-{'dca' if dca else 'dense'}"] = dict(
            kernel="prefill", d=128, dtype="bf16", paged=True, page=128, dca=dca
        )
    cases["prefill-d128-bf16-page16"] = dict(
        kernel="prefill", d=128, dtype="bf16", paged=True, page=16, dca=False
    )
    for d in (64, 128):
        for dca in (False, True):
            cases[f"decode-d{d}-bf16-{'dca' if dca else 'dense'}"] = dict(
                kernel="decode", d=d, dtype="bf16", page=64, dca=dca
            )
        cases[f"reduce-d{d}"] = dict(kernel="reduce", d=d, dtype="bf16")
    for d in (16, 32, 256):  # untuned fallbacks: must still fit
        cases[f"prefill-d{d}-fp32-dca"] = dict(
            kernel="prefill", d=d, dtype="fp32", paged=True, page=16, dca=True
        )
        cases[f"decode-d{d}-fp32-dca"] = dict(kernel="decode", d=d, dtype="fp32", page=16, dca=True)
    # float32 correctness checks on the GPU run the 7B head size over 128-token pages
    cases["prefill-d128-fp32-page128"] = dict(
        kernel="prefill", d=128, dtype="fp32", paged=True, page=128, dca=False
    )
    cases["decode-d128-fp16-page16"] = dict(
        kernel="decode", d=128, dtype="fp16", page=16, dca=False
    )
    # the Hopper kernel (Gluon, warp-specialized) and its query-rotation pre-pass
    for d in (64, 128):
        for causal in (False, True):
            cases[f"ws-d{d}-bf16-{'causal' if causal else 'range'}"] = dict(
                kernel="ws", d=d, dtype="bf16", paged=True, page=128, causal=causal
            )
    for page in (16, 64):  # a 128-key tile from several pages, one TMA box each
        cases[f"ws-d128-bf16-page{page}"] = dict(
            kernel="ws", d=128, dtype="bf16", paged=True, page=page, causal=True
        )
    cases["ws-d128-fp16-contiguous"] = dict(
        kernel="ws", d=128, dtype="fp16", paged=False, page=128, causal=True
    )
    cases["rotate-d128-bf16-dca"] = dict(kernel="rotate", d=128, dtype="bf16")
    for causal in (False, True):  # the pattern estimation's two passes
        for kernel in ("est_stats", "est_probs"):
            cases[f"{kernel}-d128-bf16-{'causal' if causal else 'parts'}"] = dict(
                kernel=kernel, d=128, dtype="bf16", causal=causal
            )
    cases["merge-d128-bf16"] = dict(kernel="merge", d=128, dtype="bf16")
    # fp8 KV cache (float8_e4m3fn values + float32 scales), bf16 compute
    for dca in (False, True):
        name = "dca" if dca else "dense"
        cases[f"prefill-d128-bf16-fp8kv-page64-{name}"] = dict(
            kernel="prefill", d=128, dtype="bf16", paged=True, page=64, dca=dca, fp8=True
        )
        cases[f"decode-d128-bf16-fp8kv-{name}"] = dict(
            kernel="decode", d=128, dtype="bf16", page=64, dca=dca, fp8=True
        )
    cases["prefill-d128-bf16-fp8kv-page128-dense"] = dict(
        kernel="prefill", d=128, dtype="bf16", paged=True, page=128, dca=False, fp8=True
    )
    return cases


def _signature(fn, ptrs: dict, ints: dict, floats: tuple, dtype: str, fp8: bool = False):
    kv = "fp8e4nv" if fp8 else dtype
    ptrs = {"Q": f"*{dtype}", "K": f"*{kv}", "V": f"*{kv}", "Out": f"*{dtype}", **ptrs}
    if fp8:
        ptrs.update(K_SCALE="*fp32", V_SCALE="*fp32", K_ZERO="*fp32")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ints:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    return sig, attrs


def _compile_case(case: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # the package re-exports functions named like these modules: import the modules themselves
    fp = importlib.import_module("longctx.ops.triton.flash_prefill")
    pd = importlib.import_module("longctx.ops.triton.paged_decode")

    d, dtype, fp8 = case["d"], case["dtype"], case.get("fp8", False)
    scales = {} if fp8 else dict(K_SCALE=None, V_SCALE=None, K_ZERO=None)  # None: no fp8 cache
    if case["kernel"] == "prefill":
        itemsize = 4 if dtype == "fp32" else 2
        cfg = fp.prefill_config(d, case["page"] if case["paged"] else None, itemsize)
        # tensor descriptors where the wrapper would build them (pages hold whole tiles; not
        # over fp8 caches)
        tma = cfg.tma and (not case["paged"] or case["page"] % cfg.block_n == 0) and not fp8
        fn = fp._flash_prefill_kernel
        sig, attrs = _signature(
            fn, _PREFILL_PTRS, _PREFILL_INTS, ("qk_scale", "yarn_inv_orig"), dtype, fp8
        )
        if tma:  # host TensorDescriptor arguments, block [BLOCK_N, D]
            sig["K_DESC"] = sig["V_DESC"] = f"tensordesc<{dtype}[{cfg.block_n}, {d}]>"
        const = dict(
            GROUPS=7,
            HEAD_DIM=d,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            PAGE_SIZE=case["page"],
            PAGED=case["paged"],
            CAUSAL=True,
            ROPE=case["dca"],
            DCA=case["dca"],
            YARN=case["dca"],
            UPCAST=False,
            DOT_PREC="ieee" if dtype == "fp32" else "tf32",
            FAST_TRIG=True,
            TMA=tma,
            KV_FP8=fp8,
            **scales,
        )
        if not tma:
            const.update(K_DESC=None, V_DESC=None)
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif case["kernel"] == "decode":
        # as paged_decode picks it: the fp8 config for dense fp8, the plain one otherwise
        cfg = (pd.FP8_DECODE_CONFIGS if fp8 and not case["dca"] else pd.DECODE_CONFIGS)[d]
        fn = pd._paged_decode_kernel
        sig, attrs = _signature(
            fn, _DECODE_PTRS, _DECODE_INTS, ("qk_scale", "yarn_inv_orig"), dtype, fp8
        )
        const = dict(
            GROUPS=7,
            BLOCK_G=16,
            HEAD_DIM=d,
            BLOCK_N=cfg.block_n,
            PAGE_SIZE=case["page"],
            ROPE=case["dca"],
            DCA=case["dca"],
            YARN=case["dca"],
            UPCAST=False,
            DOT_PREC="ieee" if dtype == "fp32" else "tf32",
            FAST_TRIG=True,
            USE_PDL=cfg.pdl,
            KV_FP8=fp8,
            **scales,
        )
        opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif case["kernel"] == "ws":
        return _compile_ws(case)
    elif case["kernel"] == "rotate":
        fn = fp._rotate_queries_kernel
        ptrs = dict(Q="*bf16", Out="*bf16", CU_Q="*i32", Q_POS0="*i32", INV_FREQ="*fp32")
        ints = dict(stride_qt=4608, stride_qh=128, stride_ot=3584, stride_oh=128)
        ints.update(chunk_len=253952, chunk_size=262144, stride_op=3584 * 32768)
        sig, attrs = _signature(fn, ptrs, ints, (), case["dtype"])
        const = dict(HEAD_DIM=case["d"], BLOCK_M=32, DCA=True, FAST_TRIG=True)
        opts = dict(num_warps=4)
    elif case["kernel"] in ("est_stats", "est_probs"):
        se = importlib.import_module("longctx.ops.triton.sparse_estimate")
        stats = case["kernel"] == "est_stats"
        fn = se._row_stats_kernel if stats else se._probs_kernel
        ptrs = dict(
            q_ptr="*bf16", k_ptr="*bf16", m_ptr="*fp32", l_ptr="*fp32", lse_ptr="*fp32",
            vert_ptr="*fp32", buf_ptr="*fp32",
        )  # fmt: skip
        ints = dict(
            key_lo=0, key_hi=1048576, est_pos0=1048512, rows=64, num_tiles=16384, h0=0,
            fold=253952, periods=3, width=253952, stride_qr=3584, stride_qh=128,
            stride_kl=512, stride_kh=128, stride_vh=1048576, stride_bg=64 * 1048702,
            stride_br=1048702,
        )  # fmt: skip
        sig, attrs = _signature(fn, ptrs, ints, ("scale",), case["dtype"])
        const = dict(
            GROUPS=7, CAUSAL=case["causal"], HEAD_DIM=case["d"], ROWS_PAD=64,
            BLOCK_N=se.BLOCK_N, UPCAST=False,
        )  # fmt: skip
        if stats:
            const["SLOTS"] = se.SLOTS
        opts = dict(num_warps=4)
    elif case["kernel"] == "merge":
        fn = fp._merge_parts_kernel
        ptrs = dict(Parts="*bf16", PartLSE="*fp32", Out="*bf16", LSE="*fp32")
        ints = dict(n_rows=32768, stride_lh=98304, stride_ot=3584, stride_oh=128, stride_mh=32768)
        sig, attrs = _signature(fn, ptrs, ints, (), case["dtype"])
        const = dict(NUM_PARTS=3, HEAD_DIM=case["d"], BLOCK_M=32)
        opts = dict(num_warps=4)
    else:
        fn = pd._decode_reduce_kernel
        sig, attrs = _signature(fn, _REDUCE_PTRS, _REDUCE_INTS, (), dtype)
        const = dict(BLOCK_D=min(d, pd.REDUCE_BLOCK_D), BLOCK_P=pd.REDUCE_BLOCK_P, USE_PDL=True)
        opts = dict(num_warps=4, launch_pdl=True)
    src = ASTSource(fn, sig, const, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    return dict(shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps)


def _compile_ws(case: dict) -> dict:
    """The Gluon kernel with the descriptors and constants flash_prefill_ws launches it with."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    ws = importlib.import_module("longctx.ops.triton.flash_prefill_ws")
    fn, d, dtype = ws._flash_prefill_ws_kernel, case["d"], case["dtype"]
    gl_dtype = gl.bfloat16 if dtype == "bf16" else gl.float16
    box = min(case["page"], ws.BLOCK_N) if case["paged"] else ws.BLOCK_N  # TMA rows per load
    descs = {}
    for name, rows in (("q_desc", ws.BLOCK_M), ("k_desc", box), ("v_desc", box)):
        layout = gl.NVMMASharedLayout.get_default_for([rows, d], gl_dtype)
        descs[name] = f"tensordesc<{dtype}[{rows}, {d}],{layout!r}>"
    ptrs = dict(Out=f"*{dtype}", LSE="*fp32", BT="*i64", CU_Q="*i32", Q_POS0="*i32")
    ptrs.update(K_START="*i32", K_END="*i32")
    const = dict(
        GROUPS=7,
        HEAD_DIM=d,
        BLOCK_M=ws.BLOCK_M,
        BLOCK_N=ws.BLOCK_N,
        BOX=box,
        PAGE_SIZE=case["page"] if case["paged"] else ws.BLOCK_N,
        PAGED=case["paged"],
        CAUSAL=case["causal"],
        STAGES=ws.STAGES,
        YARN=case["causal"],  # both flavours of the logit scale
        COMPUTE_REGS=ws.COMPUTE_REGS,
        LOADER_REGS=ws.LOADER_REGS,
    )
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in descs:
            sig[name] = descs[name]
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in const:
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name in ("qk_scale", "yarn_inv_orig") else "i32"
    src = GluonASTSource(fn, sig, const, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    return dict(shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps)


def _main() -> None:
    """Subprocess entry: compile the cases named in argv (all by default), print JSON."""
    from concurrent.futures import ProcessPoolExecutor

    cases = _cases()
    names = sys.argv[1:] or list(cases)
    results = {}
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {n: pool.submit(_compile_case, cases[n]) for n in names}
        for n, f in futures.items():
            try:
                results[n] = f.result()
            except Exception as e:  # reported per case by the test
                results[n] = dict(error=f"{type(e).__name__}: {e}"[:2000])
    print("RESULTS " + json.dumps(results))


def _offline_cuda_compile_unavailable() -> str | None:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        return "this triton build has no NVIDIA backend"
    if not (Path(nv.__file__).parent / "bin" / "ptxas").exists() and not os.environ.get(
        "TRITON_PTXAS_PATH"
    ):
        return "this triton build bundles no ptxas (set TRITON_PTXAS_PATH)"
    return None


@pytest.fixture(scope="module")
def compiled() -> dict:
    reason = _offline_cuda_compile_unavailable()
    if reason:
        pytest.skip(f"cannot compile for sm_90 offline: {reason}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, f"compile subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.parametrize("name", list(_cases()))
def test_compiles_for_sm90_within_shared_memory(compiled, name):
    res = compiled[name]
    assert "error" not in res, res.get("error")
    assert res["shared"] <= H100_SHARED_MEMORY, f"{name}: {res['shared']} bytes of shared memory"


if __name__ == "__main__":
    _main()
