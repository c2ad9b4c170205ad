"""Train / evaluate loops shared by ``train/explain.py`` and ``train/prune.py``.

One process or many: launched by ``torchrun`` the loop runs DistributedDataParallel (NCCL on GPUs,
gloo on CPU); alone it runs plain. AMP (bf16 or fp16 with a grad scaler) only on CUDA. timm's
``create_optimizer_v2`` / ``create_scheduler_v2`` (stepped per update), optional ``ModelEmaV3``,
gradient clipping, the keep-rate schedule of a pruned model, tqdm progress, JSON-lines logs.

Checkpoints (``OUTPUT/last.pth``, written atomically: temp file, then ``os.replace``) hold::

    {"model": state dict of the trained module (timm keys; an ICE head under "ice_head."),
     "optimizer", "scheduler", "scaler" (or None), "ema" (or None): their state dicts,
     "epoch": epochs completed, "num_updates": optimizer steps taken,
     "rng": one dict per process {"torch", "cuda", "numpy", "python"} (:func:`rng_state`),
     "meta": what the script says about the run (model name, head, loss, keep rate, ...),
     "args": the command-line arguments}

Tensors, plain containers and strings only (:func:`ice_prune.checkpoint.plain`), so
:func:`ice_prune.checkpoint.read_checkpoint` reads them with ``torch.load(weights_only=True)``. They
are written at the end of every epoch; ``resume=True`` reloads the last one and the run continues
exactly as an uninterrupted run would (same data order, augmentations and weights).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import sys
import time
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ice_prune.checkpoint import CheckpointError, plain, read_checkpoint, save_checkpoint
from ice_prune.throughput import check_device

CHECKPOINT = "last.pth"
LOG = "log.jsonl"
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "num_updates", "rng")

StepFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module, Tensor, Tensor], dict[str, float]]


# ---------------------------------------------------------------------------------------------
# processes


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group ``torchrun`` set up (NCCL on CUDA, gloo otherwise), or run alone, on
    ``device`` (checked: :func:`ice_prune.throughput.check_device`); a CUDA device without an index
    is the process's local rank's, which must exist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is None:
            device = check_device(f"cuda:{local}", "--device")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values, which a weights-only load reads: numpy's
    as ``np.random.get_state(legacy=False)`` with its key array a tensor, Python's as
    ``random.getstate()`` (a tuple of ints)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {"torch": torch.get_rng_state(), "numpy": plain(numpy_state),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (or those of a checkpoint written before they were
    tensors, where numpy's is ``np.random.get_state()``'s tuple)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        key = numpy_state["state"]["key"].numpy().astype(np.uint32)
        numpy_state = {**numpy_state, "state": {**numpy_state["state"], "key": key}}
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# output directory


def resume_command(argv: Optional[list[str]] = None, world_size: int = 1) -> str:
    """The command line that continues this run."""
    argv = list(sys.argv if argv is None else argv)
    args = [a for a in argv[1:] if a not in ("--resume", "--overwrite")] + ["--resume"]
    launcher = ([f"torchrun --nproc_per_node {world_size}"] if world_size > 1
                else [shlex.quote(sys.executable)])
    return " ".join(launcher + [shlex.quote(argv[0])] + [shlex.quote(a) for a in args])


def prepare_output(output: str, resume: bool, overwrite: bool, info: DistInfo) -> Optional[str]:
    """Make ``output``; refuse to clobber a run there. Returns the checkpoint to resume or None.
    A folder that cannot be made is a ValueError (the scripts check it first:
    :func:`ice_prune.training.cli.check_output_dir`)."""
    ckpt = os.path.join(output, CHECKPOINT)
    has_run = os.path.exists(ckpt) or os.path.exists(os.path.join(output, LOG))
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if resume:
        if not os.path.exists(ckpt):
            raise FileNotFoundError(f"--resume: no checkpoint {ckpt!r}; start the run without "
                                    f"--resume")
        return ckpt
    if has_run and not overwrite:
        raise FileExistsError(
            f"{output!r} already holds a run ({CHECKPOINT} / {LOG}); continue it with --resume, "
            f"start over with --overwrite, or choose another --output")
    if info.is_main:
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--output {output!r} cannot be created ({e.strerror}); choose another "
                             f"--output") from None
        for name in (CHECKPOINT, LOG):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output, name))
    if info.distributed:
        dist.barrier()
    return None


class JsonLog:
    """Appends one JSON object per line (main process only), flushed at once."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


# ---------------------------------------------------------------------------------------------
# loops


class _Meter:
    """Batch-size-weighted sums of named metrics, reduced over processes at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, metrics: dict[str, float], n: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.count += n

    def result(self, info: DistInfo) -> dict[str, float]:
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [self.count], dtype=torch.float64)
        if info.distributed:
            dist.all_reduce(t)
        return {k: (t[i] / t[-1]).item() for i, k in enumerate(keys)}


def autocast(device: torch.device, amp: str):
    """bf16 / fp16 autocast on CUDA; a no-op elsewhere (CPU training runs in fp32)."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def train_one_epoch(model: nn.Module, step_fn: StepFn, loader: Iterable, optimizer, info: DistInfo,
                    epoch: int, num_updates: int, amp: str = "off", scaler=None,
                    clip_grad: Optional[float] = None, ema=None, mixup_fn=None, lr_scheduler=None,
                    keep_rate_fn: Optional[Callable[[int], Any]] = None,
                    log: Optional[JsonLog] = None, log_every: int = 10,
                    progress: bool = True) -> tuple[dict[str, float], int]:
    """One pass over ``loader``; returns (mean metrics over all processes, updated ``num_updates``)."""
    from timm.utils import dispatch_clip_grad
    from tqdm import tqdm

    model.train()
    meter = _Meter()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (progress and info.is_main),
               dynamic_ncols=True)
    for it, (images, targets) in enumerate(bar):
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        if keep_rate_fn is not None:
            unwrap(model).keep_rate = keep_rate_fn(num_updates)
        with autocast(info.device, amp):
            loss, metrics = step_fn(model, images, targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch} iteration {it}; "
                                     f"lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=clip_grad, parameters=params)
        else:
            loss.backward()
            if clip_grad is not None:
                dispatch_clip_grad(params, clip_grad)
            optimizer.step()
        num_updates += 1
        if ema is not None:
            ema.update(unwrap(model), step=num_updates)
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates)
        metrics = {"loss": loss.item(), **metrics}
        meter.update(metrics, images.shape[0])
        lr = optimizer.param_groups[0]["lr"]
        if info.is_main:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
        if log is not None and (it % log_every == 0):
            log.write(epoch=epoch, iter=it, lr=lr, **metrics)
    return meter.result(info), num_updates


@torch.no_grad()
def evaluate(model: nn.Module, eval_fn: EvalFn, loader: Iterable, info: DistInfo,
             amp: str = "off", progress: bool = True) -> dict[str, float]:
    from tqdm import tqdm

    model.eval()
    meter = _Meter()
    for images, targets in tqdm(loader, desc="eval", disable=not (progress and info.is_main),
                                dynamic_ncols=True):
        images = images.to(info.device, non_blocking=True)
        targets = targets.to(info.device, non_blocking=True)
        with autocast(info.device, amp):
            metrics = eval_fn(model, images, targets)
        meter.update(metrics, images.shape[0])
    return meter.result(info)


@dataclasses.dataclass
class TrainConfig:
    """What :func:`fit` needs besides the model, the data and the loss. Defaults: DeiT's recipe
    (AdamW, cosine per update, weight decay 0.05); the scripts set the paper's values."""

    output: str
    epochs: int = 30
    batch_size: int = 64  # per process
    opt: str = "adamw"
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_epochs: int = 0
    weight_decay: float = 0.05
    sched: str = "cosine"
    clip_grad: Optional[float] = None
    amp: str = "bf16"  # bf16 | fp16 | off; CUDA only
    ema_decay: Optional[float] = None
    workers: int = 4
    seed: int = 0
    log_every: int = 10
    eval_every: int = 1
    resume: bool = False
    overwrite: bool = False
    trust_checkpoint: bool = False  # --resume: unpickle the checkpoint in full (see ice_prune.checkpoint)
    progress: bool = True
    device: Optional[str] = None
    # a pruned model's ICE head sits idle while the keep rate is still 1 (shrink_start > 0)
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.amp not in ("bf16", "fp16", "off"):
            raise ValueError(f"amp must be bf16, fp16 or off, got {self.amp!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0, got {self.clip_grad}")


def fit(cfg: TrainConfig, model: nn.Module, step_fn: StepFn, eval_fn: EvalFn, train_set: Dataset,
        val_set: Optional[Dataset], info: DistInfo, save_module: Optional[nn.Module] = None,
        mixup_fn=None, keep_rate_fn_factory: Optional[Callable[[int], Callable[[int], Any]]] = None,
        meta: Optional[dict] = None, args: Optional[dict] = None,
        epoch_end: Optional[Callable[[int], dict[str, Any]]] = None) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` with checkpoints in ``cfg.output``; return the last record.

    ``save_module`` is what goes into the checkpoint's "model" (default: ``model``), e.g. the timm ViT
    carrying its ICE head when ``model`` is a wrapper. ``keep_rate_fn_factory(iters_per_epoch)`` gives
    the keep-rate schedule of a pruned model (``ice_prune.keep_rate_schedule``).
    ``epoch_end(num_updates)``, called on the main process at the end of every epoch (after the
    validation, before the checkpoint), returns entries for the epoch's record (e.g. ``train/explain.py
    --map-val-images``' ``"map_val"``); the RNG states are restored after it, so it never changes
    the training.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    resume_from = prepare_output(cfg.output, cfg.resume, cfg.overwrite, info)
    seed_everything(cfg.seed + info.rank)
    save_module = save_module if save_module is not None else model
    model.to(info.device)

    def loader(ds, train):
        sampler = DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=train, seed=cfg.seed, drop_last=train)
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                          pin_memory=info.device.type == "cuda", drop_last=train,
                          persistent_workers=False)

    train_loader = loader(train_set, True)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} training images make no full batch of "
                         f"{cfg.batch_size} x {info.world_size} processes; lower --batch-size")
    val_loader = loader(val_set, False) if val_set is not None else None

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=len(train_loader))
    use_scaler = info.device.type == "cuda" and cfg.amp == "fp16"
    scaler = NativeScaler(device="cuda") if use_scaler else None
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None
    start_epoch, num_updates = 0, 0
    if resume_from is not None:
        ckpt = read_checkpoint(resume_from, trust=cfg.trust_checkpoint)
        lacking = [k for k in RESUME_KEYS if not (isinstance(ckpt, dict) and k in ckpt)]
        if lacking:
            raise CheckpointError(f"checkpoint {resume_from!r} is not one of an ice_prune run (no "
                                  f"{', '.join(lacking)}): --resume continues a run this project "
                                  f"wrote")
        save_module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, num_updates = ckpt["epoch"], ckpt["num_updates"]
        rngs = ckpt["rng"]
        if len(rngs) != info.world_size:
            raise ValueError(f"the checkpoint was written by {len(rngs)} processes, this run has "
                             f"{info.world_size}; resume with the same process count for an "
                             f"exact continuation")
        set_rng_state(rngs[info.rank])
        lr_scheduler.step_update(num_updates=num_updates)
    if info.distributed:
        ddp_kwargs = {"device_ids": [info.device.index]} if info.device.type == "cuda" else {}
        ddp_kwargs["find_unused_parameters"] = cfg.find_unused_parameters
        train_model: nn.Module = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    else:
        train_model = model
    keep_rate_fn = keep_rate_fn_factory(len(train_loader)) if keep_rate_fn_factory else None
    log = JsonLog(os.path.join(cfg.output, LOG), info.is_main)
    if info.is_main:
        print(f"output: {cfg.output}\nto resume: {resume_command(world_size=info.world_size)}",
              flush=True)
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        t0 = time.time()
        train_stats, num_updates = train_one_epoch(
            train_model, step_fn, train_loader, optimizer, info, epoch, num_updates, amp=cfg.amp,
            scaler=scaler, clip_grad=cfg.clip_grad, ema=ema, mixup_fn=mixup_fn,
            lr_scheduler=lr_scheduler, keep_rate_fn=keep_rate_fn, log=log,
            log_every=cfg.log_every, progress=cfg.progress)
        record = {"epoch": epoch, "num_updates": num_updates, "time_s": round(time.time() - t0, 3),
                  "train": train_stats}
        if val_loader is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            if keep_rate_fn is not None:
                unwrap(train_model).keep_rate = keep_rate_fn(num_updates)
            record["val"] = evaluate(train_model, eval_fn, val_loader, info, cfg.amp,
                                     cfg.progress)
            if ema is not None:
                record["val_ema"] = evaluate(ema.module, eval_fn, val_loader, info, cfg.amp,
                                             cfg.progress)
        if epoch_end is not None and info.is_main:
            state = rng_state()
            try:
                record.update(epoch_end(num_updates))
            finally:
                set_rng_state(state)
        rngs = _all_gather_objects(rng_state(), info)
        if info.is_main:
            save_checkpoint(os.path.join(cfg.output, CHECKPOINT), {
                "model": save_module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch + 1, "num_updates": num_updates, "rng": rngs,
                "meta": plain(meta or {}), "args": plain(args or {})})
            log.write(**record)
            print(json.dumps(record), flush=True)
        if info.distributed:
            dist.barrier()
    return record
