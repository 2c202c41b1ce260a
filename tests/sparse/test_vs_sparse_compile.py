"""Compile the sparse kernel's shipped configs for sm_90 without a GPU and check they fit an
H100's shared memory (the interpreter accepts tiles a GPU cannot launch). Runs in a subprocess:
TRITON_INTERPRET must be unset while the kernel is defined."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_MEMORY = 232448
REPO = Path(__file__).resolve().parents[2]

# Launch values of the Qwen2.5-7B layout (28 q / 4 kv heads) at a 32K chunk, 1000 columns.
_PTRS = dict(BT="*i64", LSE="*fp32", TILE_O="*i32", TILE_E="*i32", TILE_RANGE="*i32")
_PTRS.update(COLS="*i32", COL_CNT="*i32", PART="*i32")
_INTS = dict(
    q_pos0=131072, n_rows=32768, stride_qp=32768 * 3584, stride_qt=3584, stride_qh=128,
    stride_kb=32768, stride_ks=512, stride_kh=128, stride_sb=256, stride_ss=4, stride_sh=1,
    stride_ot=3584, stride_oh=128,
    stride_lh=32768, stride_tp=28 * 200, stride_th=200, stride_rp=28 * 1024, stride_rh=1024,
    stride_cp=28 * 512 * 1000, stride_ch=512 * 1000, stride_cb=1000, stride_np=28 * 512,
    stride_nh=512,
)  # fmt: skip


def _compile(d: int, parts: int, fp8: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from longctx.ops.triton import vs_sparse

    fn, cfg = vs_sparse._vs_sparse_kernel, vs_sparse.SPARSE_CONFIGS[d]
    kv = "*fp8e4nv" if fp8 else "*bf16"
    ptrs = {"Q": "*bf16", "K": kv, "V": kv, "Out": "*bf16", **_PTRS}
    if fp8:
        ptrs.update(K_SCALE="*fp32", V_SCALE="*fp32", K_ZERO="*fp32")
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
        elif name in _INTS:
            sig[name] = "i32"
            if _INTS[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "qk_scale" else "constexpr"
    const = dict(
        NUM_PARTS=parts, GROUPS=7, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PAGE_SIZE=64, UPCAST=False, DOT_PREC="tf32", KV_FP8=fp8,
    )  # fmt: skip
    if not fp8:
        const.update(K_SCALE=None, V_SCALE=None, K_ZERO=None)
    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), GPUTarget("cuda", 90, 32), opts)
    return dict(shared=kernel.metadata.shared)


CASES = [(128, 1, False), (128, 3, False), (64, 1, False), (128, 3, True)]


def _main() -> None:
    results = {}
    for d, parts, fp8 in CASES:
        name = f"{d}-{parts}{'-fp8' if fp8 else ''}"
        try:
            results[name] = _compile(d, parts, fp8)
        except Exception as e:  # reported per case by the test
            results[name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def compiled() -> dict:
    try:
        import triton.backends.nvidia as nv
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")
    if not (Path(nv.__file__).parent / "bin" / "ptxas").exists():
        pytest.skip("this triton build bundles no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, f"compile subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(line[len("RESULTS ") :])


@pytest.mark.parametrize("d,parts,fp8", CASES)
def test_compiles_for_sm90_within_shared_memory(compiled, d, parts, fp8):
    res = compiled[f"{d}-{parts}{'-fp8' if fp8 else ''}"]
    assert "error" not in res, res.get("error")
    assert res["shared"] <= H100_SHARED_MEMORY


if __name__ == "__main__":
    _main()
