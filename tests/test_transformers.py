"""The transformers integration: Hugging Face ViT / DeiT patched with the timm path's selectors,
heads and reorganize op. Tiny configs built here; nothing is downloaded."""
import builtins
import importlib
import pickle
import sys

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch.utils._python_dispatch import TorchDispatchMode

import ice_prune

pytest.importorskip("transformers")
from transformers import (DeiTConfig, DeiTForImageClassification,  # noqa: E402
                          DeiTForImageClassificationWithTeacher, DeiTModel, ViTConfig,
                          ViTForImageClassification, ViTModel)

from ice_prune.integrations.transformers import ICETransformersModel  # noqa: E402

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
            num_attention_heads=2, intermediate_size=64, layer_norm_eps=1e-6,
            hidden_act="gelu", qkv_bias=True)
LOCS = (1, 2)
CLASSES = [ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification,
           DeiTForImageClassificationWithTeacher]


def build(cls, impl="sdpa", num_labels=5):
    config = (DeiTConfig if cls.__name__.startswith("DeiT") else ViTConfig)(
        **TINY, num_labels=num_labels, attn_implementation=impl)
    return cls(config).eval()


def output(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", ["evit", "ice"])
def test_keep_rate_one_is_exact_and_unpatch_restores(cls, impl, method):
    model = build(cls, impl)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = output(model, x)
        keys = set(model.state_dict())
        ice_prune.patch(model, keep_rate=1.0, method=method, locs=LOCS,
                        num_classes=3 if cls in (ViTModel, DeiTModel) and method == "ice" else None)
        torch.testing.assert_close(output(model, x), ref, atol=1e-5, rtol=0)
        extra = set(model.state_dict()) - keys
        assert extra == ({"ice_head.fc.weight"} if method == "ice" else set())
        assert keys <= set(model.state_dict())
        model.keep_rate = 0.5  # pruning changes the output; the knob works without patching again
        pruned = output(model, x)  # a backbone's sequence is shorter, a classifier's logits differ
        assert pruned.shape != ref.shape or not torch.allclose(pruned, ref, atol=1e-5)
        ice_prune.unpatch(model)
        assert type(model) is cls and set(model.state_dict()) == keys
        torch.testing.assert_close(output(model, x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [ViTForImageClassification, DeiTForImageClassificationWithTeacher],
                         ids=lambda c: c.__name__)
def test_knobs_trace_and_token_counts(cls):
    model = ice_prune.patch(build(cls), keep_rate=0.7, method="ice", locs=LOCS, trace=True)
    prefix = 2 if cls is DeiTForImageClassificationWithTeacher else 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    tr = model.ice_trace
    assert tr["grid"] == (4, 4) and tr["num_prefix"] == prefix
    want = ice_prune.token_schedule(16 + prefix, prefix, [0.7, 0.7])
    assert [loc["tokens_out"] for loc in tr["locations"]] == want
    assert model.ice_logits == []  # a trace records no logits: eval keeps the fused score
    model.fuse = False
    with torch.no_grad():
        model(x)
    assert [loc["tokens_out"] for loc in model.ice_trace["locations"]] == \
        ice_prune.token_schedule(16 + prefix, prefix, [0.7, 0.7], fuse=False)
    assert model.keep_rate == 0.7 and model.fuse is False and model.trace is True


class TensorShapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor)]
        return out


def test_evit_does_not_materialize_attention(monkeypatch):
    """A pruned SDPA model runs every layer's attention through SDPA, selection layers included, and
    no op returns a ``[B, H, N, N]`` matrix; EViT's [CLS] row is a plain softmax's head mean."""
    from ice_prune.integrations.transformers import attention_with_cls_row
    model = ice_prune.patch(build(ViTModel, "sdpa"), keep_rate=0.5, method="evit", locs=LOCS)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    lengths = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: lengths.append(q.shape[2]) or sdpa(q, *a, **kw))
    B, H = 2, TINY["num_attention_heads"]
    with torch.no_grad(), TensorShapes() as ops:
        out = model(torch.randn(B, 3, 32, 32)).last_hidden_state
    want = ice_prune.token_schedule(17, 1, [0.5, 0.5])
    assert out.shape[1] == want[-1]
    assert lengths == [17, 17, want[0], want[1]]  # pruning drops tokens after a layer's attention
    square = [s for s in ops.shapes if len(s) == 4 and s[:2] == (B, H) and s[2] == s[3] > 1]
    assert not square, square

    attn = model.layers[LOCS[0]].attention
    h = torch.randn(B, 17, 32)
    with torch.no_grad():
        y, row = attention_with_cls_row(attn, h)
        q, k, v = (proj(h).view(B, 17, H, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        y_ref = attn.o_proj((probs @ v).transpose(1, 2).reshape(B, 17, 32))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(row, probs.mean(1)[:, 0])


def test_errors_and_state_dict_round_trip():
    model = build(ViTModel)
    with pytest.raises(ValueError, match="num_classes"):
        ice_prune.patch(model, method="ice", locs=LOCS)
    ice_prune.patch(model, method="evit", locs=LOCS)
    with pytest.raises(RuntimeError, match="already patched"):
        ice_prune.patch(model, locs=LOCS)
    with pytest.raises(ValueError, match="attention masks"):
        model(torch.randn(1, 3, 32, 32), attention_mask=torch.ones(1, 17))
    with pytest.raises(ValueError, match="out of range"):
        ice_prune.patch(build(ViTModel), method="evit", locs=(9,))
    with pytest.raises(ValueError, match="not patched"):
        ice_prune.unpatch(build(ViTModel))
    a = ice_prune.patch(build(ViTForImageClassification), method="ice", locs=LOCS)
    b = ice_prune.patch(build(ViTForImageClassification), method="ice", locs=LOCS)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(output(a, x), output(b, x))
        c = pickle.loads(pickle.dumps(a))
        torch.testing.assert_close(output(c, x), output(a, x))
    with pytest.raises(ValueError, match="patch with num_classes=5"):
        ice_prune.patch(build(ViTForImageClassification, num_labels=7), method="ice",
                        locs=LOCS).load_state_dict(a.state_dict())


def test_missing_transformers_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ice_prune.integrations.transformers", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"ice_prune\[transformers\]"):
        importlib.import_module("ice_prune.integrations.transformers")


# --- the same network in both libraries ---------------------------------------------------------

def timm_to_transformers(sd: dict, backbone: str, distilled: bool) -> dict:
    """timm ViT / distilled DeiT weights in transformers' layout (qkv split into q/k/v)."""
    out = {}
    p = f"{backbone}."
    for key, value in sd.items():
        if key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            lp = f"{p}layers.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    out[f"{lp}attention.{name}.{kind}"] = part
                continue
            rest = (rest.replace("attn.proj.", "attention.o_proj.")
                    .replace("norm1.", "layernorm_before.").replace("norm2.", "layernorm_after."))
            out[lp + rest] = value
            continue
        name = {"cls_token": "embeddings.cls_token", "dist_token": "embeddings.distillation_token",
                "pos_embed": "embeddings.position_embeddings",
                "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}.get(key)
        if name is not None:
            out[p + name] = value
        elif key.startswith("head_dist."):
            out[key.replace("head_dist.", "distillation_classifier.")] = value
        elif key.startswith("head."):
            out[key.replace("head.", "cls_classifier." if distilled else "classifier.")] = value
        else:
            raise KeyError(key)
    return out


def pair(distilled: bool):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
              num_classes=5)
    tm = (VisionTransformerDistilled(**kw) if distilled
          else VisionTransformer(**kw)).eval()
    cls = DeiTForImageClassificationWithTeacher if distilled else ViTForImageClassification
    hf = build(cls)
    missing, unexpected = hf.load_state_dict(
        timm_to_transformers(tm.state_dict(), "deit" if distilled else "vit", distilled),
        strict=True)
    assert not missing and not unexpected
    return tm, hf


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit-distilled"])
@pytest.mark.parametrize("method", ["evit", "ice"])
@pytest.mark.parametrize("keep_rate", [0.7, 0.5])
def test_same_network_same_pruned_outputs(distilled, method, keep_rate):
    tm, hf = pair(distilled)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, tm(x), atol=1e-4, rtol=0)
        ice_prune.patch(tm, keep_rate=keep_rate, method=method, locs=LOCS, trace=True)
        ice_prune.patch(hf, keep_rate=keep_rate, method=method, locs=LOCS, trace=True)
        assert isinstance(hf, ICETransformersModel)
        if method == "ice":
            tm.ice_head.fc.weight.normal_()  # a head that separates tokens, shared by both
            hf.ice_head.load_state_dict(tm.ice_head.state_dict())
        out_t, out_h = tm(x), hf(x).logits
        torch.testing.assert_close(out_h, out_t, atol=1e-4, rtol=0)
        for lt, lh in zip(tm.ice_trace["locations"], hf.ice_trace["locations"]):
            assert lt["tokens_out"] == lh["tokens_out"] < lt["tokens_in"]
            assert torch.equal(lt["kept"], lh["kept"])


def test_flops_and_throughput_match_timm():
    tm, hf = pair(distilled=False)
    assert ice_prune.count_flops(hf, (3, 32, 32)) == ice_prune.count_flops(tm, (3, 32, 32))
    for m in (tm, hf):
        ice_prune.patch(m, keep_rate=0.5, method="ice", locs=LOCS)
    pruned = ice_prune.count_flops(hf, (3, 32, 32))
    assert pruned == ice_prune.count_flops(tm, (3, 32, 32))
    assert pruned < ice_prune.count_flops(build(ViTForImageClassification), (3, 32, 32))
    run = ice_prune.benchmark(hf, (3, 32, 32), batch_size=2, device="cpu", reps=2, warmup=1)
    assert len(run.times) == 2 and all(t > 0 for t in run.times)


def test_train_mode_logits_and_gradients():
    model = ice_prune.patch(build(DeiTForImageClassification), keep_rate=0.5, method="ice",
                            locs=LOCS).train()
    out = model(torch.randn(2, 3, 32, 32)).logits
    assert len(model.ice_logits) == 2
    (out.sum() + sum(z.sum() for z in model.ice_logits)).backward()
    assert model.ice_head.fc.weight.grad is not None
    assert model.deit.layers[0].attention.q_proj.weight.grad is not None


def test_hidden_states_and_other_resolutions():
    model = ice_prune.patch(build(ViTForImageClassification), keep_rate=0.5, method="evit",
                            locs=LOCS, trace=True)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
        assert [h.shape[1] for h in out.hidden_states] == [17, 17, 10, 7, 7]
        out = model(torch.randn(2, 3, 48, 32), interpolate_pos_encoding=True)
    assert out.logits.shape == (2, 5) and model.ice_trace["grid"] == (6, 4)
    assert [loc["tokens_out"] for loc in model.ice_trace["locations"]] == [14, 9]


def test_save_pretrained_round_trip(tmp_path):
    """save_pretrained on a patched model writes the backbone (in transformers' saved layout) and the
    ICE head; from_pretrained gives the plain model (the head is an unexpected key there), and
    patching it and loading the saved head gives the patched model's outputs back."""
    model = ice_prune.patch(build(ViTForImageClassification), keep_rate=0.5, method="ice",
                            locs=LOCS)
    with torch.no_grad():
        model.ice_head.fc.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    saved = ice_prune.checkpoint.read_state_dict(tmp_path / "model.safetensors")
    _, head = ice_prune.checkpoint.split_ice_head(saved)
    assert set(head) == {"fc.weight"} and torch.equal(head["fc.weight"], model.ice_head.fc.weight)
    assert "ice" not in (tmp_path / "config.json").read_text()  # the config is the model's own

    loaded = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is ViTForImageClassification and not hasattr(loaded, "ice_head")
    ice_prune.patch(loaded, keep_rate=0.5, method="ice", locs=LOCS)
    with torch.no_grad():
        assert not torch.allclose(loaded(x).logits, ref)  # a fresh head selects other tokens
        loaded.ice_head.load_state_dict(head)
        torch.testing.assert_close(loaded(x).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["evit", "ice"])
def test_fullgraph_compile(method):
    """torch.compile(fullgraph=True) captures a patched transformers model in one graph (the
    reorganize and ICE-score ops traced through their fake implementations)."""
    torch._dynamo.reset()
    model = ice_prune.patch(build(DeiTForImageClassificationWithTeacher), keep_rate=0.5,
                            method=method, locs=LOCS)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_flex_attention_is_refused_with_the_fix():
    model = build(ViTForImageClassification, impl="flex_attention")
    with pytest.raises(ValueError, match="flex_attention.*use 'sdpa' or 'eager'"):
        ice_prune.patch(model, keep_rate=0.5, method="evit", locs=LOCS)
    assert type(model) is ViTForImageClassification  # left as it was
    model = ice_prune.patch(build(ViTForImageClassification), keep_rate=0.5, method="evit",
                            locs=LOCS)
    model.set_attn_implementation("flex_attention")  # switched after patching: refused at forward
    with pytest.raises(ValueError, match="flex_attention"):
        model(torch.randn(1, 3, 32, 32))
