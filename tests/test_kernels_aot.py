"""The Triton kernels (reorganize and the fused ICE score) compile for a Hopper GPU (sm_90) ahead of
time, without a GPU.

The interpreter runs the kernels' Python semantics but not Triton's compiler, so a kernel can pass
every CPU test and still fail to compile on a GPU. Triton ships ptxas, so compiling to a cubin for
sm_90 catches that here, in CI, for every dtype and flag combination the launchers use.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ice_prune.kernels import triton_reorganize as T

    target = GPUTarget("cuda", 90, 32)
    compiled = 0

    def build(fn, sig, consts):
        global compiled
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        assert len(kernel.asm["cubin"]) > 0
        compiled += 1

    for key in ("fp32", "fp64"):
        build(T._order_kernel,
              {"s_ptr": f"*{key}", "order_ptr": "*i64", "n": "i32", "stride_sb": "i32",
               "stride_sn": "i32", "KEY_FP64": "constexpr", "BLOCK_I": "constexpr",
               "BLOCK_J": "constexpr"},
              {"KEY_FP64": key == "fp64", "BLOCK_I": 64, "BLOCK_J": 128})
    flags = ("FUSE", "NORMALIZE", "EPS_", "BLOCK_R", "BLOCK_D")
    for dt, fuse, norm in itertools.product(("bf16", "fp16", "fp32"), (True, False), (True, False)):
        consts = {"FUSE": fuse, "NORMALIZE": norm, "EPS_": T.EPS, "BLOCK_R": 32, "BLOCK_D": 128}
        ints = lambda *names: {n: "i32" for n in names}
        build(T._backward_kernel,
              {"g_ptr": f"*{dt}", "x_ptr": f"*{dt}", "s_ptr": "*fp32", "order_ptr": "*i64",
               "gx_ptr": f"*{dt}", "dot_ptr": "*fp32",
               **ints("P", "n", "keep", "D", "stride_gb", "stride_gn", "stride_gd", "stride_xb",
                      "stride_xn", "stride_xd", "stride_sb", "stride_sn", "stride_ordb",
                      "stride_ordn", "stride_gxb", "stride_gxn", "stride_dotb", "stride_dotc"),
               **{f: "constexpr" for f in flags}}, consts)
    print("compiled", compiled)
''')


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """``_order_kernel`` (fp32 / fp64 keys) and ``_backward_kernel`` for every dtype x FUSE x
    NORMALIZE."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: really compile
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled 14" in res.stdout


# registers and stack (spill) bytes a thread of a compiled kernel, read with Triton's cuobjdump;
# prepended to the scripts that print them
RESOURCE_USAGE = textwrap.dedent('''
    import os
    import re
    import subprocess
    import tempfile
    import triton

    def resource_usage(kernel):
        """(regs, stack) matches of cuobjdump's resource usage, or None where it prints none."""
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                 "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        return tuple(re.search(name + r":(\\d+)", usage) for name in ("REG", "STACK"))
''')


ONE_LAUNCH_SCRIPT = RESOURCE_USAGE + textwrap.dedent('''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ice_prune.kernels import triton_reorganize as T

    target = GPUTarget("cuda", 90, 32)
    ints = ("P", "n", "keep", "D", "stride_xb", "stride_xn", "stride_xd", "stride_sb", "stride_sn",
            "stride_ob", "stride_on")
    flags = ("FUSE", "NORMALIZE", "KEY_FP64", "EPS_", "BLOCK_I", "BLOCK_J", "BLOCK_D")
    compiled = 0

    def build(dt, fuse, norm, score_dt, blocks, num_warps, unit_strides=False):
        global compiled
        key_fp64 = score_dt == "fp64"
        sig = {"x_ptr": f"*{dt}", "s_ptr": f"*{score_dt}", "order_ptr": "*i64",
               "out_ptr": f"*{dt}", **{k: "i32" for k in ints}, **{f: "constexpr" for f in flags}}
        consts = {"FUSE": fuse, "NORMALIZE": norm, "KEY_FP64": key_fp64, "EPS_": T.EPS, **blocks}
        if unit_strides:  # as the JIT specializes contiguous inputs: stride 1 is a constant
            for k in ("stride_xd", "stride_sn"):
                sig[k], consts[k] = "constexpr", 1
        source = ASTSource(fn=T._reorganize_kernel, signature=sig, constexprs=consts)
        kernel = triton.compile(source, target=target, options={"num_warps": num_warps})
        assert len(kernel.asm["cubin"]) > 0
        compiled += 1
        return kernel

    # every dtype and flag at the interpreter's blocks; fp32 scores, then fp64 / bf16 / fp16 ones
    for dt, fuse, norm in itertools.product(("bf16", "fp16", "fp32"), (True, False), (True, False)):
        build(dt, fuse, norm, "fp32", T.INTERPRETER_CONFIG, 4)
    for score_dt in ("fp64", "bf16", "fp16"):
        build("bf16", True, True, score_dt, T.INTERPRETER_CONFIG, 4)
    # every autotune config that survives pruning at DeiT-S's shape (n = 196, D = 384), bf16,
    # contiguous; its registers printed (pytest -s)
    configs = T._prune_configs(T.AUTOTUNE_CONFIGS, {"n": 196, "D": 384})
    assert 0 < len(configs) < len(T.AUTOTUNE_CONFIGS)
    for config in configs:
        kernel = build("bf16", True, False, "fp32", config.kwargs, config.num_warps, True)
        regs, stack = resource_usage(kernel)
        print("config", config.kwargs, "warps", config.num_warps,
              "regs", regs.group(1) if regs else "?", "stack", stack.group(1) if stack else "?")
    print("compiled", compiled, "configs", len(configs))
''')


def test_one_launch_forward_compiles_for_sm90_without_a_gpu(tmp_path):
    """``_reorganize_kernel`` for every dtype x FUSE x NORMALIZE (and fp64 / bf16 / fp16 scores), and
    for every block / warp configuration the autotuner may pick at DeiT-S's shape."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", ONE_LAUNCH_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    configs = int(res.stdout.split("configs")[-1])
    assert f"compiled {15 + configs} " in res.stdout

ICE_SCORE_SCRIPT = RESOURCE_USAGE + textwrap.dedent('''
    import itertools
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ice_prune.kernels import triton_ice_score as S

    target = GPUTarget("cuda", 90, 32)
    # the launcher's configuration: tiles, warps, pipeline stages
    consts = {"UPCAST": False, "BLOCK_T": S._BLOCK_T, "BLOCK_C": S._BLOCK_C, "BLOCK_D": S._BLOCK_D}
    options = {"num_warps": S._NUM_WARPS, "num_stages": S._NUM_STAGES}
    ints = ("T", "n", "C", "D", "stride_hb", "stride_hn", "stride_hd", "stride_wc", "stride_wd",
            "stride_bias")
    flags = ("HAS_BIAS", "COMPUTE", "UPCAST", "INPUT_PRECISION", "BLOCK_T", "BLOCK_C", "BLOCK_D")
    # (stored dtype, compute dtype, fp32 dot precision): bf16 / fp16 models, fp32 under autocast,
    # plain fp32 with and without TF32
    cases = [("bf16", "bf16", "tf32"), ("fp16", "fp16", "tf32"), ("fp32", "bf16", "tf32"),
             ("fp32", "fp16", "tf32"), ("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32")]
    dtypes = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    compiled = 0
    for (dt, compute, precision), bias in itertools.product(cases, (False, True)):
        sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "out_ptr": "*fp32",
               **{k: "i32" for k in ints}, **{f: "constexpr" for f in flags}}
        flag_values = {**consts, "HAS_BIAS": bias, "COMPUTE": dtypes[compute],
                       "INPUT_PRECISION": precision}
        kernel = triton.compile(
            ASTSource(fn=S._ice_score_kernel, signature=sig, constexprs=flag_values),
            target=target, options=options)
        assert len(kernel.asm["cubin"]) > 0
        # an H100 block has at most 227 KiB of shared memory
        assert kernel.metadata.shared <= 227 * 1024, (dt, compute, kernel.metadata.shared)
        # bf16 / fp16 dots run on Hopper's tensor cores (warp-group MMA)
        if compute != "fp32":
            assert "wgmma" in kernel.asm["ptx"], (dt, compute)
        compiled += 1
    # every autotune config at DeiT-S's shape (batch 256, the 1001-way head), bf16 under autocast:
    # within an H100's shared memory, on the tensor cores; registers and stack printed (pytest -s)
    configs = S._prune_configs(S.AUTOTUNE_CONFIGS, {"T": 256 * 196, "C": 1000, "D": 384})
    assert len(configs) == len(S.AUTOTUNE_CONFIGS)  # nothing to clamp at this size
    sig = {"h_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*fp32",
           **{k: "i32" for k in ints}, **{f: "constexpr" for f in flags}}
    for config in configs:
        flag_values = {**config.kwargs, "UPCAST": False, "HAS_BIAS": False,
                       "COMPUTE": tl.bfloat16, "INPUT_PRECISION": "tf32"}
        kernel = triton.compile(
            ASTSource(fn=S._ice_score_kernel, signature=sig, constexprs=flag_values),
            target=target, options={"num_warps": config.num_warps,
                                    "num_stages": config.num_stages})
        assert kernel.metadata.shared <= 227 * 1024, (config, kernel.metadata.shared)
        assert "wgmma" in kernel.asm["ptx"], config
        regs, stack = resource_usage(kernel)
        print("config", config.kwargs, "warps", config.num_warps, "stages", config.num_stages,
              "shared", kernel.metadata.shared, "regs", regs.group(1) if regs else "?",
              "stack", stack.group(1) if stack else "?")
        assert stack is None or stack.group(1) == "0", ("register spill", config)
        compiled += 1
    print("compiled", compiled)
''')


def test_ice_score_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", ICE_SCORE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    assert "compiled 20" in res.stdout
