"""ice_prune.breakdown: time and MACs per kind of work."""
import json

import pytest
import timm
import torch

import ice_prune
from ice_prune.breakdown import KINDS, breakdown, compare, kind_of, mac_breakdown

# op names from torch's CPU and CUDA paths and kernel names as an H100 profile shows them
NAMES = {
    "matmul": ["aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution",
               "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1",
               "implicit_convolve_sgemm", "triton_tem_fused_addmm_0",
               "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4>"],
    "attention": ["aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_cudnn_attention",
                  "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>",
                  "fmha_cutlassF_bf16_aligned_64x128_rf_sm80",
                  "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wmma_f16_knob_3_64x64x64"],
    "selection": ["ice_prune::reorganize", "ice_prune::ice_score", "_reorganize_kernel",
                  "_ice_score_kernel"],
    "other": ["aten::gelu", "aten::native_layer_norm", "aten::copy_", "aten::_softmax", "aten::add",
              "triton_per_fused_add_native_layer_norm_0", "triton_red_fused__softmax_1",
              "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
              "aten::mean", "aten::sum", "aten::gather"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_kind_of_names(kind):
    assert [kind_of(name) for name in NAMES[kind]] == [kind] * len(NAMES[kind])


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5,
                             **kwargs).eval()


def test_macs_by_kind_against_the_formulas():
    """A ViT's multiply-adds written out: per block qkv, proj and the MLP (12 N D^2), attention
    (2 N^2 D), the patch embedding and the classifier; a pruned model's attention on its own token
    counts, the reorganize op's fused sum as selection."""
    B, N, D, depth, C, patch = 2, 17, 192, 12, 5, 8
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        macs = mac_breakdown(tiny(), x)
    embed = B * 16 * 3 * patch * patch * D
    assert macs["matmul"] == depth * B * N * 12 * D * D + embed + B * D * C
    assert macs["attention"] == depth * B * 2 * N * N * D
    assert macs["selection"] == 0
    with torch.no_grad():
        assert sum(macs.values()) == ice_prune.count_flops(tiny(), (3, 32, 32), B, counter="torch")

    model = ice_prune.patch(tiny(), keep_rate=0.5, method="evit")
    with torch.no_grad():
        pruned = mac_breakdown(model, x)
    # tokens per block: 16 patches + [CLS]; keep 8 of 16 (+1 fused) in block 3, 5 of 9 in block 6,
    # 3 of 6 in block 9; the selection follows the attention of its block
    tokens = [17] * 4 + [10] * 3 + [7] * 3 + [5] * 2
    assert ice_prune.token_schedule(17, 1, [0.5] * 3) == [10, 7, 5]
    assert pruned["attention"] == sum(B * 2 * n * n * D for n in tokens)
    fused = sum(B * (n - k) * D for n, k in ((16, 8), (9, 5), (6, 3)))  # dropped rows summed
    assert pruned["selection"] == fused


# the CPU path's op names by hand: timm's linear layers, patch embedding and F.sdpa
MATMUL_OPS = {"aten::linear", "aten::addmm", "aten::matmul", "aten::mm", "aten::bmm",
              "aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution"}
ATTENTION_OPS = {"aten::scaled_dot_product_attention",
                 "aten::_scaled_dot_product_flash_attention_for_cpu"}


def expected_ms(prof, reps):
    """Milliseconds per kind from a profile, each op counted once: a library op's whole time
    (the sort, gather and the ICE head's GEMM it calls included) as selection; outside the library
    each op's self time under the kind of its name in the lists above."""
    ms = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        if event.name.startswith("ice_prune::"):
            if not any(a.startswith("ice_prune::") for a in ancestors):
                ms["selection"] += event.cpu_time_total / 1e3 / reps
        elif not any(a.startswith("ice_prune::") for a in ancestors):
            kind = ("matmul" if event.name in MATMUL_OPS else
                    "attention" if event.name in ATTENTION_OPS else "other")
            ms[kind] += event.self_cpu_time_total / 1e3 / reps
    total = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None) / 1e3 / reps
    return ms, total


def test_breakdown_times_each_kind_and_compare(monkeypatch):
    """Each kind's time against the same profile read with the op names above; MACs against the
    formulas."""
    profiles = []

    class Recorded(torch.profiler.profile):
        def __enter__(self):
            profiles.append(self)
            return super().__enter__()

    monkeypatch.setattr(torch.profiler, "profile", Recorded)
    x = torch.randn(2, 3, 32, 32)
    base = breakdown(tiny(), x, reps=2, warmup=1)
    ice = breakdown(ice_prune.patch(tiny(), keep_rate=0.5, method="ice"), x, reps=2, warmup=1)
    assert len(profiles) == 2
    for res, prof in zip((base, ice), profiles):
        want, total = expected_ms(prof, reps=2)
        assert res["ms"] == pytest.approx(want, rel=1e-6, abs=1e-6)
        assert res["total_ms"] == pytest.approx(total, rel=1e-6)  # no op counted twice
        assert res["ms"]["matmul"] > 0 and res["ms"]["attention"] > 0
        for kind, ops in res["top"].items():
            assert len(ops) <= 5 and all(ms > 0 for _, ms in ops)
        json.dumps(res)
    B, N, D, depth, C, patch = 2, 17, 192, 12, 5, 8
    assert base["macs"]["matmul"] == depth * B * N * 12 * D * D + B * 16 * 3 * patch * patch * D \
        + B * D * C
    assert base["macs"]["attention"] == depth * B * 2 * N * N * D
    assert base["ms"]["selection"] == 0 and ice["ms"]["selection"] > 0
    assert "ice_prune::reorganize" in [name for name, _ in ice["top"]["selection"]]
    rows = compare(base, ice)
    assert set(rows) == set(KINDS) | {"total"}
    assert rows["selection"]["speedup"] is None and rows["selection"]["mac_ratio"] is None
    assert rows["selection"]["delta_ms"] == pytest.approx(ice["ms"]["selection"])
    assert rows["attention"]["mac_ratio"] > 1
    assert rows["total"]["speedup"] == pytest.approx(base["total_ms"] / ice["total_ms"])


def test_breakdown_leaves_the_model_in_train_mode():
    model = ice_prune.patch(tiny(), keep_rate=0.5, method="evit").train()
    res = breakdown(model, torch.randn(1, 3, 32, 32), reps=1, warmup=0)
    assert model.training and res["ms"]["selection"] > 0


def test_script_prints_and_writes_json(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("breakdown_script", "bench/breakdown.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "b.json"
    script.main(["--model", "deit_tiny_patch16_224", "--batch-size", "1", "--keep-rates", "0.5",
                 "--methods", "evit", "--reps", "1", "--warmup", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "evit@0.5 against the baseline" in printed and "MAC ratio" in printed
    data = json.loads(out.read_text())
    assert set(data["breakdown"]) == {"baseline", "evit@0.5"}
    assert data["comparisons"]["evit@0.5"]["total"]["mac_ratio"] > 1.5
