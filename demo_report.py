"""The demo's reports: the paper's tables in miniature (`make demo`), its ablation and scaling (`make demo-ablation`).

Not a paper stage: it only reads the manifest.json every stage writes last, so a stage that has not run is skipped.

    python demo_report.py report --config configs/demo.yaml            # -> runs/demo/{report.md,summary.json,
                                                                      #    real_vs_synthetic.png}
    python demo_report.py ablation-report --config configs/demo.yaml   # -> runs/demo/ablation/{report.md,
                                                                      #    ablation.json,scaling.png}

* report: every stage's manifest under runs/demo/ (data, generator, captions*, finetune, synth_x*, gap_*, cls_*,
  ood*, mia*, sscd*) -> summary.json (headline figures, per-stage metrics and elapsed time), report.md with the
  Tab. 1 / Tab. 4 / privacy analogues (one seed per figure), and real_vs_synthetic.png (real train images beside the
  synthetic images made from them).
* ablation-report: the classifiers `make demo-ablation` trained under runs/demo/ablation/ (cls_<row>_s<seed>) -> the
  Tab. 2 analogue (latent prior / visual guidance / MMD on and off) and the Fig. 2 analogue (synthetic-only top-1 at
  x1, x2, x4 against the real line) as mean ± spread over seeds, every difference smaller than the seed spread marked
  as not resolved, plus scaling.png.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import spearmanr

import common

# ----------------------------------------------------------------------------------------------------------------------
# The report command: collect every stage's manifest under runs/demo/ (stages that have not run are skipped).

# (stage, folder pattern under the runs dir), in pipeline order.
REPORT_STAGES = (
    ("data", "data"),
    ("generator", "generator"),
    ("caption", "captions*"),
    ("finetune", "finetune*"),
    ("synthesize", "synth_x*"),
    ("train_cls", "cls_*"),
    ("eval_ood", "ood*"),
    ("eval_gap", "gap_*"),
    ("mia_lira", "mia*"),
    ("sscd_sim", "sscd*"),
)


def flatten(metrics: dict, prefix: str = "") -> dict:
    """Nested metrics -> {"a.b": scalar}; lists and other non-scalars are left out of tables."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def stage_elapsed(folder: Path, manifest: dict) -> float | None:
    """Elapsed seconds: the stage's own figure if it records one, else manifest time minus start time."""
    for source in (manifest.get("metrics", {}), manifest):
        for key in ("elapsed_s", "wall_time_s", "time_s"):
            if isinstance(source.get(key), (int, float)):
                return float(source[key])
    started = folder / "run_config.json"
    return round((folder / "manifest.json").stat().st_mtime - started.stat().st_mtime, 1) if started.is_file() else None


def collect_runs(runs: Path, generator_dir: Path | None = None) -> tuple[dict, list[str]]:
    """Every stage's manifest metrics under `runs`; the generator's from `generator_dir` (the shipped one) when the
    runs folder has none of its own, marked `shipped` (built once, not by this chain: its time is not the chain's).
    Keyed by folder name, the generator always as "generator"."""
    found, missing = {}, []
    for stage, pattern in REPORT_STAGES:
        folders = sorted(p for p in runs.glob(pattern) if (p / "manifest.json").is_file() and ".old-" not in p.name)
        shipped = stage == "generator" and not folders and generator_dir and (generator_dir / "manifest.json").is_file()
        if shipped:
            folders = [generator_dir]
        if not folders:
            missing.append(stage)
        for folder in folders:
            manifest = common.read_json(folder / "manifest.json")
            found["generator" if stage == "generator" else folder.name] = {
                "stage": stage,
                "metrics": flatten(manifest.get("metrics", {})),
                "elapsed_s": stage_elapsed(folder, manifest),
                "shipped": bool(shipped),
            }
    return found, missing


def real_vs_synthetic_grid(data_root: Path, synth_dir: Path, per_class: int = 4) -> Image.Image:
    """Per class: `per_class` real train images, then the synthetic image made from each (its latent prior), paired
    by the manifest's `source`, so a source left out by --skip-bad shifts nothing and is never read."""
    real, synth = common.load_dataset("demo", data_root, "train"), common.load_synthetic(synth_dir)
    pairs = {}
    for sample, row in zip(synth.samples, common.read_jsonl(Path(synth_dir) / "manifest.jsonl")):
        if row["copy"] == 0:
            pairs.setdefault(sample.label, []).append((real.root / row["source"], synth.root / sample.path))
    rows = []
    for label in range(len(real.classes)):
        chosen = pairs.get(label, [])[:per_class]
        rows.append([common.load_image(r) for r, _ in chosen] + [common.load_image(f) for _, f in chosen])
    return common.image_grid(rows, scale=3)


def headline(stages: dict) -> dict:
    """The figures a reader looks for first: classifier top-1 per training set, OOD top-1, privacy AUC, PSNR."""
    picks = {}
    for name, info in stages.items():
        for key, value in info["metrics"].items():
            last = key.split(".")[-1]
            if info["stage"] == "eval_gap" and last in ("fid", "floor_fid", "precision", "recall", "floor_precision"):
                picks[f"{name}.{key}"] = value
            elif (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and (
                    last
                    in (
                        "top1",
                        "auc",
                        "vae_psnr_db",
                        "denoise_class_acc",
                        "t2i_class_acc",
                        "img2img_class_acc",
                        "synth_over_real",
                        "replication_rate",
                    )
                    or last.endswith("_top1")
                    or last.endswith("_auc")
                )
            ):
                picks[f"{name}.{key}"] = value
    return picks


def _manifest_metrics(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return common.read_json(path)["metrics"] if path.is_file() else None


TRAINING_SETS = (("real", "cls_real"), ("synthetic x1", "cls_synth_x1"), ("real + synthetic x1", "cls_mix_x1"))


def paper_tables(runs: Path) -> tuple[list[str], dict]:
    """The paper's tables in miniature (one seed each): Tab. 1 (test top-1 by training set), Tab. 4 (the shifted
    sets), §4.5 privacy (LiRA AUC per arm, SSCD similarity). Rows whose stage has not run are left out."""
    lines, tables = [], {"seeds_per_figure": 1}
    rows, tested = [], set()
    for name, d in TRAINING_SETS:
        if (runs / d / "manifest.json").is_file():
            cls = common.read_json(runs / d / "manifest.json")
            rows.append((name, cls["metrics"], _manifest_metrics(runs / f"ood_{d}")))
            # The split it was tested on is no shifted set (a user's ImageFolder tests on val/, say).
            tested.add(cls.get("inputs", {}).get("test_split", {}).get("split", "test"))
    held_out = {"test"} | tested
    if rows:
        sets = sorted({k.split("/")[0] for _, _, ood in rows if ood for k in ood} - held_out)
        header = ["training data", "test top-1", "test top-5", *(f"{x} top-1" for x in sets)]
        lines += [
            "## Paper tables in miniature (1 seed per figure)",
            "",
            "Tab. 1"
            + (" / Tab. 4" if sets else "")
            + f" analogue: top-1 (%) on the real held-out split ({', '.join(sorted(tested)) or 'test'})"
            + (" and on the shifted sets." if sets else "."),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for name, cls, ood in rows:
            shifted = [f"{ood[f'{x}/top1']:.1f}" if ood and f"{x}/top1" in ood else "–" for x in sets]
            lines.append("| " + " | ".join([name, f"{cls['top1']:.1f}", f"{cls['top5']:.1f}", *shifted]) + " |")
            tables.setdefault("classifiers", {})[name] = {
                "test_top1": cls["top1"],
                "test_top5": cls["top5"],
                **{f"{x}_top1": (ood or {}).get(f"{x}/top1") for x in sets},
            }
        lines.append("")
    mia = _manifest_metrics(runs / "mia_lira")
    if mia:
        lines += [
            "LiRA membership inference (reduced: see configs/demo.yaml), per arm:",
            "",
            "| arm | attack | AUC | balanced acc. | TPR @ 1% FPR | non-members |",
            "|---|---|---|---|---|---|",
        ]
        for arm, attacks in mia.items():
            for attack, m in attacks.items():
                lines.append(
                    f"| {arm} | {attack} | {m['auc']:.3f} | {m['balanced_accuracy']:.3f} | "
                    f"{m['tpr_at_0.01_fpr']:.3f} | {m['num_nonmembers']} |"
                )
        tables["lira_auc"] = {arm: {a: m["auc"] for a, m in attacks.items()} for arm, attacks in mia.items()}
        lines.append("")
    sscd = _manifest_metrics(runs / "sscd_synth_x1")
    if sscd:
        kind = "STAND-IN descriptor, not SSCD" if sscd["descriptor"].get("standin") else "SSCD"
        lines += [
            f"Copy detection ({kind}): top-1 similarity of each query to the real training set.",
            "",
            "| queries | mean | p95 | replication rate (> threshold) |",
            "|---|---|---|---|",
        ]
        for name in ("synthetic_vs_real", "real_vs_real_background"):
            m = sscd[name]
            lines.append(f"| {name} | {m['mean']:.3f} | {m['p95']:.3f} | {m['replication_rate']:.3f} |")
        tables["copy_detection"] = {n: sscd[n] for n in ("synthetic_vs_real", "real_vs_real_background")}
        lines.append("")
    return lines, tables


def elapsed_cell(stage: dict, unit: str = "") -> str:
    seconds = stage["elapsed_s"] if stage["elapsed_s"] is not None else "?"
    return f"shipped (built once in {seconds} s; not counted)" if stage["shipped"] else f"{seconds}{unit}"


def run_report(args) -> dict:
    runs = common.output_dir(args, "")
    if not runs.is_dir():
        raise FileNotFoundError(f"no runs folder {runs}: run the demo stages first (make demo)")
    generator_dir = Path(args.pretrained_model).parent if args.pretrained_model else None
    stages, missing = collect_runs(runs, generator_dir)
    # A user's ImageFolder has no data stage, and the shipped generator's figures, measured on the demo data, are
    # shown in its own section but not as headline figures of the user's run.
    on_demo = args.dataset == "demo"
    missing = [stage for stage in missing if on_demo or stage != "data"]
    shown_first = {k: v for k, v in stages.items() if on_demo or not v["shipped"]}
    summary = {
        "runs_dir": str(runs),
        "headline": headline(shown_first),
        "stages": stages,
        "missing_stages": missing,
        "total_elapsed_s": round(sum(s["elapsed_s"] or 0 for s in stages.values() if not s["shipped"]), 1),
    }
    table_lines, summary["tables"] = paper_tables(runs)
    uncaptioned = " (no captions: the prompts name the class only, as the paper's do for its fine-grained sets)"
    lines = [
        "# Real-Fake report",
        "",
        f"Runs folder: `{runs}`. Stages without a run here: {', '.join(missing) or 'none'}"
        f"{uncaptioned if 'caption' in missing else ''}.",
        "",
        *table_lines,
        "## Headline",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in summary["headline"].items()]
    lines += ["", "## Time per stage", "", "| folder | stage | elapsed (s) |", "|---|---|---|"]
    lines += [f"| {name} | {s['stage']} | {elapsed_cell(s)} |" for name, s in stages.items()]
    lines += [
        f"| total (each stage from its last start to its manifest; process start-up not counted) | | "
        f"{summary['total_elapsed_s']} |"
    ]
    for name, info in stages.items():
        lines += ["", f"## {name} ({info['stage']})", ""]
        if info["shipped"] and not on_demo:
            lines += [
                "The shipped generator's figures, measured on the demo data when it was built: not this data.",
                "",
            ]
        lines += ["| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in info["metrics"].items()
        ]
    synth_dirs = sorted(p for p in runs.glob("synth_x*") if (p / "manifest.jsonl").is_file() and ".old-" not in p.name)
    data_root = Path(args.data_root)
    if synth_dirs and (data_root / "train").is_dir():
        common.save_image(real_vs_synthetic_grid(data_root, synth_dirs[0]), runs / "real_vs_synthetic.png")
        lines += [
            "",
            "## Real vs synthetic",
            "",
            f"Left: real train images; right: {synth_dirs[0].name} images.",
            "",
            "![real vs synthetic](real_vs_synthetic.png)",
        ]
    shown = runs / "generator" if (runs / "generator" / "manifest.json").is_file() else generator_dir
    for png in ("samples_text2image.png", "samples_img2img.png", "vae_reconstructions.png"):
        if shown and (shown / png).is_file():
            lines += ["", f"![generator {png}]({os.path.relpath(shown / png, runs)})"]
    common.write_json(runs / "summary.json", summary)
    with common.atomic_write(runs / "report.md") as f:
        f.write("\n".join(lines) + "\n")
    for name, s in stages.items():
        print(f"{name:>20s}: {elapsed_cell(s, ' s')}")
    print(f"report: {runs / 'report.md'}; summary: {runs / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# The ablation report (make demo-ablation): paper Tab. 2 and Fig. 2 in miniature, over several classifier seeds.

# Tab. 2 rows: (name, latent prior, visual guidance, MMD, finetuned, classifier folder prefix under runs/demo/ablation).
ABLATION_ROWS = (
    ("none", False, False, False, False, "cls_none"),
    ("latent prior only", True, False, False, False, "cls_lp"),
    ("visual guidance + MMD (no latent prior)", False, True, True, True, "cls_no_lp"),
    ("latent prior + MMD (no visual guidance)", True, False, True, True, "cls_no_vg"),
    ("latent prior + visual guidance (no MMD)", True, True, False, True, "cls_no_mmd"),
    ("all three", True, True, True, True, "cls_all"),
)
# Fig. 2: synthetic-only classifiers at each scale (x1 is the "all three" row), and the real-data line.
ABLATION_SCALES = ((1, "cls_all"), (2, "cls_x2"), (4, "cls_x4"))
ABLATION_REAL = "cls_real"


def seed_stats(abl: Path, prefix: str) -> dict | None:
    """Test top-1 of every finished classifier <prefix>_s<seed>: per seed, mean, sample std (0 for one seed), n."""
    seeds = {}
    for folder in sorted(abl.glob(f"{prefix}_s*")):
        seed, metrics = folder.name[len(prefix) + 2 :], _manifest_metrics(folder)
        if seed.isdigit() and metrics is not None:
            seeds[int(seed)] = float(metrics["top1"])
    if not seeds:
        return None
    values = np.asarray(list(seeds.values()), dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "n": len(values), "seeds": seeds}


def resolved(a: dict, b: dict) -> bool:
    """A difference counts only when both rows have >= 2 seeds and it exceeds both the larger seed spread and twice
    its own standard error (sqrt(s_a^2/n_a + s_b^2/n_b)); anything less is reported as not resolved."""
    if min(a["n"], b["n"]) < 2:
        return False
    diff = abs(a["mean"] - b["mean"])
    stderr = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return diff > max(a["std"], b["std"]) and diff > 2 * stderr


def figure(stats: dict) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} (n={stats['n']})"


def per_seed(stats: dict) -> str:
    return ", ".join(f"{v:.1f}" for _, v in sorted(stats["seeds"].items()))


def difference(row: dict, ref: dict) -> str:
    """row − ref, flagged when the seed spread does not resolve it."""
    return f"{row['mean'] - ref['mean']:+.1f}" + ("" if resolved(row, ref) else " (within seed spread: not resolved)")


def tab2_lines(abl: Path) -> tuple[list[str], dict]:
    stats = {name: seed_stats(abl, prefix) for name, *_, prefix in ABLATION_ROWS}
    stats = {name: row for name, row in stats.items() if row is not None}
    ref, tick = stats.get("all three"), {True: "✓", False: ""}
    lines = [
        "## Tab. 2 analogue: which of latent prior, visual guidance and MMD matter",
        "",
        "Synthetic-only classifiers (x1), test top-1 (%) as mean ± sample std over classifier seeds. The seeds "
        "vary the classifier only (initialisation, data order, augmentation); each row's finetune and synthesis "
        "ran once, so the spread understates the run-to-run variance. A difference is called resolved only when "
        "it exceeds both the larger seed std and twice its standard error.",
        "",
        "| latent prior | visual guidance | MMD | finetuned | row | test top-1 | per seed | vs all three | gap FID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, lp, vg, mmd, ft, prefix in ABLATION_ROWS:
        if name in stats:
            row = stats[name]
            row["gap_fid"] = gap_fid(abl, prefix)
            versus = "–" if ref is None or name == "all three" else difference(row, ref)
            gap = f"{row['gap_fid']:.3g}" if row["gap_fid"] is not None else "–"
            lines.append(
                f"| {tick[lp]} | {tick[vg]} | {tick[mmd]} | {tick[ft]} | {name} | {figure(row)} | "
                f"{per_seed(row)} | {versus} | {gap} |"
            )
    lines += ["", gap_correlation_line(stats)]
    return lines, stats


def gap_fid(abl: Path, cls_prefix: str) -> float | None:
    """The eval_gap FID of the synthetic set a Tab. 2 row's classifiers trained on (ablation/gap_<row>)."""
    metrics = _manifest_metrics(abl / ("gap_" + cls_prefix.removeprefix("cls_")))
    return None if metrics is None else float(metrics["fid"])


def gap_correlation_line(stats: dict) -> str:
    """Spearman's rank correlation between a row's gap FID and its mean synthetic-only top-1, over the rows with
    both (a smaller gap should mean a better classifier: a negative correlation)."""

    pairs = [(row["gap_fid"], row["mean"]) for row in stats.values() if row.get("gap_fid") is not None]
    if len(pairs) < 3:
        return f"Gap vs accuracy: {len(pairs)} rows with a gap figure, too few for a rank correlation."
    rho, p = spearmanr(*zip(*pairs))
    return f"Gap FID vs mean top-1 across the rows: Spearman ρ = {rho:.2f} (n = {len(pairs)} rows, p = {p:.2g})."


def fig2_lines(abl: Path) -> tuple[list[str], dict]:
    scales = {scale: seed_stats(abl, prefix) for scale, prefix in ABLATION_SCALES}
    scales = {scale: row for scale, row in scales.items() if row is not None}
    real = seed_stats(abl, ABLATION_REAL)
    lines = [
        "## Fig. 2 analogue: synthetic-only accuracy as the synthetic set grows",
        "",
        "All three components on; xN = N synthetic images per real training image (xN extends x1 with more "
        "copies: same seeds), classifier trained for the same epochs on each set.",
        "",
        "| training data | test top-1 | per seed |",
        "|---|---|---|",
    ]
    lines += [f"| synthetic x{scale} | {figure(row)} | {per_seed(row)} |" for scale, row in scales.items()]
    if real:
        lines.append(f"| real (the line) | {figure(real)} | {per_seed(real)} |")
    order = sorted(scales)
    if len(order) >= 2:
        lines += [
            "",
            "Between neighbouring scales: "
            + "; ".join(f"x{a} -> x{b}: {difference(scales[b], scales[a])}" for a, b in zip(order, order[1:]))
            + ".",
        ]
    if scales and real:
        lines += ["", f"Largest synthetic set (x{order[-1]}) vs real: {difference(scales[order[-1]], real)}."]
    return lines, {"synthetic": scales, "real": real}


def ablation_tables(abl: Path) -> tuple[list[str], dict]:
    tab2, stats = tab2_lines(abl)
    fig2, scaling = fig2_lines(abl)
    return tab2 + [""] + fig2, {"tab2": stats, "fig2": scaling}


def scaling_plot(fig2: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(fig2["synthetic"])
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    if scales:
        rows = [fig2["synthetic"][k] for k in scales]
        ax.errorbar(
            scales,
            [r["mean"] for r in rows],
            yerr=[r["std"] for r in rows],
            marker="o",
            capsize=3,
            label=f"synthetic only (n={min(r['n'] for r in rows)} seeds)",
        )
    real = fig2["real"]
    if real:
        ax.axhline(real["mean"], color="k", linestyle="--", label=f"real x1 (n={real['n']})")
        ax.axhspan(real["mean"] - real["std"], real["mean"] + real["std"], color="k", alpha=0.1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(scales or [1], [f"x{k}" for k in (scales or [1])])
    ax.set_xlabel("synthetic images per real image")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("demo: Fig. 2 analogue")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with common.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def run_ablation_report(args) -> dict:
    abl = common.output_dir(args, "ablation")
    if not abl.is_dir():
        raise FileNotFoundError(f"no ablation runs under {abl}: run `make demo-ablation`")
    lines, tables = ablation_tables(abl)
    if not tables["tab2"] and not tables["fig2"]["synthetic"]:
        raise FileNotFoundError(f"no finished ablation classifier under {abl} (cls_*_s<seed>/manifest.json)")
    scaling_plot(tables["fig2"], abl / "scaling.png")
    lines = [
        "# Real-Fake demo: ablation and scaling",
        "",
        f"Runs folder: `{abl}`.",
        "",
        *lines,
        "",
        "![synthetic-only top-1 vs scale](scaling.png)",
    ]
    common.write_json(abl / "ablation.json", tables)
    with common.atomic_write(abl / "report.md") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return tables


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    p.add_argument("command", choices=["report", "ablation-report"], help="which report (see above)")
    p.add_argument("--config", default=None, help="YAML config (configs/demo.yaml: its shared keys); CLI overrides")
    p.add_argument("--dataset", default="demo", help="demo, or imagefolder for make imagefolder's report")
    p.add_argument("--data-root", default="runs/demo/data", help="the demo dataset")
    p.add_argument("--runs-dir", default="runs", help="root of the runs folders, as in every stage")
    p.add_argument(
        "--pretrained-model",
        default=None,
        help="the generator the stages used (a local folder): the manifest.json beside it gives its quality figures",
    )
    where = "where to read and write (default: report: <runs-dir>/<dataset>; ablation-report: its ablation/)"
    p.add_argument("--output-dir", default=None, help=where)
    return p


def main(argv=None) -> dict:
    args = common.parse_args(get_parser(), argv, "demo_report")
    return {"report": run_report, "ablation-report": run_ablation_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
