"""The per-image token counts stage (``adaptive``): the pruning checkpoints at fixed keep rates and
under keep policies calibrated to them, on scenes whose objects differ widely in size; each
variant's top-1, tokens per point, GMACs and img/s, the policy's mean counts as a fixed schedule,
and the speed goal's variants timed again alone."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

import ice_prune
from ice_prune import KeepPolicy
from ice_prune.data import SyntheticScenes
from ice_prune.select import keep_count

from .scales import (ADAPTIVE_CALIBRATION_IMAGES, ADAPTIVE_CALIBRATION_ITERATIONS,
                     ADAPTIVE_FIXED_RATES, ADAPTIVE_FOCUS_REPS_FACTOR, ADAPTIVE_MAX_SHARE,
                     ADAPTIVE_MIN_SHARE, ADAPTIVE_OBJECT_SCALE, Context, Scale, device_name,
                     prune_name, synthetic_eval_kwargs)
from .summary import ADAPTIVE_MATCH_RATE

# images per forward (and per count) while the adaptive stage scores its images
ADAPTIVE_EVAL_BATCH = 200


def adaptive_dataset(scale: Scale) -> SyntheticScenes:
    """The adaptive stage's images: the evaluation images' settings (validation split, seed 0, as
    many images) with objects of ``ADAPTIVE_OBJECT_SCALE`` of the image side, so a set apart from
    the maps images wherever the scale's object sizes differ."""
    return SyntheticScenes(**{"img_size": scale.img_size, "split": "val",
                              **synthetic_eval_kwargs(scale),
                              "scale": list(ADAPTIVE_OBJECT_SCALE)})


def adaptive_calibration_images(scale: Scale, seed: int) -> torch.Tensor:
    """The images the adaptive stage calibrates its policies on: ``ADAPTIVE_CALIBRATION_IMAGES`` of
    SyntheticScenes' training split with the pruning run's seed (where its training images come
    from) and objects of ``ADAPTIVE_OBJECT_SCALE``; never an evaluation image, and no label read."""
    dataset = SyntheticScenes(**{"img_size": scale.img_size, **scale.synthetic_kwargs,
                                 "num_classes": scale.num_classes, "split": "train", "seed": seed,
                                 "length": ADAPTIVE_CALIBRATION_IMAGES,
                                 "scale": list(ADAPTIVE_OBJECT_SCALE)})
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def adaptive_variants(context: Context, rate: float, seed: int, calibration_images: torch.Tensor
                      ) -> dict[str, tuple[torch.nn.Module, dict]]:
    """name -> (eval-mode model, what it is) of the adaptive stage, all from the ``rate`` pruning
    checkpoints of ICE and EViT:

    * ``fixed``: each fixed keep rate of ``ADAPTIVE_FIXED_RATES`` (``ice@0.5``);
    * ``adaptive``: for each of those rates below 1, the policy (ICE's threshold, EViT's mass)
      that :func:`ice_prune.calibrate_keep_policy` gives on ``calibration_images`` within
      ``ADAPTIVE_MIN_SHARE`` / ``ADAPTIVE_MAX_SHARE``, named by its value to 4 significant digits
      (``ice@threshold=0.9731``; `` (to 0.7)`` added where two rates give one name), with the rate
      in ``calibrated_to``;
    * ``bookkeeping``: ``ice@share=0.5``, ICE's policy with both share bounds at
      ``ADAPTIVE_MATCH_RATE``, so that every image keeps that fixed rate's counts and only the
      packed path differs from it (not an adaptive point)."""
    scale = context.scale
    shares = dict(min_share=ADAPTIVE_MIN_SHARE, max_share=ADAPTIVE_MAX_SHARE)

    def load(method: str, keep_rate: float, policy: Optional[KeepPolicy]) -> torch.nn.Module:
        return ice_prune.load_model(scale.model, context.checkpoint(prune_name(method, rate, seed)),
                                    method=method, keep_rate=keep_rate,
                                    patch_kwargs={"keep_policy": policy},
                                    img_size=scale.img_size, **scale.model_kwargs)

    def meta(method: str, kind: str, keep_rate: Optional[float] = None,
             policy: Optional[KeepPolicy] = None, calibrated_to: Optional[float] = None) -> dict:
        return {"method": method, "kind": kind, "keep_rate": keep_rate,
                "policy": None if policy is None else dataclasses.asdict(policy),
                "calibrated_to": calibrated_to}

    variants = {}
    for method, rule in (("ice", "threshold"), ("evit", "mass")):
        for r in ADAPTIVE_FIXED_RATES:
            variants[f"{method}@{r:g}"] = (load(method, r, None), meta(method, "fixed", r))
        model = load(method, rate, None)
        for r in ADAPTIVE_FIXED_RATES:
            if r == 1.0:  # the policy keeping every token is keep rate 1 itself
                continue
            policy = ice_prune.calibrate_keep_policy(
                model, calibration_images, r, iterations=ADAPTIVE_CALIBRATION_ITERATIONS, **shares)
            name = f"{method}@{rule}={getattr(policy, rule):.4g}"
            if name in variants:
                name += f" (to {r:g})"
            variants[name] = (load(method, rate, policy),
                              meta(method, "adaptive", policy=policy, calibrated_to=r))
    share = ADAPTIVE_MATCH_RATE
    policy = KeepPolicy(threshold=0.5, min_share=share, max_share=share)
    variants[f"ice@share={share:g}"] = (load("ice", rate, policy),
                                        meta("ice", "bookkeeping", policy=policy))
    return variants


def schedule_rates(num_patches: int, counts: Sequence[int]) -> tuple[float, ...]:
    """One fixed keep rate per selection point under which every image keeps ``counts[i]`` of its
    non-prefix tokens at point ``i`` (EViT's rule ``ceil(rate * n)``, with fusion), from
    ``num_patches``: ``(k - 1/2) / n``, safe from rounding at either side."""
    rates, n = [], num_patches
    for k in counts:
        if not 1 <= k <= n:
            raise ValueError(f"a point keeps between 1 and its {n} tokens, got {k} ({counts})")
        rates.append(1.0 if k == n else (k - 0.5) / n)
        n = k + int(k < n)
    return tuple(rates)


def schedule_variant(context: Context, rows: dict, rate: float, seed: int, num_patches: int
                     ) -> tuple[str, torch.nn.Module, dict]:
    """``(name, eval-mode model, what it is)`` of fixed-keep ICE at the adaptive ICE point's
    (calibrated to ``ADAPTIVE_MATCH_RATE``) mean tokens per point, rounded: every image keeps
    those counts, run dense. A timing decomposition of the adaptive point (its schedule of counts
    against its spread around them and the packed path), on no curve."""
    point = next(row for row in rows.values() if row["kind"] == "adaptive"
                 and row["method"] == "ice" and row["calibrated_to"] == ADAPTIVE_MATCH_RATE)
    counts = [max(1, round(k)) for k in point["tokens_per_point"]]
    scale, rates = context.scale, schedule_rates(num_patches, counts)
    model = ice_prune.load_model(scale.model, context.checkpoint(prune_name("ice", rate, seed)),
                                 method="ice", keep_rate=rates, img_size=scale.img_size,
                                 **scale.model_kwargs)
    return (f"ice@counts={'/'.join(map(str, counts))}", model,
            {"method": "ice", "kind": "schedule", "keep_rate": None, "policy": None,
             "calibrated_to": None, "counts": counts, "keep_rates": list(rates)})


def adaptive_focus(rows: dict) -> list[str]:
    """The speed goal's variants, timed again alone: fixed-keep ICE at ``ADAPTIVE_MATCH_RATE``
    (first: the baseline), the ICE policy calibrated to it, its schedule and the bookkeeping
    variant."""
    def named(test: Callable[[dict], bool]) -> str:
        return next(name for name, row in rows.items() if test(row))

    return [named(lambda r: r["kind"] == "fixed" and r["method"] == "ice"
                  and r["keep_rate"] == ADAPTIVE_MATCH_RATE),
            named(lambda r: r["kind"] == "adaptive" and r["method"] == "ice"
                  and r["calibrated_to"] == ADAPTIVE_MATCH_RATE),
            named(lambda r: r["kind"] == "schedule"), named(lambda r: r["kind"] == "bookkeeping")]


def fixed_kept(num_patches: int, keep_rate: float, points: int) -> list[int]:
    """The tokens each of ``points`` selection points keeps at a fixed ``keep_rate`` (EViT's rule,
    with fusion) from ``num_patches``."""
    kept, n = [], num_patches
    for _ in range(points):
        k = keep_count(keep_rate, n)
        kept.append(k)
        n = k + int(k < n)
    return kept


def adaptive_stage(context: Context, out: str) -> dict:
    """Per-image token counts against fixed keep rates, from the first keep rate's pruning
    checkpoints (first seed), the policies calibrated on training images
    (:func:`adaptive_calibration_images`, :func:`adaptive_variants`): on :func:`adaptive_dataset`,
    each variant's top-1, mean tokens kept per selection point, mean GMACs per image
    (:func:`ice_prune.count_flops` on the images, in batches; a fixed keep rate's on one image, the
    same for every image) and img/s (every variant in one :func:`ice_prune.benchmark_models` run on
    the first ``bench_batch`` images, eager: a policy's forward syncs with the host). The
    bookkeeping variant must keep fixed keep ``ADAPTIVE_MATCH_RATE``'s counts in every image; the
    schedule variant (:func:`schedule_variant`) is timed beside them, and the speed goal's four
    variants (:func:`adaptive_focus`) again alone, ``ADAPTIVE_FOCUS_REPS_FACTOR`` times as long."""
    scale = context.scale
    rate, seed = scale.keep_rates[0], scale.seeds[0]
    dataset = adaptive_dataset(scale)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items])
    calibration_images = adaptive_calibration_images(scale, seed)
    variants = adaptive_variants(context, rate, seed, calibration_images)
    num_patches = next(iter(variants.values()))[0].patch_embed.num_patches
    rows, points = {}, None
    for name, (model, meta) in variants.items():
        correct, macs, counts = 0, 0, []
        for start in range(0, len(images), ADAPTIVE_EVAL_BATCH):
            x = images[start:start + ADAPTIVE_EVAL_BATCH]
            with torch.no_grad():
                correct += int((model(x).argmax(-1) == labels[start:start + len(x)]).sum())
            if meta["policy"] is not None:
                counts.append(torch.stack(model.ice_keep_counts, dim=1))
                macs += ice_prune.count_flops(model, images=x)
        if meta["policy"] is not None:
            counts = torch.cat(counts)
            points = counts.shape[1]
            if meta["kind"] == "bookkeeping":
                fixed = fixed_kept(num_patches, meta["policy"]["min_share"], points)
                if not torch.equal(counts, torch.tensor(fixed).expand_as(counts)):
                    raise RuntimeError(f"{name} should keep fixed keep "
                                       f"{meta['policy']['min_share']:g}'s counts {fixed} in "
                                       f"every image, and some image kept otherwise")
            tokens = counts.double().mean(dim=0).tolist()
            gmacs = macs / len(images) / 1e9
        else:
            tokens = None  # filled in below, once a policy gave the number of points
            gmacs = ice_prune.count_flops(model, images=images[:1]) / 1e9
        rows[name] = {**meta, "top1": 100 * correct / len(images), "gmacs": gmacs,
                      "tokens_per_point": tokens}
    for row in rows.values():
        if row["tokens_per_point"] is None:
            row["tokens_per_point"] = fixed_kept(num_patches, row["keep_rate"], points)
    name, model, meta = schedule_variant(context, rows, rate, seed, num_patches)
    with torch.no_grad():
        correct = sum(int((model(images[i:i + ADAPTIVE_EVAL_BATCH]).argmax(-1)
                           == labels[i:i + ADAPTIVE_EVAL_BATCH]).sum())
                      for i in range(0, len(images), ADAPTIVE_EVAL_BATCH))
    rows[name] = {**meta, "top1": 100 * correct / len(images),
                  "gmacs": ice_prune.count_flops(model, images=images[:1]) / 1e9,
                  "tokens_per_point": [float(k) for k in meta["counts"]]}
    variants[name] = (model, meta)
    timed = {name: model for name, (model, _) in variants.items()}
    benchmark = ice_prune.benchmark_models(timed, inputs=images[:scale.bench_batch],
                                           device=scale.device, dtype=scale.bench_dtype,
                                           reps=scale.bench_reps, progress=True)
    for name, row in rows.items():
        row["img_s_median"], row["img_s_best"] = benchmark[name].median, benchmark[name].best
    focus = adaptive_focus(rows)
    focused = ice_prune.benchmark_models({n: variants[n][0] for n in focus},
                                         inputs=images[:scale.bench_batch], device=scale.device,
                                         dtype=scale.bench_dtype,
                                         reps=scale.bench_reps * ADAPTIVE_FOCUS_REPS_FACTOR,
                                         baseline=focus[0], progress=True)

    def calibrated(rule: str) -> list[float]:
        """The calibrated values of ``rule``, in the order of ``ADAPTIVE_FIXED_RATES``."""
        found = {row["calibrated_to"]: row["policy"][rule] for row in rows.values()
                 if row["kind"] == "adaptive" and row["policy"][rule] is not None}
        return [found[r] for r in ADAPTIVE_FIXED_RATES if r in found]

    return {"source_keep_rate": rate, "seed": seed,
            "sources": {m: context.checkpoint(prune_name(m, rate, seed)) for m in ("ice", "evit")},
            "images": len(images), "num_patches": num_patches,
            "data": {"object_scale": list(ADAPTIVE_OBJECT_SCALE), "split": "val", "seed": 0},
            "fixed_rates": list(ADAPTIVE_FIXED_RATES), "thresholds": calibrated("threshold"),
            "masses": calibrated("mass"),
            "calibration": {"images": len(calibration_images), "split": "train", "seed": seed,
                            "object_scale": list(ADAPTIVE_OBJECT_SCALE),
                            "iterations": ADAPTIVE_CALIBRATION_ITERATIONS,
                            "precision": 2.0 ** -ADAPTIVE_CALIBRATION_ITERATIONS,
                            "rates": [r for r in ADAPTIVE_FIXED_RATES if r < 1.0]},
            "min_share": ADAPTIVE_MIN_SHARE, "max_share": ADAPTIVE_MAX_SHARE, "variants": rows,
            "focus": {"variants": focus, "reps": scale.bench_reps * ADAPTIVE_FOCUS_REPS_FACTOR,
                      "img_s_median": {n: focused[n].median for n in focus},
                      "img_s_best": {n: focused[n].best for n in focus},
                      "paired_speedup": {n: focused.paired_speedup(n) for n in focus},
                      "benchmark": focused.to_dict()},
            "batch": benchmark[benchmark.baseline].batch_size, "reps": scale.bench_reps,
            "dtype": scale.bench_dtype, "threads": torch.get_num_threads(),
            "device": device_name(), "benchmark": benchmark.to_dict()}
