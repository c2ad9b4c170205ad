"""ONNX export of patched ViTs (ice_prune.export): onnxruntime's outputs against PyTorch's, fp32, at
keep rates 1.0 / 0.7 / 0.5, batch 1 and 8 through one graph with a dynamic batch axis, and explain
mode's map as further outputs; the op translations against the torch kernels, ties included."""
import numpy as np
import pytest
import timm
import torch

import ice_prune
from ice_prune.kernels import ice_score, reorganize

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ice_prune.export import export_onnx  # noqa: E402

TOL = 1e-4


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


def check_export(model, tmp_path, size, batches=(1, 8)):
    path = tmp_path / "model.onnx"
    export_onnx(model, torch.randn(2, 3, *size), path)
    for batch in batches:
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = run_onnx(path, x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("keep_rate", [1.0, 0.7, 0.5])
@pytest.mark.parametrize("method", ["evit", "ice"])
def test_patched_vit_exports_with_the_same_outputs(method, keep_rate, tmp_path):
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=10).eval()
    ice_prune.patch(model, keep_rate=keep_rate, method=method)
    path = check_export(model, tmp_path, (64, 64))
    import onnx

    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not any(node.domain.startswith("ice_prune") for node in graph.node)
    assert ("TopK" in ops) == (keep_rate < 1.0)  # 16 patches: 0.7 and 0.5 both drop tokens
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.slow
@pytest.mark.parametrize("method,fuse", [("evit", False), ("ice", True)])
def test_prefix_tokens_and_no_fusion_export(method, fuse, tmp_path):
    # 5 prefix tokens (CLS + 4 registers) and per-point keep rates
    model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=56, num_classes=10).eval()
    ice_prune.patch(model, keep_rate=(0.7, 0.5, 0.6), method=method, fuse=fuse)
    check_export(model, tmp_path, (56, 56), batches=(3,))


@pytest.mark.slow
@pytest.mark.parametrize("keep_rate", [0.7, 1.0])
def test_explain_mode_exports_the_map_as_further_outputs(keep_rate, tmp_path):
    """``explain=True``: outputs logits, foreground, point, top class and its probability, each
    against PyTorch's explain-mode forward at batch 1 and 4 through one graph; the model's own knob
    is left off."""
    import onnx

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=4, num_classes=5).eval()
    ice_prune.patch(model, keep_rate=keep_rate, method="ice", locs=(1, 2, 3))
    with torch.no_grad():  # a head that separates tokens (the fresh one scores them all alike)
        model.ice_head.fc.weight.normal_(std=0.05)
    path = tmp_path / "explain.onnx"
    export_onnx(model, torch.randn(2, 3, 32, 32), path, explain=True)
    assert model.explain is False
    outputs = onnx.load(str(path)).graph.output
    assert [o.name for o in outputs] == ["logits", "foreground", "point", "top_class", "top_prob"]
    assert [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in outputs] == [["batch", 5]] + [["batch", 16]] * 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.explain = True
    for batch in (1, 4):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            logits = model(x)
        e = model.ice_explanation
        got_logits, foreground, point, top_class, top_prob = session.run(
            None, {"images": x.numpy()})
        np.testing.assert_allclose(got_logits, logits.numpy(), rtol=0, atol=TOL)
        np.testing.assert_allclose(foreground, e.foreground.numpy(), rtol=0, atol=TOL)
        assert point.dtype == top_class.dtype == np.int64
        np.testing.assert_array_equal(point, e.point.numpy())
        np.testing.assert_array_equal(top_class, e.top_class.numpy())
        np.testing.assert_allclose(top_prob, e.top_prob.numpy(), rtol=0, atol=TOL)
        assert len(np.unique(top_class)) > 1  # the head tells the patches' classes apart
    if keep_rate < 1.0:
        assert set(np.unique(point)) == {0, 1, 2}  # patches dropped at each point
    else:
        assert (point == 2).all()


def test_explain_export_needs_an_ice_model(tmp_path):
    evit = ice_prune.patch(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                             depth=4).eval(), method="evit", locs=(1, 2))
    with pytest.raises(ValueError, match="method='ice'"):
        export_onnx(evit, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", explain=True)
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4).eval()
    with pytest.raises(ValueError, match="patch it with"):
        export_onnx(plain, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", explain=True)
    assert not (tmp_path / "m.onnx").exists()


class Reorganize(torch.nn.Module):
    def __init__(self, keep, num_prefix, fuse, normalize):
        super().__init__()
        self.args = (keep, num_prefix, fuse, normalize)

    def forward(self, x, scores):
        return reorganize(x, scores, *self.args, kernel="torch")


@pytest.mark.parametrize("num_prefix,fuse,normalize", [(1, True, False), (0, True, True),
                                                       (2, False, False)])
def test_reorganize_translation_matches_the_kernel_with_ties(num_prefix, fuse, normalize, tmp_path):
    from ice_prune.export import ONNX_TRANSLATIONS

    B, n, D, keep = 4, 12, 8, 5
    x = torch.randn(B, num_prefix + n, D)
    scores = torch.rand(B, n).round(decimals=1)  # many ties: the order must break them by index
    module = Reorganize(keep, num_prefix, fuse, normalize).eval()
    program = torch.onnx.export(module, (x, scores), dynamo=True,
                                custom_translation_table=ONNX_TRANSLATIONS,
                                input_names=["x", "scores"], output_names=["out", "order"])
    path = tmp_path / "reorganize.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out, order = session.run(None, {"x": x.numpy(), "scores": scores.numpy()})
    ref_out, ref_order = module(x, scores)
    np.testing.assert_array_equal(order, ref_order.numpy())
    np.testing.assert_allclose(out, ref_out.numpy(), rtol=0, atol=1e-6)


class Score(torch.nn.Module):
    def __init__(self, D, classes, bias):
        super().__init__()
        self.fc = torch.nn.Linear(D, classes + 1, bias=bias)

    def forward(self, h):
        return ice_score(h, self.fc.weight, self.fc.bias, kernel="torch")


@pytest.mark.parametrize("bias", [True, False])
def test_ice_score_translation_matches_the_kernel(bias, tmp_path):
    from ice_prune.export import ONNX_TRANSLATIONS

    module = Score(16, 7, bias).eval()
    h = torch.randn(3, 10, 16) * 3
    with torch.no_grad():
        program = torch.onnx.export(module, (h,), dynamo=True,
                                    custom_translation_table=ONNX_TRANSLATIONS,
                                    input_names=["h"], output_names=["scores"])
        expected = module(h).numpy()
    path = tmp_path / "score.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"h": h.numpy()})[0], expected, rtol=0,
                               atol=1e-6)
