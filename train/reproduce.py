#!/usr/bin/env python3
"""The paper's experiments in miniature, end to end, with a report (``make reproduce``).

    python train/reproduce.py --scale cpu            # about 90 minutes on a 2-core CPU
    python train/reproduce.py --scale gpu-synthetic  # the same scenes sized for one GPU (~15 min)
    python train/reproduce.py --scale gpu --data /data/imagenet \\
        --seg-data gtsegs_ijcv.mat --checkpoint deit_small_patch16_224-cd65a155.pth

Stages (see train/repro): pretrain a 12-block ViT on SyntheticScenes (cpu scale; gpu scale
starts from the DeiT-S checkpoint), train ICE / ICE-f / ICEv2-style for a budget chosen on a
validation split and Table 6's ablation and evaluate their maps and the baseline maps, fine-tune ICE
and EViT at keep rates 0.7 / 0.5 with two seeds (and for longer budgets: the pruning curve), measure
speed, draw examples. After pretraining the cpu scale runs two stages at once (``--jobs``). Each stage writes ``OUT/work/<stage>/done.json``; a second run
reuses finished stages (``--fresh`` starts over). The report: ``OUT/REPORT.md``, ``OUT/results.json``,
``OUT/figures/``.
"""
import os
import sys

# train/repro and the sibling scripts whose main(argv) its stages call
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import repro  # noqa: E402
from ice_prune.training.cli import ArgumentParser, check_output_dir  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="cpu", choices=sorted(repro.SCALES))
    parser.add_argument("--out", default=None, help="report folder (default reports/<scale>)")
    parser.add_argument("--fresh", action="store_true", help="discard finished stages and start over")
    parser.add_argument("--until", default=None, metavar="STAGE",
                        help="run only this stage and those it reads (e.g. pretrain), then stop; a "
                             "later run goes on from there")
    parser.add_argument("--jobs", type=int, default=None,
                        help="stages at once, each in its own process (default: the scale's; cpu: "
                             "2, one torch thread each on a 2-core machine)")
    gpu = parser.add_argument_group("gpu scale")
    gpu.add_argument("--data", default=None, help="ImageNet ImageFolder root (train/, val/)")
    gpu.add_argument("--seg-data", default=None, help="ImageNet-Segmentation gtsegs_ijcv.mat")
    gpu.add_argument("--checkpoint", default=None, help="pretrained DeiT-S weights (.pth)")
    return parser.parse_args(argv)


def build_scale(args) -> repro.Scale:
    if args.scale == "gpu":
        return repro.gpu_scale(data=args.data, seg_data=args.seg_data, checkpoint=args.checkpoint)
    given = [flag for flag, value in (("--data", args.data), ("--seg-data", args.seg_data),
                                      ("--checkpoint", args.checkpoint)) if value]
    if given:
        raise ValueError(f"{', '.join(given)} apply to --scale gpu only; --scale {args.scale} "
                         f"trains on SyntheticScenes from scratch")
    return repro.SCALES[args.scale]()


def main(argv=None) -> dict:
    args = parse_args(argv)
    scale = build_scale(args)
    out = args.out or os.path.join("reports", scale.name)
    check_output_dir(out, "--out")
    results = repro.run(scale, out, fresh=args.fresh, until=args.until, jobs=args.jobs)
    if results is not None:
        print(f"report: {os.path.join(out, 'REPORT.md')} ({results['wall_s'] / 60:.1f} min of "
              f"stages)")
    return results


if __name__ == "__main__":
    from ice_prune.training.cli import run_script

    run_script(main)
