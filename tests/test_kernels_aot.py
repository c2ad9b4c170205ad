"""The Triton kernels (reorganize and the fused ICE score) compile for a Hopper GPU (sm_90) ahead of
time, without a GPU.

The interpreter runs the kernels' Python semantics but not Triton's compiler, so a kernel can pass
every CPU test and still fail to compile on a GPU. Triton ships ptxas, so compiling to a cubin for
sm_90 catches that here, in CI, for every dtype and flag combination the launchers use.
"""
import os
import re
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


# The score kernel compiled as the JIT compiles it at run time: the launcher's own arguments
# (``kernel_arguments``: the head cast to the compute dtype, contiguous) on CPU tensors of the real
# shapes, bound and specialized by Triton's JIT binder for the target (unit strides constant,
# divisibility by 16, T left unspecialized), then compiled for it. Prepended: the resource usage.
ICE_SCORE_SCRIPT = RESOURCE_USAGE + textwrap.dedent('''
    import itertools
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from ice_prune.kernels import triton_ice_score as S
    from ice_prune.kernels import triton_reorganize as R

    # a block's shared memory: an H100 / H200 227 KiB, an sm_86 / sm_89 GPU 99 KiB
    SHARED = {90: 227 * 1024, 86: 99 * 1024}
    BACKENDS = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in SHARED}

    def bind(kernel, arch, args, kwargs):
        """(signature, constexprs, attrs, options, the JIT's specialization) of a launch."""
        backend = BACKENDS[arch]
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        options, sig, consts, attrs = kernel._pack_args(backend, options, bound, spec, options)
        return sig, consts, attrs, options, spec

    def score_call(B, n, D, C, h_dtype, compute, bias, top_class, config, explain=False):
        """The launcher's arguments, flags and tiles for one call; ``explain``: into a map (a later
        point's: 141 tokens standing for 197 patches and a fused token)."""
        h = torch.randn(B, n + 1, D).to(h_dtype)[:, 1:]  # the selector's view, prefix token off
        weight = torch.randn(C + 1, D)  # the head's fp32 parameters
        out = torch.empty(B, n)
        top = torch.empty(B, n, dtype=torch.int64) if top_class else out
        top_prob = torch.empty(B, n) if top_class else out
        into = None
        if explain:
            P = n + 1
            patches = torch.randint(P + 1, (B, n))
            into = S.MapTarget(patches, 1, torch.empty(B, P + 1),
                               torch.empty(B, P + 1, dtype=torch.int64),
                               torch.empty(B, P + 1, dtype=torch.int64), torch.empty(B, P + 1))
        args, flags = S.kernel_arguments(h, weight, torch.randn(C + 1) if bias else None, compute,
                                         out, top, top_prob, into)
        return args, {**flags, **S._meta(config, C, D, compute.itemsize)}

    # ---- IR reading: which kernel argument each global read comes from, and in how many loops
    REF = re.compile(r"%[\\w.$-]+")
    READS = ("tt.load ", "ttg.async_copy_global_to_local ", "tt.descriptor_load ",
             "ttng.async_tma_copy_global_to_local ")

    def ops(ir):
        """``(op text, scf.for depth)`` per op; defs: result name -> operand names (an scf.for's
        iteration arguments -> their initial values); the kernel's argument names."""
        defs, args, stack, out = {}, set(), [], []
        for line in ir.splitlines():
            text = line.strip()
            if text.endswith(")") and " loc(" in text:  # the op's location, not its regions
                text = text.rsplit(" loc(", 1)[0]
            if text.startswith("}"):
                stack.pop()
            depth = stack.count("for")
            if text.startswith("tt.func"):
                args = set(re.findall(r"(%[\\w.$-]+):", text))
            m = re.match(r"(%[\\w.$-]+)(?::\\d+)? = (.*)", text)
            if m:
                name, op = m.groups()
                defs[name] = REF.findall(op)
                if op.startswith("scf.for"):
                    iv = re.match(r"scf.for (%[\\w.$-]+) = ", op).group(1)
                    defs[iv] = []
                    for a, b in re.findall(r"(%[\\w.$-]+) = (%[\\w.$-]+)", op.split("iter_args", 1)[-1]):
                        defs[a] = [b]
                out.append((op, depth))
            if text.endswith("{"):
                stack.append("for" if "scf.for" in text else "other")
        return out, defs, args

    def roots(name, defs, args, seen=None):
        seen = set() if seen is None else seen
        if name in args:
            return {name}
        if name in seen:
            return set()
        seen.add(name)
        return set().union(*(roots(x, defs, args, seen) for x in defs.get(name, [])))

    def reads(ir):
        """Per global read: (the kernel argument its pointer comes from, scf.for depth); and per
        f32 -> 16-bit rounding of the tokens, its depth."""
        lines, defs, args = ops(ir)
        found, rounds = [], []
        for op, depth in lines:
            refs = REF.findall(op)
            if op.startswith(READS):
                found.append((frozenset(roots(refs[0], defs, args)), depth))
            if op.startswith(("arith.truncf", "tt.fp_to_fp")) and "%h_ptr" in roots(refs[0], defs, args):
                rounds.append(depth)
        return found, rounds

    # ---- the cases: every shipped config, its dtypes, flags and widths
    KIND_DTYPES = {"16-bit": [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                              (torch.float16, torch.float16)],
                   "tf32": [(torch.float32, torch.float32)], "ieee": [(torch.float32, torch.float32)]}
    cases = []
    for row, (arch, kind, width, config) in enumerate(S.CONFIGS):
        targets = {9: [90], 8: [86], None: [90, 86]}[arch]
        dtypes = KIND_DTYPES[kind] if arch is not None else KIND_DTYPES[kind][:1]
        shapes = [(width, 1000)] if width else [(384, 1000), (1280, 1000)]
        if row == 0:
            shapes.append((192, 9))  # DeiT-Ti's width, a 10-way head: BLOCK_C clamped to 16
        for target in targets:
            for (h_dtype, compute), (D, C) in itertools.product(dtypes, shapes):
                # (bias, top class, explain mode's map)
                flag_sets = [(False, False, False), (True, True, False), (True, True, True)]
                if row == 0 and D == 384 and h_dtype == torch.float32:
                    flag_sets += [(True, False, False), (False, True, False), (False, True, True)]
                for bias, top_class, explain in flag_sets:
                    cases.append((target, kind, config, h_dtype, compute, D, C, bias, top_class,
                                  explain))

    compiled = 0
    for target, kind, config, h_dtype, compute, D, C, bias, top_class, explain in cases:
        torch.backends.cuda.matmul.allow_tf32 = kind == "tf32"
        args, kwargs = score_call(2, 196, D, C, h_dtype, compute, bias, top_class, config, explain)
        sig, consts, attrs, options, _ = bind(S._ice_score_kernel, target, args, kwargs)
        kernel = triton.compile(ASTSource(S._ice_score_kernel, sig, consts, attrs),
                                target=GPUTarget("cuda", target, 32), options=options.__dict__)
        regs, stack = resource_usage(kernel)
        name = (f"sm_{target} {kind} {str(h_dtype)[6:]}->{str(compute)[6:]} D={D} C={C} "
                f"bias={bias} top_class={top_class} explain={explain} {tuple(config)}")
        num_k, shared = kwargs["NUM_K"], kernel.metadata.shared
        assert shared <= SHARED[target], (name, shared)
        assert stack is None or stack.group(1) == "0", ("register spill", name, stack.group(1))
        tensor_cores = target == 90 and kind != "ieee"
        assert ("wgmma" in kernel.asm["ptx"]) == tensor_cores, name
        summary = []
        for ir in ("ttir", "ttgir"):
            found, rounds = reads(kernel.asm[ir])
            h = [depth for arg, depth in found if "%h_ptr" in arg]
            w = [depth for arg, depth in found if "%w_ptr" in arg]
            assert h and w, (name, ir)
            if num_k:  # held: the token tile read NUM_K times, before the class loop, rounded there
                assert len(h) == num_k and max(h) == 0, (name, ir, h)
                assert max(w) >= 1, (name, ir, w)  # the weight streamed in the loop
                assert len(rounds) == (num_k if h_dtype != compute else 0), (name, ir, rounds)
                assert all(depth == 0 for depth in rounds), (name, ir, rounds)
            else:  # reloaded per class tile
                assert max(h) >= 1, (name, ir, h)
            summary.append(f"{ir} h reads {len(h)} (in loops {sum(d > 0 for d in h)})")
        print(name, "| tiles", {k: kwargs[k] for k in ("BLOCK_T", "BLOCK_C", "BLOCK_K", "NUM_K")},
              "shared", shared, "regs", regs.group(1) if regs else "?",
              "stack", stack.group(1) if stack else "0", "wgmma", tensor_cores, "|",
              "; ".join(summary))
        compiled += 1

    # ---- a new batch size: the same specialization, so the same compiled kernel (no recompile)
    torch.backends.cuda.matmul.allow_tf32 = False
    config = S.config_for(9, "16-bit", 384)
    specs = set()
    for B in (1, 2, 3, 5, 8, 64, 256, 1024):
        args, kwargs = score_call(B, 196, 384, 1000, torch.float32, torch.bfloat16, False, False,
                                  config)
        *_, spec = bind(S._ice_score_kernel, 90, args, kwargs)
        specs.add((str(spec), str(sorted(kwargs.items(), key=str))))
    assert len(specs) == 1, specs
    specs = set()
    for B in (1, 2, 3, 5, 8, 64, 256, 1024):
        x, scores = torch.randn(B, 197, 384, dtype=torch.bfloat16), torch.rand(B, 196)
        order, out = torch.empty(B, 196, dtype=torch.int64), torch.empty(B, 1 + 138 + 1, 384)
        args, flags = R.kernel_arguments(x, scores, order, out.bfloat16(), 138, 1, True, False)
        *_, spec = bind(R._reorganize_kernel, 90, args,
                        {**flags, **R.INTERPRETER_CONFIG, "num_warps": R.NUM_WARPS})
        specs.add(str(spec))
    assert len(specs) == 1, specs
    print("compiled", compiled, "of", len(cases), "; batch sizes 1 to 1024: one specialization each")
''')


def test_ice_score_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    """Every shipped score config (``CONFIGS``: Hopper's on sm_90, Ampere's on sm_86 with its
    99 KiB, the fallback on both), its dtypes (fp32 tokens under bf16 autocast, bf16, fp16; TF32;
    exact fp32), with and without bias and top class, and writing explain mode's map, at DeiT-S's
    width and each row's widest:

    * it fits the block's shared memory and spills no register (cuobjdump's STACK is 0);
    * on sm_90 the dots are warp-group MMA (``wgmma`` in the PTX), except exact fp32;
    * a held token tile is read from global memory once: in the TTIR and in the TTGIR after
      pipelining, the ops that read global memory through a pointer derived from ``h_ptr`` number
      ``NUM_K`` and sit outside every ``scf.for``, the weight's inside the class loop, and fp32
      tokens are rounded (``arith.truncf``) ``NUM_K`` times, outside the loop too;
    * batch sizes 1 to 1024 give the JIT the same specialization (``T`` unspecialized), and so
      does the reorganize kernel (the batch only sets its grid): no new compile per batch size.

    Each config's registers, shared memory and reads are printed (``pytest -s``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", ICE_SCORE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    compiled, total = re.search(r"compiled (\d+) of (\d+)", res.stdout).groups()
    assert compiled == total and int(total) > 40


RAGGED_SCRIPT = textwrap.dedent('''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ice_prune.kernels import triton_ragged as T

    target = GPUTarget("cuda", 90, 32)
    ints = ("P", "n", "D", "stride_xb", "stride_xn", "stride_xd", "stride_sb", "stride_sn",
            "stride_on")
    flags = ("FUSE", "NORMALIZE", "KEY_FP64", "EPS_", "BLOCK_I", "BLOCK_J", "BLOCK_D")
    compiled = 0

    def build(dt, fuse, norm, score_dt):
        global compiled
        sig = {"x_ptr": f"*{dt}", "s_ptr": f"*{score_dt}", "keep_ptr": "*i64",
               "offsets_ptr": "*i64", "order_ptr": "*i64", "out_ptr": f"*{dt}",
               **{k: "i32" for k in ints}, **{f: "constexpr" for f in flags}}
        consts = {"FUSE": fuse, "NORMALIZE": norm, "KEY_FP64": score_dt == "fp64", "EPS_": T.EPS,
                  **T.CONFIG}
        source = ASTSource(fn=T._reorganize_ragged_kernel, signature=sig, constexprs=consts)
        kernel = triton.compile(source, target=target, options={"num_warps": T.NUM_WARPS})
        assert len(kernel.asm["cubin"]) > 0
        compiled += 1

    for dt, fuse, norm in itertools.product(("bf16", "fp16", "fp32"), (True, False), (True, False)):
        build(dt, fuse, norm, "fp32")
    for score_dt in ("fp64", "bf16"):
        build("bf16", True, True, score_dt)
    print("compiled", compiled)
''')


def test_ragged_forward_compiles_for_sm90_without_a_gpu(tmp_path):
    """``_reorganize_ragged_kernel`` for every dtype x FUSE x NORMALIZE, and fp64 / bf16 scores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", RAGGED_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled 14" in res.stdout
