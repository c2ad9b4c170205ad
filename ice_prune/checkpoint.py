"""Reading and writing checkpoints: one loader for the library, the train/ scripts and the benchmark.

A ``.pth`` file is a pickle, and unpickling runs whatever code the file names. Every read here goes
through ``torch.load(weights_only=True)``, which builds tensors and plain containers and runs nothing,
with exactly these globals allowed besides (:data:`SAFE_GLOBALS`): ``argparse.Namespace`` (the
``args`` of DeiT, EViT and timm training checkpoints) and numpy's array constructor, ndarray and
dtypes (the numpy RNG state in ice_prune checkpoints written before the RNG states became tensors).
A file that needs anything else is refused with :class:`UnsafeCheckpointError`, which names the
globals and the opt-in for a file you trust: ``trust=True`` here, ``--trust-checkpoint`` in the
scripts (full unpickling; never taken silently).

What :func:`read_state_dict` reads:

* DeiT / EViT / timm releases: a dict with the weights under ``"model"``, ``"state_dict"`` or
  ``"model_ema"`` (optimizer state, epoch and an ``argparse.Namespace`` beside them are fine);
* a plain state dict (``torch.save(model.state_dict(), path)``), keys of a
  ``DistributedDataParallel`` module (``module.``) included;
* ``.safetensors`` files (recognized by their header, whatever the name ends in);
* this project's own checkpoints (``OUTPUT/last.pth``, see :mod:`ice_prune.training.engine`), which hold
  tensors, plain containers and strings only, so resuming a run needs no opt-in either.

A file that is not one of these (missing, empty, truncated, a text file such as an HTML page or a
Git LFS pointer, a safetensors file with a damaged header) raises one error naming the file and
what is wrong with it: :class:`CheckpointError` (``FileNotFoundError`` for a missing file). A
checkpoint of another architecture raises ``ValueError`` listing the keys that differ
(:func:`load_checkpoint`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

PathLike = Union[str, os.PathLike]

_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array constructor, whatever its module path
# What a weights-only load may build besides tensors and plain containers: data, no code.
SAFE_GLOBALS = [
    argparse.Namespace,
    # numpy 2 pickles name numpy._core, numpy 1 numpy.core: the same function
    (_NP_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    (_NP_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]

TRUST_HINT = ("if you trust this file (you wrote it, or it comes from a source you trust), load it "
              "with --trust-checkpoint (trust=True in ice_prune's functions), which unpickles it in "
              "full and so runs whatever code it carries")


class CheckpointError(Exception):
    """A checkpoint file that cannot be read: empty, truncated, damaged, or not a checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that only full unpickling reads: it names globals that loading would call."""


# ---------------------------------------------------------------------------------------------
# reading


def _is_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    text = head.decode("utf-8", errors="replace")
    return sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _not_a_checkpoint(path: str, head: bytes) -> CheckpointError:
    if _is_text(head):
        text = head.decode("utf-8", errors="replace")
        what, hint = "a text file, not weights", ""
        if text.startswith("version https://git-lfs"):
            what, hint = "a Git LFS pointer, not the file it points to", "; fetch it with git lfs pull"
        elif text.lstrip().startswith("<"):
            what, hint = "a text file (HTML or XML), not weights", "; a download that returned a web page?"
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return CheckpointError(f"checkpoint {path!r} is {what}: it begins {first!r}{hint}")
    return CheckpointError(f"checkpoint {path!r} is not a PyTorch file (torch.save) or safetensors: "
                           f"it begins with the bytes {head[:16]!r}")


def _unsafe_globals(path: str, error: Exception) -> list[str]:
    names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    with contextlib.suppress(Exception):  # zip files only; the message named the first one anyway
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path) or names
    return list(dict.fromkeys(names))


def _torch_load(path: str, trust: bool) -> Any:
    def damaged(e: Exception) -> CheckpointError:
        ends = isinstance(e, EOFError) or "truncated" in str(e)
        detail = "it ends too early" if ends else str(e).strip().split(". ")[0] or type(e).__name__
        return CheckpointError(f"checkpoint {path!r} is truncated or damaged ({detail}): download "
                               f"or copy it again")

    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust or "truncated" in str(e):
            raise damaged(e) from None
        names = _unsafe_globals(path, e)
        if names:
            raise UnsafeCheckpointError(
                f"checkpoint {path!r} was not loaded: it needs full unpickling, which would import "
                f"and call {', '.join(names)} (a pickle can run any code). ice_prune loads "
                f"checkpoints with torch.load(weights_only=True), which runs none; {TRUST_HINT}"
            ) from None
        # an instruction the weights-only unpickler does not take: damage, or an exotic pickle
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path!r} is damaged or not a PyTorch checkpoint "
                              f"({detail}); {TRUST_HINT}") from None
    except (RuntimeError, EOFError) as e:
        raise damaged(e) from None


def _safetensors_load(path: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {path!r} is not a valid safetensors file ({e}): "
                              f"truncated or damaged? download or copy it again") from None


def read_checkpoint(path: PathLike, trust: bool = False) -> Any:
    """What ``path`` holds: the object a ``.pth`` was saved from (read with
    ``torch.load(weights_only=True)``; ``trust=True`` unpickles in full), or a ``.safetensors``
    file's state dict. Raises ``FileNotFoundError`` for a missing file, :class:`UnsafeCheckpointError`
    for one that needs full unpickling, :class:`CheckpointError` for anything that is no checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): a download or copy that "
                              f"did not finish? fetch it again")
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save: zip, or legacy pickle
        return _torch_load(path, trust)
    if _looks_like_safetensors(head, size) or (path.endswith(".safetensors") and not _is_text(head)):
        return _safetensors_load(path)
    raise _not_a_checkpoint(path, head)


def state_dict_of(obj: Any, name: str = "the checkpoint") -> dict[str, Tensor]:
    """The weights in a loaded checkpoint: under ``"model"``, ``"state_dict"`` or ``"model_ema"``, or
    the dict itself when it holds tensors only; ``module.`` prefixes (DistributedDataParallel)
    removed."""
    state = None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
        else:
            if obj and all(isinstance(v, Tensor) for v in obj.values()):
                state = obj
    if state is None or not all(isinstance(v, Tensor) for v in state.values()):
        what = (f"a dict with keys {', '.join(map(repr, list(obj)[:8]))}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise CheckpointError(f"{name} holds no state dict ({what}): expected a dict of tensors, or "
                              f"one under 'model', 'state_dict' or 'model_ema'")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def read_state_dict(path: PathLike, trust: bool = False) -> dict[str, Tensor]:
    """The weights in ``path``: a DeiT / EViT / timm release, a plain state dict, a
    ``.safetensors`` file or one of this project's checkpoints (see the module's docstring)."""
    return state_dict_of(read_checkpoint(path, trust), f"checkpoint {os.fspath(path)!r}")


def split_ice_head(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(state dict without ice_head, ice_head's state dict with the prefix stripped)``."""
    model_state = {k: v for k, v in state.items() if not k.startswith("ice_head.")}
    head_state = {k[len("ice_head."):]: v for k, v in state.items() if k.startswith("ice_head.")}
    return model_state, head_state


# ---------------------------------------------------------------------------------------------
# loading into a model


def classifier_keys(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a timm model's classifier(s), from its ``pretrained_cfg`` (``"head."``
    for a ViT; DeiT's distilled models add ``"head_dist."``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def load_checkpoint(model: nn.Module, checkpoint: Union[PathLike, Mapping[str, Tensor]],
                    strict: bool = True, *, optional_prefixes: tuple[str, ...] = (),
                    reset_classifier: bool = False, trust: bool = False,
                    name: Optional[str] = None) -> list[str]:
    """Load ``checkpoint`` (a path for :func:`read_state_dict`, or a state dict) into ``model``;
    returns the model's keys left as they were.

    Keys and shapes are checked first: every key must match in name and shape, except model keys
    under ``optional_prefixes`` (e.g. ``"ice_head."``, a new ICE head), which may be missing;
    ``strict=False`` skips missing and unexpected keys (shapes are still checked). A mismatch raises
    ``ValueError`` naming the keys and the fix. ``reset_classifier=True`` leaves the model's
    classifier as initialized and ignores the checkpoint's (weights trained on another class count,
    as timm does for ``pretrained=True, num_classes=N``). ``trust`` as for :func:`read_checkpoint`.
    ``name``: what the errors call ``checkpoint`` (default ``checkpoint 'PATH'`` or ``the state dict``).
    """
    if isinstance(checkpoint, Mapping):
        name = name or "the state dict"
        theirs = state_dict_of(checkpoint, name)
    else:
        name = name or f"checkpoint {os.fspath(checkpoint)!r}"
        theirs = read_state_dict(checkpoint, trust)
    optional = tuple(optional_prefixes)
    if reset_classifier:
        head = classifier_keys(model)
        theirs = {k: v for k, v in theirs.items() if not k.startswith(head)}
        optional += head
    ours = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(v.shape)}"
              for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
    missing = [k for k in ours if k not in theirs and not k.startswith(optional)] if strict else []
    unexpected = [k for k in theirs if k not in ours] if strict else []
    if shapes or missing or unexpected:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"{name} does not fit this model ({type(model).__name__}, "
                 f"{getattr(model, 'num_classes', '?')} classes):"]
        if shapes:
            lines.append(f"  shapes differ: {show(shapes)}")
        if missing:
            lines.append(f"  missing in the checkpoint: {show(missing)}")
        if unexpected:
            lines.append(f"  not in the model: {show(unexpected)}")
        lines.append("  build the model it was trained as (--model, --model-kwargs, --num-classes; "
                     "e.g. --model deit_small_patch16_224 for a DeiT-S release)")
        if any(k.startswith(classifier_keys(model)) for k in
               [x.split(":")[0] for x in shapes] + missing + unexpected):
            lines.append("  or, to start from its other weights with a new classifier for another "
                         "class count, pass --reset-classifier (reset_classifier=True)")
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: v for k, v in theirs.items() if k in ours}, strict=False)
    return [k for k in ours if k not in theirs]


# ---------------------------------------------------------------------------------------------
# writing


def plain(obj: Any) -> Any:
    """``obj`` as what a weights-only load reads back: tensors, None, bools, numbers and strings in
    dicts, lists and tuples; numpy values become Python's (arrays lists), anything else its ``str``."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Mapping):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    return str(obj)


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename: a crash never leaves half a file.
    A failed save removes its temp file and re-raises; ``path`` keeps the previous checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
