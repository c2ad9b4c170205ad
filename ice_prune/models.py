"""``load_model``: a Vision Transformer, its ICE head and its checkpoint, ready to run.

>>> pruned = ice_prune.load_model("deit_small_patch16_224", "runs/ice-0.7/last.pth", method="ice",
...                               keep_rate=0.7)
>>> explainer = ice_prune.load_model("deit_small_patch16_224", "runs/ice/last.pth")
>>> maps = ice_prune.explain(explainer, images, "ice")    # reads explainer.ice_head

The checkpoint says what is built: the classifier's class count (``head.weight``) and the ICE head's
presence, kind and class count (``ice_head.*``: ``fc.weight [C+1, D]`` is ICE's linear head,
``fc.0.weight [hidden, D]`` with ``fc.2.weight [C+1, hidden]`` ICE-f's MLP head, ``<i>.fc.*`` one
head per selection point, ``heads="per_location"``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import timm
from torch import Tensor, nn

from ice_prune.checkpoint import (PathLike, load_checkpoint, read_state_dict, split_ice_head,
                                  state_dict_of)
from ice_prune.head import ICEHead
from ice_prune.patching import integration_of, patch
from ice_prune.select import SELECTORS, KeepRate


def _head_shape(head_state: Mapping[str, Tensor]) -> tuple[int, int, Optional[int], bool]:
    """``(dim, num_classes, hidden_dim or None, per_location)`` of the ICE head(s) whose state dict
    (``ice_head.`` stripped) is ``head_state``."""
    per_location = all(k.split(".", 1)[0].isdigit() for k in head_state)
    if per_location:  # a ModuleList of heads of one shape: read the first
        head_state = {k[2:]: v for k, v in head_state.items() if k.startswith("0.")}
    if "fc.weight" in head_state:
        out, dim = head_state["fc.weight"].shape
        return dim, out - 1, None, per_location
    if "fc.0.weight" in head_state and "fc.2.weight" in head_state:
        hidden, dim = head_state["fc.0.weight"].shape
        return dim, head_state["fc.2.weight"].shape[0] - 1, hidden, per_location
    raise ValueError(f"ice_head keys {sorted(head_state)} are neither a linear head (fc.weight) nor "
                     f"an MLP head (fc.0.*, fc.2.*)")


def load_model(model: Union[str, nn.Module],
               checkpoint: Union[PathLike, Mapping[str, Tensor], None] = None, *,
               method: Optional[str] = None, keep_rate: KeepRate = 0.7,
               patch_kwargs: Optional[Mapping[str, Any]] = None, require_head: bool = False,
               num_classes: Optional[int] = None, reset_classifier: bool = False,
               pretrained: bool = False, trust: bool = False, **model_kwargs) -> nn.Module:
    """``model`` built, patched with ``method`` and loaded from ``checkpoint``; in eval mode.

    Args:
        model: a timm model name, created with ``timm.create_model(model, pretrained=pretrained,
            num_classes=..., **model_kwargs)`` (downloads only with ``pretrained=True``), or a model
            used as it is: a timm ``VisionTransformer`` or a transformers ViT / DeiT.
        checkpoint: a path, read by :func:`~ice_prune.checkpoint.read_state_dict` (weights only
            unless ``trust=True``), or a state dict; ``None`` keeps the weights as built. A
            transformers model also reads the names ``save_pretrained`` writes
            (``OUT/model.safetensors``).
        method: ``None``: the model unpatched, with the checkpoint's ICE head, if it has one, as
            ``model.ice_head`` (what train/explain.py saves and :func:`ice_prune.explain` reads).
            A selector (``"ice"``, ``"evit"``): the model patched by :func:`ice_prune.patch` at
            ``keep_rate`` with ``patch_kwargs``. A selector with a head loads the checkpoint's (a
            linear head; its class count and layout unless ``patch_kwargs`` set them); a checkpoint
            without one leaves the head freshly initialized (training from a release), or is refused
            with ``require_head=True`` (evaluating a pruned model). A selector without a head
            ignores the checkpoint's.
        num_classes: the classifier's classes of a named model; default the checkpoint's
            (``head.weight``), else timm's.
        reset_classifier: leave the classifier and the ICE head as initialized, ignoring the
            checkpoint's (weights trained on another class count).

    A checkpoint that does not fit the model raises ValueError naming the keys that differ
    (:func:`~ice_prune.checkpoint.load_checkpoint`).
    """
    if checkpoint is None:
        name, state = None, {}
    elif isinstance(checkpoint, Mapping):
        name = "the state dict"
        state = state_dict_of(checkpoint, name)
    else:
        name = f"checkpoint {os.fspath(checkpoint)!r}"
        state = read_state_dict(checkpoint, trust)
    model_state, head_state = split_ice_head(state)
    if reset_classifier:
        head_state = {}

    if isinstance(model, str):
        if num_classes is None and not reset_classifier and "head.weight" in model_state:
            num_classes = model_state["head.weight"].shape[0]
        if num_classes is not None:
            model_kwargs["num_classes"] = num_classes
        model = timm.create_model(model, pretrained=pretrained, **model_kwargs)
    elif pretrained or num_classes is not None or model_kwargs:
        raise TypeError("pretrained, num_classes and model keyword arguments go to timm.create_model: "
                        "give a timm model name, or build the model with them yourself")
    elif model_state:
        model_state = integration_of(model).model_state_names(model, model_state)

    needs_head = method is not None and getattr(SELECTORS.get(method), "needs_head", False)
    if method is None:
        if head_state:
            dim, classes, hidden, per_location = _head_shape(head_state)
            if per_location:
                raise ValueError("the checkpoint holds one ICE head per selection point, which "
                                 "selects tokens but cannot explain: load it with its method, or save "
                                 "the explanation head as the shared ice_head")
            ref = next(model.parameters())
            model.ice_head = ICEHead(dim, classes, hidden_dim=hidden).to(ref.device, ref.dtype)
    else:
        kwargs = dict(patch_kwargs or {})
        if needs_head and head_state:
            _, classes, hidden, per_location = _head_shape(head_state)
            if hidden is not None:
                raise ValueError(f"method {method!r} prunes with a linear ICE head; the checkpoint's "
                                 f"is an MLP (ICE-f, hidden {hidden}), which only explains")
            kwargs.setdefault("num_classes", classes)
            kwargs.setdefault("heads", "per_location" if per_location else "shared")
        elif needs_head and require_head:
            raise ValueError(f"method {method!r} prunes with the ICE head, and there is none (the "
                             f"checkpoint has no ice_head.* keys): use the checkpoint of a "
                             f"train/prune.py --method {method} run")
        patch(model, keep_rate=keep_rate, method=method, **kwargs)
        if not needs_head:
            head_state = {}
    if checkpoint is not None:
        theirs = {**model_state, **{f"ice_head.{k}": v for k, v in head_state.items()}}
        load_checkpoint(model, theirs, optional_prefixes=("ice_head.",) if needs_head else (),
                        reset_classifier=reset_classifier, name=name)
    return model.eval()
