"""train/reproduce.py and train/repro: the whole pipeline at a seconds-long scale, resumability, the
report read from the stages' outputs, and the gpu scale's command lines."""
import dataclasses
import json
import math
import os
import sys

import pytest
import torch

import ice_prune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train/repro and the scripts its stages call (prune, explain, evaluate) import from train/
sys.path.insert(0, os.path.join(ROOT, "train"))

import evaluate  # noqa: E402
import explain  # noqa: E402
import pm  # noqa: E402
import prune  # noqa: E402
import repro  # noqa: E402
import reproduce  # noqa: E402


def tiny_scale():
    # one seed and one keep rate keep the run to seconds; the stage list is otherwise the cpu one
    return repro.smoke_scale(seeds=(0,), keep_rates=(0.5,), eval_images=4, grid_images=1,
                             bench_reps=1)


@pytest.mark.slow
def test_pipeline_runs_resumes_and_reports_from_stage_outputs(tmp_path):
    scale = tiny_scale()
    out = str(tmp_path / "report")
    logs = []
    # stop after the first explanation run: it and what it reads (pretraining, ICE's budget sweep)
    # run, nothing else, no report; the full run then goes on from there, two stages at once
    assert repro.run(scale, out, log=logs.append, until="explain-ice") is None
    assert not os.path.exists(os.path.join(out, "REPORT.md"))
    first = ["pretrain", "budget-ice-e1", "budget-ice-e2", "budget-ice-e4", "explain-ice"]
    assert sorted(os.listdir(os.path.join(out, "work"))) == sorted(first + ["elapsed.json"])
    logs.clear()
    results = repro.run(scale, out, log=logs.append, jobs=2)
    assert [line for line in logs if "reused" in line] == [
        f"[{i}/39] {name}: done before, reused" for i, name in
        ((1, "pretrain"), (2, "budget-ice-e1"), (3, "budget-ice-e2"), (4, "budget-ice-e4"),
         (5, "explain-ice"))]
    names = [s.name for s in repro.plan(scale)]
    sweep = [f"budget-{v}-e{e}" for v in ("ice", "ice-f", "icev2-style") for e in (1, 2, 4)]
    assert names == (["pretrain"] + sweep[:3] + ["explain-ice"] + sweep[3:6] + ["explain-ice-f"]
                     + sweep[6:] + ["explain-icev2-style", "explain-ice-ablation",
                     "classes-3-lambda-auto-main", "explain-ice-literal", "explain-ice-alpha1-literal", "explain-ice-alpha1",
                     "explain-ice-lambda0.5-literal", "explain-ice-lambda0.5",
                     "explain-ice-alpha1-lambda0.5-literal", "explain-ice-alpha1-lambda0.5",
                     "maps-baselines", "explain-pm-style", "explain-pm-style-pseudo",
                     "explain-pm-style-no-masks", "classes-3-generic", "classes-3-lambda-paper",
                     "classes-3-lambda-auto", "classes-3-lambda-0.5", "prune-none-1-s0", "prune-evit-0.5-s0", "prune-ice-0.5-s0",
                     "prune-evit-0.5-s0-e2", "prune-ice-0.5-s0-e2", "pruned-map-ice-0.5-s0",
                     "speed", "examples", "adaptive"])
    # the parallel run: each stage's output in its stage.log, the clock time of both invocations
    assert os.path.getsize(os.path.join(out, "work", "maps-baselines", "stage.log")) > 0
    with open(os.path.join(out, "work", "elapsed.json")) as f:
        runs = json.load(f)
    assert [r["jobs"] for r in runs] == [1, 2]
    assert results["jobs"] == 2 and results["elapsed_s"] > 0
    with open(os.path.join(out, "REPORT.md")) as f:  # each invocation's minutes, as they add up
        assert "elapsed with up to 2 stages at once (one torch thread each) in " + "; ".join(
            f"{r['seconds'] / 60:.1f}" for r in runs) in f.read()
    for name in names:
        assert os.path.exists(os.path.join(out, "work", name, repro.DONE))
    for f in ("REPORT.md", "results.json", "figures/examples.png",
              "figures/accuracy_vs_keep_rate.png", "figures/speedup_vs_gmacs.png",
              "figures/miou_vs_lambda.png", "figures/pruned_forward_map.png",
              "figures/explain_budget.png", "figures/prune_budget.png", "figures/adaptive.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    check_budgets(out, results, scale)
    check_adaptive(out, results, scale)

    def meta(stage):
        return torch.load(os.path.join(out, "work", stage, "last.pth"), map_location="cpu",
                          weights_only=False)["meta"]

    # the ablation runs really trained with the ablated loss: as the paper wrote it, and with the
    # lambda that keeps the row's balance (1 - lambda) alpha C / lambda at the smoke scale's 4 classes
    literal = meta("explain-ice-alpha1-lambda0.5-literal")
    assert literal["loss"]["alpha"] == 1.0 and literal["lambda_class"] == 0.5
    balanced = meta("explain-ice-alpha1-lambda0.5")
    assert balanced["loss"]["alpha"] == 1.0
    assert balanced["lambda_class"] == pytest.approx(4 / (4 + 1000), rel=1e-5)
    assert meta("explain-ice-literal")["lambda_class"] == 0.975
    assert meta("explain-ice")["lambda_rule"] == "auto"
    assert meta("explain-ice")["lambda_class"] == pytest.approx(4 * 0.975 / (4 * 0.975 + 25))
    # the class-count study: 3 classes from 4-class pretraining, a new classifier and ICE head
    study = meta("classes-3-lambda-auto")
    assert study["num_classes"] == 3
    assert study["lambda_class"] == pytest.approx(3 * 0.975 / (3 * 0.975 + 25))
    weights = torch.load(os.path.join(out, "work", "classes-3-lambda-auto", "last.pth"),
                         map_location="cpu", weights_only=False)["model"]
    assert weights["head.weight"].shape[0] == 3 and weights["ice_head.fc.weight"].shape[0] == 4
    with open(os.path.join(out, "results.json")) as f:
        study = json.load(f)["summary"]["classes"]["3"]
    # sorted by lambda: the rule's 0.105, the sweep's 0.5, the paper's 0.975
    assert [r["lambda"] for r in study["runs"]] == ["auto", "0.5", "paper"]
    assert study["rule"]["lambda_class"] == pytest.approx(2.925 / 27.925)
    # PM-style: a quarter of the 16 smoke training images keep their ground-truth mask; the pseudo
    # run takes as many masks from explain-ice's ICE model; the control none; timm's keys only
    pm_meta = meta("explain-pm-style")
    assert (pm_meta["mask_source"], pm_meta["masked_images"], pm_meta["train_images"]) == (
        "dataset", 4, 16)
    pseudo = meta("explain-pm-style-pseudo")
    assert pseudo["mask_source"] == "ice:" + os.path.join(out, "work", "explain-ice", "last.pth")
    assert pseudo["masked_indices"] == pm_meta["masked_indices"]
    assert meta("explain-pm-style-no-masks")["masked_images"] == 0
    pm_weights = torch.load(os.path.join(out, "work", "explain-pm-style", "last.pth"),
                            map_location="cpu", weights_only=False)["model"]
    assert not any(k.startswith("ice_head.") for k in pm_weights)
    pm_summary = repro.summarize(results)
    assert list(pm_summary["pm"]) == ["pm-style", "pm-style-pseudo", "pm-style-no-masks"]
    for run, row in pm_summary["pm"].items():
        done = results["stages"][f"explain-{run}"]
        assert row["miou"] == done["maps"]["miou"] and row["top1"] == done["top1"]
    assert pm_summary["unmodified_top1"] == results["stages"]["pretrain"]["top1"]
    meta = torch.load(os.path.join(out, "work", "prune-ice-0.5-s0", "last.pth"), map_location="cpu",
                      weights_only=False)["meta"]
    assert meta["method"] == "ice" and meta["keep_rate"] == 0.5
    # fewer MACs when pruned; ICE's head adds its multiply-adds on top of EViT's
    speed = results["stages"]["speed"]["models"]
    assert speed["evit-0.5"]["gmacs"] < speed["none-1"]["gmacs"]
    assert speed["ice-0.5"]["gmacs"] > speed["evit-0.5"]["gmacs"]
    assert speed["ice-0.5"]["params_m"] > speed["evit-0.5"]["params_m"] == speed["none-1"]["params_m"]
    # ICE's map from the pruned forward of prune-ice-0.5-s0 and the same weights at keep rate 1:
    # scored by train/evaluate.py explain, compared by train/evaluate.py agreement, logits unchanged
    pruned_map = results["stages"]["pruned-map-ice-0.5-s0"]
    assert pruned_map["checkpoint"] == os.path.join(out, "work", "prune-ice-0.5-s0", "last.pth")
    assert (pruned_map["keep_rate"], pruned_map["seed"], pruned_map["images"]) == (0.5, 0, 4)
    for name, keep in (("pruned", 0.5), ("unpruned", 1.0)):
        with open(os.path.join(out, "work", "pruned-map-ice-0.5-s0", name, "explain.json")) as f:
            written = json.load(f)
        assert (written["method"], written["keep_rate"], list(written["methods"])) == (
            "ice", keep, ["ice-pruned"])
        assert pruned_map[name] == written["methods"]["ice-pruned"]
    agreement = pruned_map["agreement"]
    assert (agreement["keep_rate"], agreement["reference_keep_rate"], agreement["images"]) == (
        0.5, 1.0, 4)
    assert agreement["logits_identical"] and agreement["logits_max_abs_diff"] == 0.0
    assert 0 <= agreement["foreground_iou"] <= 100

    # a second run reuses every stage: no done.json is rewritten
    stamps = {n: os.path.getmtime(os.path.join(out, "work", n, repro.DONE)) for n in names}
    logs.clear()
    repro.run(scale, out, log=logs.append)
    assert all("reused" in line for line in logs) and len(logs) == len(names)
    assert stamps == {n: os.path.getmtime(os.path.join(out, "work", n, repro.DONE))
                      for n in names}

    # the report shows what the stage outputs say: change one and it follows
    path = os.path.join(out, "work", "prune-ice-0.5-s0", repro.DONE)
    with open(path) as f:
        done = json.load(f)
    done["top1"] = 12.3456
    with open(path, "w") as f:
        json.dump(done, f)
    path = os.path.join(out, "work", "maps-baselines", repro.DONE)
    with open(path) as f:
        done = json.load(f)
    done["maps"]["rollout"]["miou"] = 99.876
    with open(path, "w") as f:
        json.dump(done, f)
    path = os.path.join(out, "work", "pruned-map-ice-0.5-s0", repro.DONE)
    with open(path) as f:
        done = json.load(f)
    done["pruned"]["miou"], done["unpruned"]["miou"] = 41.234, 43.5
    done["agreement"]["foreground_iou"], done["agreement"]["spearman"] = 87.654, 0.9123
    with open(path, "w") as f:
        json.dump(done, f)
    repro.run(scale, out, log=logs.append)
    with open(os.path.join(out, "results.json")) as f:
        written = json.load(f)
    assert written["summary"]["prune"]["ice-0.5"]["top1_mean"] == pytest.approx(12.3456)
    assert written["summary"]["best_baseline"] == "rollout"
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "| ICE | 0.5 | 12.35 |" in report
    assert "| rollout | " in report and "99.88" in report
    # the maps table: the trained PM-style rows with their top-1, beside the untrained reading
    pm = written["summary"]["pm"]["pm-style"]
    assert (f"| pm-style, trained, 25% ground-truth masks | {pm['pixel_accuracy']:.2f} | "
            f"{pm['miou']:.2f} |") in report
    assert f"| {pm['top1']:.2f} |" in report.split("| pm-style, trained, 25% ground-truth")[1]
    assert "| pm-style, trained, 25% ICE pseudo masks |" in report
    assert "| pm-style, fine-tuned without masks (control) |" in report
    assert "It gives no loss, layer, weighting or threshold" in report and "**Ours**" in report
    assert "PM-style trained with 25% ground-truth masks (4 images) beats the untrained" in report
    ice_miou = written["summary"]["maps"]["ice"]["miou"]
    assert f"ICE beats the best baseline map (rollout) on mIoU: **no**, by {ice_miou - 99.876:+.2f}" \
        in report
    # ICE's map from the pruned forward: its table beside the unpruned pass, the explanation run's
    # ICE map and the best baseline, and its claims
    study = written["summary"]["pruned_maps"]["0.5"]
    assert study["pruned"]["miou"] == 41.234 and study["unpruned"]["miou"] == 43.5
    assert "## ICE's map from the pruned forward" in report
    pruned_row = next(line for line in report.splitlines()
                      if line.startswith("| pruned forward, prune-ice-0.5-s0 | 0.5 |"))
    assert "| 41.23 |" in pruned_row and pruned_row.endswith("| 87.65 | 0.912 | yes |")
    unpruned_row = next(line for line in report.splitlines()
                        if line.startswith("| unpruned pass of the same weights | 1 |"))
    assert "| 43.50 |" in unpruned_row
    assert f"| ICE, explanation run (last block) | - | {written['summary']['maps']['ice']['pixel_accuracy']:.2f} |" \
        in report
    assert "| rollout (best baseline) | - |" in report and "99.88" in report
    assert ("ICE's map from the pruned forward at keep rate 0.5 is within 2 mIoU points of the "
            "unpruned pass of the same weights: **no**, by -2.27 points") in report
    assert ("The map leaves the logits of the ICE model pruned at keep rate 0.5 bit-identical "
            "(eager, 4 images): **yes**, 0 images differ") in report
    assert "![pruned-forward map](figures/pruned_forward_map.png)" in report
    # a run without these stages (an older results.json) reports without them
    older = {**results, "stages": {k: v for k, v in results["stages"].items()
                                   if not k.startswith("pruned-map-")}}
    older["stages"]["examples"] = {k: v for k, v in older["stages"]["examples"].items()
                                   if k != "pruned_forward_figure"}
    older["summary"] = repro.summarize(older)
    assert older["summary"]["pruned_maps"] == {}
    assert "pruned forward" not in repro.render(older)


def check_budgets(out, results, scale):
    """The budget sweep of a finished smoke run: what each stage trained and logged, the choice,
    the chosen run's checkpoint as the variant's explanation run, and the report's tables."""
    stages, summary = results["stages"], repro.summarize(results)
    for variant in ("ice", "ice-f", "icev2-style"):
        sweep = [stages[f"budget-{variant}-e{e}"] for e in (1, 2, 4)]
        # the first two budgets always train (a choice needs two); one update per epoch (16 / 16)
        for r in sweep:
            if "skipped" in r:
                continue
            assert r["updates"] == r["epochs"] == r["train"]["num_updates"]
            assert [c["epoch"] for c in r["curve"]] == list(range(r["epochs"]))
            assert [c["updates"] for c in r["curve"]] == list(range(1, r["epochs"] + 1))
            assert r["map_val"] == r["curve"][-1] and r["map_val"]["images"] == 4
            args = torch.load(os.path.join(out, "work", f"budget-{variant}-e{r['epochs']}",
                                           "last.pth"), map_location="cpu",
                              weights_only=False)["args"]
            assert args["map_val_images"] == 4 and args["epochs"] == r["epochs"]
        # the rule, computed by hand from the validation figures
        expected = 4
        for shorter, longer in zip(sweep, sweep[1:]):
            if "skipped" in longer:
                break
            if (longer["map_val"]["miou"] - shorter["map_val"]["miou"] < 1
                    and abs(longer["map_val"]["fg_share"] - shorter["map_val"]["fg_share"]) < 1):
                expected = shorter["epochs"]
                break
        chosen = stages[f"explain-{variant}"]["budget"]
        assert chosen["epochs"] == expected == summary["budgets"][variant]["chosen"]["epochs"]
        # a budget past the choice's next one is skipped, the others trained
        assert [("skipped" in r) for r in sweep] == [
            chosen["flattened"] and r["epochs"] > chosen["next_epochs"] for r in sweep]
        # the explanation run is the chosen budget's training, byte for byte
        source = os.path.join(out, "work", f"budget-{variant}-e{expected}", "last.pth")
        with open(source, "rb") as a, open(os.path.join(out, "work", f"explain-{variant}",
                                                        "last.pth"), "rb") as b:
            assert a.read() == b.read()
    # PM-style and the class-count rule's main-budget row train as long as the main ICE run
    main = stages["explain-ice"]["budget"]["epochs"]
    stage = "classes-3-lambda-auto-main"
    assert stages[stage]["budget"]["epochs"] == main == stages[stage]["train"]["num_updates"]
    assert stages["explain-pm-style"]["budget"]["epochs"] == 1
    assert stages["classes-3-lambda-auto"]["budget"]["epochs"] == 1
    # Table 6's ICE row is the sweep's first ICE run (the ablation's budget), evaluated
    assert stages["explain-ice-ablation"]["budget"]["source"] == "budget-ice-e1"
    assert summary["maps"]["ice-ablation"]["miou"] == stages["explain-ice-ablation"]["maps"]["miou"]
    # the pruning curve: the main runs (1 epoch) and the curve's (2 epochs), one seed
    curve = summary["prune_curve"]["0.5"]
    assert list(curve) == ["1", "2"]
    for epochs, suffix in (("1", ""), ("2", "-e2")):
        for method in ("evit", "ice"):
            assert curve[epochs][method]["top1_runs"] == [
                stages[f"prune-{method}-0.5-s0{suffix}"]["top1"]]
            assert curve[epochs][method]["updates"] == int(epochs)
    # the main pruning table holds the main budget's runs only
    assert summary["prune"]["ice-0.5"]["top1_runs"] == [stages["prune-ice-0.5-s0"]["top1"]]
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "## Training budgets" in report and "## Pruning budget" in report
    r = stages["budget-ice-e2"]
    assert (f"| ice | 2 | 2 | {r['map_val']['miou']:.2f} | "
            f"{r['map_val']['miou'] - stages['budget-ice-e1']['map_val']['miou']:+.2f} |") in report
    ice, evit = curve["2"]["ice"]["top1_mean"], curve["2"]["evit"]["top1_mean"]
    assert f"| 0.5 | 2 | 2 | {evit:.2f} | 0.00 | {ice:.2f} | 0.00 | {ice - evit:+.2f} |" in report


def test_choose_budget_by_hand():
    """The first budget whose next doubling gains under 1 mIoU point and moves the foreground
    share under 1 point; the largest when the curve never flattens; skipped budgets ignored."""
    def run(epochs, miou, fg):
        return {"epochs": epochs, "updates": 62 * epochs, "map_val": {"miou": miou, "fg_share": fg}}

    curve = [run(2, 55.0, 4.0), run(4, 60.0, 6.0), run(8, 60.5, 7.5), run(16, 60.9, 7.9)]
    # 4 -> 8 gains 0.5 mIoU but moves the share 1.5: not flat; 8 -> 16: +0.4, +0.4: flat
    chosen = repro.summary.choose_budget(curve, 1.0)
    assert (chosen["epochs"], chosen["updates"], chosen["flattened"]) == (8, 496, True)
    assert chosen["next_epochs"] == 16
    assert chosen["next_gain_miou"] == pytest.approx(0.4)
    assert chosen["next_move_fg_share"] == pytest.approx(0.4)
    # a loss counts as flat (the shorter one is kept); a wider tolerance chooses earlier
    assert repro.summary.choose_budget([run(2, 55.0, 4.0), run(4, 53.0, 4.5)], 1.0)["epochs"] == 2
    assert repro.summary.choose_budget(curve, 6.0)["epochs"] == 2
    never = repro.summary.choose_budget(curve[:3], 1.0)
    assert (never["epochs"], never["flattened"]) == (8, False)
    skipped = curve[:2] + [{"epochs": 8, "skipped": "chosen before"}]
    assert repro.summary.choose_budget(skipped, 1.0)["epochs"] == 4
    assert repro.summary.choose_budget([], 1.0)["epochs"] is None


def test_plan_runs_every_stage_after_what_it_reads():
    """At the cpu scale: each stage's ``after`` precedes it, the budget chains run in order, the
    speed stage runs alone after every main pruning run, the adaptive stage alone after the first
    keep rate's pruning runs, and ``until`` takes what a stage reads."""
    scale = repro.cpu_scale()
    stages = repro.plan(scale)
    seen = set()
    for stage in stages:
        assert set(stage.after) <= seen, stage.name
        seen.add(stage.name)
    by_name = {s.name: s for s in stages}
    assert by_name["budget-ice-e8"].after == ("pretrain", "budget-ice-e4")
    assert by_name["explain-ice"].after == tuple(f"budget-ice-e{e}" for e in (2, 4, 8, 16, 32))
    assert by_name["explain-pm-style"].after == ("pretrain",)
    assert by_name["explain-pm-style-pseudo"].after == ("pretrain", "explain-ice")
    # the long class-count runs at the main budget start as soon as ICE's budget is chosen
    names = [s.name for s in stages]
    assert by_name["classes-5-lambda-auto-main"].after == ("pretrain", "explain-ice")
    assert names.index("classes-20-lambda-auto-main") < names.index("explain-ice-lambda0.5")
    speed = by_name["speed"]
    # the stages that time models run alone
    assert speed.exclusive and [s.name for s in stages if s.exclusive] == ["speed", "adaptive"]
    assert by_name["adaptive"].after == ("prune-ice-0.7-s0", "prune-evit-0.7-s0")
    assert stages[-1].name == "adaptive"
    assert set(speed.after) == {f"prune-{m}-{r:g}-s{seed}" for seed in (0, 1)
                                for m, r in [("none", 1.0), ("evit", 0.7), ("ice", 0.7),
                                             ("evit", 0.5), ("ice", 0.5)]}
    curve = [s.name for s in stages if s.kind == "prune-curve"]
    assert curve == [f"prune-{m}-0.7-s{seed}-e{e}" for e in (2, 4) for seed in (0, 1)
                     for m in ("evit", "ice")]
    needed = [s.name for s in repro.runner._needed(stages, "explain-pm-style-pseudo")]
    assert needed == ["pretrain"] + [f"budget-ice-e{e}" for e in (2, 4, 8, 16, 32)] + [
        "explain-ice", "explain-pm-style-pseudo"]
    with pytest.raises(ValueError, match="must start at explain.epochs"):
        repro.plan(repro.cpu_scale(explain_budgets=(4, 8)))


def test_pipeline_stage_interrupted_resumes_from_its_checkpoint(tmp_path):
    """A training stage killed after its checkpoint (no done.json) continues with --resume."""
    scale = tiny_scale()
    context = repro.Context(scale, str(tmp_path))
    stage = repro.plan(scale)[0]
    folder = context.folder(stage.name)
    os.makedirs(folder)
    first = stage.fn(context, folder)
    assert first["train"]["epoch"] == 0
    # run the stage again without done.json: the script is called with --resume (an --overwrite
    # would start a fresh log); the finished run is not retrained, the log keeps one epoch record
    again = stage.fn(context, folder)
    assert again["train"] == first["train"]
    with open(os.path.join(folder, "log.jsonl")) as f:
        assert sum("train" in json.loads(line) for line in f) == 1


def test_gpu_scale_builds_the_paper_command_lines(tmp_path):
    scale = repro.gpu_scale(data="/data/imagenet", seg_data="/data/gtsegs_ijcv.mat",
                            checkpoint="/ckpt/deit_small_patch16_224-cd65a155.pth")
    names = [s.name for s in repro.plan(scale)]
    assert "pretrain" not in names  # starts from the DeiT-S checkpoint
    assert {"prune-ice-0.7-s1", "prune-evit-0.5-s0", "explain-ice-f", "maps-baselines"} <= set(names)
    # ImageNet has no masks in this pipeline: PM-style on ICE pseudo masks and the control only
    assert {"explain-pm-style-pseudo", "explain-pm-style-no-masks"} <= set(names)
    assert "explain-pm-style" not in names
    context = repro.Context(scale, str(tmp_path))
    assert context.pretrained == "/ckpt/deit_small_patch16_224-cd65a155.pth"

    args = prune.parse_args(["--method", "ice", "--keep-rate", "0.7"]
                            + repro.train_argv(scale, scale.prune, seed=1)
                            + ["--output", str(tmp_path)])
    assert (args.model, args.img_size, args.data) == ("deit_small_patch16_224", 224,
                                                      "imagefolder:/data/imagenet")
    assert (args.epochs, args.lr, args.min_lr, args.batch_size, args.seed) == (30, 2e-5, 2e-6, 128, 1)
    assert (args.mixup, args.cutmix) == (0.8, 1.0)  # the DeiT augmentations stay on
    args = explain.parse_args(["--variant", "ice"] + repro.train_argv(scale, scale.explain)
                              + ["--output", str(tmp_path)])
    assert (args.epochs, args.lr, args.batch_size) == (3, 1e-5, 256)
    args = pm.parse_args(repro.train_argv(scale, scale.explain) + ["--output", str(tmp_path)])
    # the explanation budget; mixup and cutmix off (they would mix images but not masks)
    assert (args.epochs, args.lr, args.mixup, args.cutmix) == (3, 1e-5, 0.0, 0.0)
    args = evaluate.parser().parse_args(repro.eval_argv(scale, "explain", "c.pth", "o"))
    assert args.data == "imagenet-seg:/data/gtsegs_ijcv.mat" and args.limit is None
    args = evaluate.parser().parse_args(repro.eval_argv(scale, "accuracy", "c.pth", "o"))
    assert args.data == "folder:/data/imagenet/val"

    with pytest.raises(ValueError, match="no stage of this scale"):
        repro.run(scale, str(tmp_path), until="pretrain")
    with pytest.raises(ValueError, match="--seg-data, --checkpoint"):
        repro.gpu_scale(data="/data/imagenet")


def test_script_refuses_gpu_flags_at_cpu_scale():
    with pytest.raises(ValueError, match="--data apply to --scale gpu only"):
        reproduce.build_scale(reproduce.parse_args(["--scale", "cpu", "--data", "/x"]))
    with pytest.raises(ValueError, match="--scale gpu needs --data"):
        reproduce.build_scale(reproduce.parse_args(["--scale", "gpu"]))


def test_gpu_synthetic_scale_plans_the_cpu_pipeline_with_gpu_budgets(tmp_path):
    scale = repro.SCALES["gpu-synthetic"]()
    cpu = repro.cpu_scale()
    names = [s.name for s in repro.plan(scale)]
    assert names[0] == "pretrain" and "classes-40-lambda-auto" in names and "speed" in names
    # the budget sweep from the explanation recipe's 4 epochs, the pruning curve from its 3
    assert [n for n in names if n.startswith("budget-ice-e")] == [
        f"budget-ice-e{e}" for e in (4, 8, 16, 32)]
    assert "prune-ice-0.7-s1-e12" in names and scale.jobs == 1
    assert (scale.model, scale.model_kwargs, scale.synthetic_kwargs) == (
        cpu.model, cpu.model_kwargs, cpu.synthetic_kwargs)
    assert scale.bench_compile and scale.bench_dtype == "bf16" and scale.device == "cuda"
    args = prune.parse_args(["--method", "evit", "--keep-rate", "1.0"]
                            + repro.train_argv(scale, scale.pretrain) + ["--output", str(tmp_path)])
    assert (args.epochs, args.batch_size, args.synthetic_train, args.device) == (30, 64, 16000, "cuda")
    args = explain.parse_args(["--variant", "ice"] + repro.train_argv(scale, scale.explain,
                                                                      num_classes=40)
                              + ["--output", str(tmp_path)])
    assert (args.epochs, args.synthetic_train, args.num_classes) == (4, 4000, 40)


def check_adaptive(out, results, scale):
    """The per-image token counts stage of a finished smoke run against what is computed here
    apart from it: the calibration images rebuilt from their description (SyntheticScenes'
    training split, the pruning run's seed, the adaptive object scale) and each policy calibrated
    on them again, the same checkpoints (the first keep rate's, first seed) on the same evaluation
    images, each variant's top-1, mean tokens per point and GMACs; keep rate 1 is the unpatched
    forward of the same weights; the bookkeeping variant keeps fixed keep 0.5's counts in every
    image; the report's section shows the stage's numbers, the bookkeeping row apart."""
    from ice_prune import KeepPolicy
    from ice_prune.data import SyntheticScenes
    done = results["stages"]["adaptive"]
    assert (done["source_keep_rate"], done["seed"], done["images"]) == (0.5, 0, 4)
    scenes = SyntheticScenes(num_classes=4, img_size=32, length=4, split="val", seed=0,
                             scale=(0.1, 0.6))
    images = torch.stack([scenes[i][0] for i in range(4)])
    labels = torch.tensor([scenes[i][1] for i in range(4)])
    rates = (0.9, 0.7, 0.5, 0.3)
    assert done["calibration"] == {"images": 400, "split": "train", "seed": 0,
                                   "object_scale": [0.1, 0.6], "iterations": 16,
                                   "precision": 2.0 ** -16, "rates": list(rates)}
    train = SyntheticScenes(num_classes=4, img_size=32, length=400, split="train", seed=0,
                            scale=(0.1, 0.6))
    calibration = torch.stack([train[i][0] for i in range(400)])
    kwargs = dict(img_size=32, **scale.model_kwargs)

    def checkpoint(method):
        return os.path.join(out, "work", f"prune-{method}-0.5-s0", "last.pth")

    # name -> (method, fixed keep rate or None, policy or None, calibrated to)
    expected = {f"{m}@{r:g}": (m, r, None, None) for m in ("ice", "evit")
                for r in (1.0, 0.9, 0.7, 0.5, 0.3)}
    calibrated = {}
    for method, rule in (("ice", "threshold"), ("evit", "mass")):
        model = repro_load(scale, checkpoint(method), method, 0.5, None, **kwargs)
        for r in rates:
            policy = ice_prune.calibrate_keep_policy(model, calibration, r, min_share=0.1,
                                                     max_share=1.0, iterations=16)
            name = f"{method}@{rule}={getattr(policy, rule):.4g}"
            name += f" (to {r:g})" if name in expected else ""
            expected[name] = (method, None, policy, r)
            calibrated.setdefault(rule, []).append(getattr(policy, rule))
    expected["ice@share=0.5"] = ("ice", None, KeepPolicy(threshold=0.5, min_share=0.5,
                                                         max_share=0.5), None)
    # the schedule: fixed-keep ICE at the ICE policy's (calibrated to 0.5) mean counts, rounded
    ice_05 = next(n for n, (m, _, p, to) in expected.items() if m == "ice" and to == 0.5)
    scheduled = [max(1, round(k)) for k in done["variants"][ice_05]["tokens_per_point"]]
    schedule_name = f"ice@counts={'/'.join(map(str, scheduled))}"
    assert sorted(done["variants"]) == sorted([*expected, schedule_name])
    assert (done["thresholds"], done["masses"]) == (calibrated["threshold"], calibrated["mass"])
    schedule = done["variants"][schedule_name]
    assert (schedule["method"], schedule["kind"], schedule["counts"]) == ("ice", "schedule",
                                                                          scheduled)
    n = 16  # each point keeps ceil(rate * n) of the n tokens there, and fuses the rest into one
    for k, rate in zip(scheduled, schedule["keep_rates"]):
        assert math.ceil(rate * n) == k
        n = k + 1 if k < n else n
    model = repro_load(scale, checkpoint("ice"), "ice", tuple(schedule["keep_rates"]), None,
                       **kwargs)
    with torch.no_grad():
        top1 = 100 * (model(images).argmax(-1) == labels).float().mean()
    assert schedule["top1"] == pytest.approx(top1)
    assert schedule["gmacs"] == pytest.approx(ice_prune.count_flops(model, (3, 32, 32)) / 1e9,
                                              rel=1e-12)
    for name, row in done["variants"].items():
        if name == schedule_name:
            continue
        method, keep_rate, policy, calibrated_to = expected[name]
        kind = ("fixed" if policy is None else "bookkeeping" if name == "ice@share=0.5"
                else "adaptive")
        assert (row["method"], row["kind"], row["keep_rate"], row["calibrated_to"]) == (
            method, kind, keep_rate, calibrated_to)
        model = repro_load(scale, checkpoint(method), method, keep_rate or 0.5, policy, **kwargs)
        assert row["policy"] == (None if policy is None else dataclasses.asdict(policy))
        with torch.no_grad():
            logits = model(images)
        assert row["top1"] == pytest.approx(100 * (logits.argmax(-1) == labels).float().mean())
        if policy is not None:
            counts = torch.stack(model.ice_keep_counts, dim=1).double()
            assert row["tokens_per_point"] == pytest.approx(counts.mean(dim=0).tolist())
            assert row["gmacs"] == pytest.approx(
                ice_prune.count_flops(model, images=images) / 4 / 1e9, rel=1e-12)
        else:
            assert row["gmacs"] == pytest.approx(
                ice_prune.count_flops(model, (3, 32, 32)) / 1e9, rel=1e-12)
        if kind == "bookkeeping":  # fixed keep 0.5 of 16 patches: 8, then 5 of 9, 3 of 6
            assert counts.tolist() == [[8, 5, 3]] * 4 and row["tokens_per_point"] == [8, 5, 3]
            assert row["gmacs"] == pytest.approx(done["variants"]["ice@0.5"]["gmacs"], rel=1e-12)
        assert row["img_s_median"] > 0
    # keep rate 1 runs the checkpoint's backbone as it is
    for method in ("ice", "evit"):
        plain = repro_load(scale, checkpoint(method), None, 1.0, None, **kwargs)
        with torch.no_grad():
            top1 = 100 * (plain(images).argmax(-1) == labels).float().mean()
        assert done["variants"][f"{method}@1"]["top1"] == pytest.approx(top1)
    summary = repro.summarize(results)["adaptive"]
    assert [len(summary["curves"][c]) for c in ("fixed-ice", "adaptive-ice", "fixed-evit",
                                                "adaptive-evit")] == [5, 4, 5, 4]
    assert all(r["name"] != "ice@share=0.5" for rows in summary["curves"].values() for r in rows)
    for method in ("ice", "evit"):
        assert summary["matched"][method]["adaptive"]["calibrated_to"] == 0.5
        assert summary["matched"][method]["fixed"]["name"] == f"{method}@0.5"
    book = summary["bookkeeping"]
    assert book["name"] == "ice@share=0.5" and book["fixed"]["name"] == "ice@0.5"
    speeds = {name: row["img_s_median"] for name, row in done["variants"].items()}
    assert book["img_s_ratio"] == pytest.approx(speeds["ice@share=0.5"] / speeds["ice@0.5"])
    assert summary["schedule"]["name"] == schedule_name
    assert summary["schedule"]["img_s_ratio"] == pytest.approx(speeds[schedule_name]
                                                               / speeds["ice@0.5"])
    assert summary["schedule"]["adaptive_over_schedule"] == pytest.approx(
        speeds[ice_05] / speeds[schedule_name])
    assert all(r["name"] != schedule_name for rows in summary["curves"].values() for r in rows)
    # the speed goal's four variants timed again alone, longer
    focus = done["focus"]
    assert focus["variants"] == ["ice@0.5", ice_05, schedule_name, "ice@share=0.5"]
    assert focus["reps"] == 4 * scale.bench_reps
    assert focus["benchmark"]["baseline"] == "ice@0.5"
    fast = focus["img_s_median"]
    assert all(fast[name] > 0 for name in focus["variants"])
    assert summary["focus"]["ratio"][ice_05] == pytest.approx(fast[ice_05] / fast["ice@0.5"])
    assert summary["focus"]["adaptive_over_schedule"] == pytest.approx(
        fast[ice_05] / fast[schedule_name])
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "## Per-image token counts" in report and "![per-image token counts]" in report
    row = done["variants"][ice_05]
    assert (f"| adaptive ICE | threshold {row['policy']['threshold']:.4g} (calibrated to keep "
            f"0.5), shares 0.1-1 | {' / '.join(f'{k:.1f}' for k in row['tokens_per_point'])} | "
            f"{row['gmacs']:.4f} | {row['img_s_median']:.0f} | {row['top1']:.2f} |") in report
    row = done["variants"]["ice@share=0.5"]
    assert (f"| packed ICE at fixed counts | threshold 0.5, shares 0.5-0.5 | 8.0 / 5.0 / 3.0 | "
            f"{row['gmacs']:.4f} | {row['img_s_median']:.0f} | {row['top1']:.2f} |") in report
    assert f"Thresholds: {', '.join(f'{t:.4g}' for t in calibrated['threshold'])};" in report
    assert "400 SyntheticScenes training images (the split and seed 0" in report
    assert (f"| fixed-keep ICE at adaptive ICE's mean counts | keep rates "
            f"{' / '.join(f'{r:.4g}' for r in schedule['keep_rates'])} | "
            f"{' / '.join(f'{k:.1f}' for k in scheduled)} | {schedule['gmacs']:.4f} | "
            f"{schedule['img_s_median']:.0f} | {schedule['top1']:.2f} |") in report
    ratio = summary["focus"]["ratio"]
    assert (f"- The speed goal's variants again, alone ({4 * scale.bench_reps} repetitions, one "
            f"interleaved run): ice@0.5 {fast['ice@0.5']:.0f} img/s; {ice_05} {fast[ice_05]:.0f} "
            f"img/s ({ratio[ice_05]:.3f}); {schedule_name} {fast[schedule_name]:.0f} img/s "
            f"({ratio[schedule_name]:.3f}); ice@share=0.5 {fast['ice@share=0.5']:.0f} img/s "
            f"({ratio['ice@share=0.5']:.3f}).") in report
    assert ("Adaptive ICE at fixed keep 0.5's GMACs runs at least 0.95 of fixed keep 0.5's img/s: "
            f"**{'yes' if ratio[ice_05] >= 0.95 else 'no'}**") in report
    assert ("The packed bookkeeping at fixed keep 0.5's counts (ice@share=0.5: every image keeps "
            "fixed keep 0.5's tokens, run packed) runs at least 0.95 of fixed keep 0.5's img/s: "
            f"**{'yes' if ratio['ice@share=0.5'] >= 0.95 else 'no'}**") in report
    # a run without the stage reports without it; a stage result from before the calibration is
    # refused, naming the fix
    older = {**results, "stages": {k: v for k, v in results["stages"].items() if k != "adaptive"}}
    older["summary"] = repro.summarize(older)
    assert older["summary"]["adaptive"] == {}
    assert "Per-image token counts" not in repro.render(older)
    stale = {k: v for k, v in done.items() if k != "calibration"}
    with pytest.raises(ValueError, match="delete OUT/work/adaptive"):
        repro.summarize({**results, "stages": {**results["stages"], "adaptive": stale}})


def repro_load(scale, checkpoint, method, keep_rate, policy, **kwargs):
    return ice_prune.load_model(scale.model, checkpoint, method=method, keep_rate=keep_rate,
                                patch_kwargs={} if method is None else {"keep_policy": policy},
                                **kwargs)


START_METHOD = "__import__('multiprocessing').get_start_method()"


def test_parallel_stage_forks_its_data_loader_workers(tmp_path):
    """A stage of a parallel run lives in a spawned process, whose default start method is 'spawn':
    every data loader worker would import torch afresh (3-4 s a loader, three loaders an epoch).
    After ``run_stage`` the process forks them, as a standalone training script does."""
    import concurrent.futures
    import multiprocessing

    work = str(tmp_path / "work")
    os.makedirs(os.path.join(work, "pretrain"))
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        # the worker inherits its parent's start method (reproduce.py's: spawn; pytest's: fork);
        # the child's own multiprocessing module is asked through eval (a bound method of it would
        # be pickled with a copy of the parent's context)
        pool.submit(eval, "__import__('multiprocessing').set_start_method('spawn', force=True)"
                    ).result()
        assert pool.submit(eval, START_METHOD).result() == "spawn"
        pool.submit(repro.runner.run_stage, tiny_scale(), work, "pretrain",
                    os.path.join(work, "pretrain", "stage.log")).result()
        assert pool.submit(eval, START_METHOD).result() == "fork"
    assert os.path.exists(os.path.join(work, "pretrain", "done.json"))


def test_schedule_rates_keep_the_counts_asked_for():
    """Under EViT's rule (keep ceil(rate * n) of the n tokens at a point, fuse the rest into one),
    the rates give the counts asked for; a point that keeps all its tokens keeps rate 1 and adds no
    fused token; counts outside [1, n] are refused."""
    from repro.adaptive import schedule_rates

    rates = schedule_rates(64, [44, 10, 4])
    assert rates == ((44 - 0.5) / 64, (10 - 0.5) / 45, (4 - 0.5) / 11)
    assert [math.ceil(r * n) for r, n in zip(rates, (64, 45, 11))] == [44, 10, 4]
    assert schedule_rates(16, [16, 9]) == (1.0, 8.5 / 16)
    with pytest.raises(ValueError, match="between 1 and its 45 tokens"):
        schedule_rates(64, [44, 46])
