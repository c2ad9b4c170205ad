"""The report's figures: ours on the left, the paper's Table 5 on the right (DeiT-S on ImageNet)."""
from __future__ import annotations

from ice_prune.evaluation.paper import TABLE5, TABLE5_KEEP_RATES

LABEL = {"evit": "EViT", "ice": "ICE"}
COLOR = {"none": "black", "evit": "tab:blue", "ice": "tab:red"}


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, chosen when a figure is drawn, not on import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(summary: dict, scale: dict, path: str) -> None:
    """Top-1 against keep rate (ours with the seed range, the paper's beside)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    rates = [1.0] + list(scale["keep_rates"])
    prune = summary["prune"]
    for method in ("evit", "ice"):
        keys = ["none-1"] + [f"{method}-{r:g}" for r in scale["keep_rates"]]
        mean = [prune[k]["top1_mean"] for k in keys]
        below = [prune[k]["top1_mean"] - min(prune[k]["top1_runs"]) for k in keys]
        above = [max(prune[k]["top1_runs"]) - prune[k]["top1_mean"] for k in keys]
        axes[0].errorbar(rates, mean, yerr=[below, above], marker="o", capsize=3,
                         color=COLOR[method], label=LABEL[method])
        published = [TABLE5["none-1.0"].top1] + [TABLE5[f"{method}-{r:g}"].top1
                                                 for r in TABLE5_KEEP_RATES]
        axes[1].plot([1.0, *TABLE5_KEEP_RATES], published, marker="s", color=COLOR[method], linestyle="--",
                     label=LABEL[method] + " (paper)")
    axes[0].set_title(f"ours: {scale['model']} ({scale['name']} scale), min-max over seeds",
                      fontsize=8)
    axes[1].set_title("paper's Table 5: DeiT-S on ImageNet", fontsize=8)
    for ax in axes:
        ax.set_xlabel("keep rate (1.0 = unpruned)")
        ax.set_ylabel("top-1 (%)")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_speed(summary: dict, path: str) -> None:
    """Speed-up over the unpruned model against GMACs (ours measured, the paper's beside)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, result in summary["prune"].items():
        color = COLOR[key.split("-")[0]]
        axes[0].scatter(result["gmacs"], result["speedup"], color=color)
        axes[0].annotate(key, (result["gmacs"], result["speedup"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    for key, published in TABLE5.items():
        color = COLOR[key.split("-")[0]]
        speedup = published.img_per_s / TABLE5["none-1.0"].img_per_s
        axes[1].scatter(published.gmacs, speedup, color=color, marker="s")
        axes[1].annotate(key, (published.gmacs, speedup), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    axes[0].set_title("ours: measured in one interleaved run", fontsize=8)
    axes[1].set_title("paper's Table 5 (RTX 3090); GMACs from EViT's README", fontsize=8)
    for ax in axes:
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("speed-up over unpruned")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_class_counts(summary: dict, path: str) -> None:
    """ICE's mIoU against lambda, one line per class count, the class-count rule starred and the
    paper's literal 0.975 ringed; generic attention on the same scenes as a dotted line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (num_classes, study) in enumerate(summary["classes"].items()):
        color = colors[i % len(colors)]
        runs = study["runs"]
        ax.plot([r["lambda_class"] for r in runs], [r["miou"] for r in runs], marker="o",
                color=color, label=f"{num_classes} classes")
        rule, literal = study["rule"], study["literal"]
        ax.scatter([rule["lambda_class"]], [rule["miou"]], marker="*", s=220, color=color,
                   edgecolor="black", zorder=3)
        ax.scatter([literal["lambda_class"]], [literal["miou"]], marker="o", s=120,
                   facecolor="none", edgecolor=color, linewidth=2, zorder=3)
        ax.axhline(study["generic"]["miou"], color=color, linestyle=":", linewidth=1)
    ax.scatter([], [], marker="*", s=120, color="gray", edgecolor="black", label="class-count rule")
    ax.scatter([], [], marker="o", s=80, facecolor="none", edgecolor="gray", label="paper's 0.975")
    ax.plot([], [], color="gray", linestyle=":", label="generic attention")
    ax.set_xlabel("lambda (class weight of the ICE loss)")
    ax.set_ylabel("ICE mIoU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_budget_curve(summary: dict, path: str) -> None:
    """The explanation budget sweep: validation mIoU and foreground share against updates, one line
    per variant through the end of each budget's run (the chosen one ringed), and the longest run's
    per-epoch curve dotted."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = {"ice": "tab:red", "ice-f": "tab:orange", "icev2-style": "tab:purple"}
    for variant, sweep in summary["budgets"].items():
        runs = [r for r in sweep["runs"] if "skipped" not in r]
        color = colors.get(variant, "black")
        for ax, key in zip(axes, ("miou", "fg_share")):
            ax.plot([r["updates"] for r in runs], [r[key] for r in runs], marker="o", color=color,
                    label=variant)
            longest = runs[-1]["curve"]
            ax.plot([c["updates"] for c in longest], [c[key] for c in longest], linestyle=":",
                    color=color, linewidth=1)
            chosen = next(r for r in runs if r["epochs"] == sweep["chosen"]["epochs"])
            ax.scatter([chosen["updates"]], [chosen[key]], s=120, facecolors="none",
                       edgecolors=color, linewidths=1.5)
    axes[0].set_ylabel("mIoU on the mapval split")
    axes[1].set_ylabel("foreground share (% of patches)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("updates (dotted: per epoch of the longest run)")
        ax.legend(fontsize=8)
    fig.suptitle("explanation budget: each point a run of its own; ringed: chosen", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_prune_curve(summary: dict, path: str) -> None:
    """Top-1 against the pruning runs' updates, ICE and EViT per keep rate, min-max over seeds."""
    plt = _pyplot()
    curve = summary["prune_curve"]
    fig, axes = plt.subplots(1, len(curve), figsize=(4.5 * len(curve), 3.6), squeeze=False)
    for ax, (rate, by_epochs) in zip(axes[0], curve.items()):
        for method in ("evit", "ice"):
            points = [m[method] for m in by_epochs.values() if method in m]
            ax.errorbar([p["updates"] for p in points], [p["top1_mean"] for p in points],
                        yerr=[[p["top1_mean"] - min(p["top1_runs"]) for p in points],
                              [max(p["top1_runs"]) - p["top1_mean"] for p in points]],
                        marker="o", capsize=3, color=COLOR[method], label=LABEL[method])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("updates")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"keep rate {rate}, min-max over seeds", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_adaptive(summary: dict, path: str) -> None:
    """Per-image token counts: top-1 against mean GMACs per image and against img/s, fixed-keep ICE
    and EViT (solid) beside adaptive ICE and EViT (dashed), from the adaptive stage."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    styles = {"fixed-ice": ("ice", "-", "o"), "adaptive-ice": ("ice", "--", "s"),
              "fixed-evit": ("evit", "-", "o"), "adaptive-evit": ("evit", "--", "s")}
    for curve, rows in summary["adaptive"]["curves"].items():
        method, line, marker = styles[curve]
        label = f"{'fixed keep' if curve.startswith('fixed') else 'adaptive'} {LABEL[method]}"
        for ax, key in zip(axes, ("gmacs", "img_s_median")):
            ordered = sorted(rows, key=lambda r: r[key])
            ax.plot([r[key] for r in ordered], [r["top1"] for r in ordered], line, marker=marker,
                    color=COLOR[method], label=label)
    axes[0].set_xlabel("GMACs per image (mean over the images)")
    axes[1].set_xlabel("img/s (one interleaved run)")
    for ax in axes:
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize=7)
    fig.suptitle("per-image token counts against fixed keep rates, the same checkpoints", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
