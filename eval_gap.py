"""Distribution gap between a synthetic set and the real training split, before any classifier is trained on it.

The paper's thesis (§3, Eq. 3-4): a synthetic set is worth what its distance from the real distribution is, per class.
This stage measures that distance in a feature space, overall and per class, and the same figures for the real train
split against the real held-out split: the floor every synthetic figure is read against (two samples of one
distribution are not at distance 0 either).

Figures (each overall and per class): FID (Fréchet distance of Gaussian fits), KID (unbiased MMD² with the cubic
polynomial kernel, mean and std over random subsets), precision / recall (k-NN manifolds, Kynkäänniemi et al. 2019),
density / coverage (Naeem et al. 2020), and the paper's own linear-kernel MMD, ‖mean_real − mean_synth‖² / D
(common.mmd_loss's form, here on image features).

Features (--features, cached as float32, every figure computed in float64; the k-NN figures on a seeded sample of
--prdc-images per set): clip (a CLIPVisionModelWithProjection's image embedding: --clip-model, default the encoder
visual guidance uses), inception (timm's inception_v3.tv_in1k 2048-d pool features, the space FID is defined on),
timm:<model name> (any timm model's pooled features), classifier:<train_cls.py run> (that classifier's penultimate
features). Features are cached per image set and feature space under <output-dir>/../gap_features/, keyed by the set's
fingerprint (paths, sizes, mtimes): the real splits are embedded once and reused by every synthetic variant, and a
changed set is embedded again.

Inputs : --synthetic-dir (a synthesize.py output), --dataset / --data-root (the real train and held-out splits).
Outputs: <output-dir>/results.json, results.md, per_class.png, precision_recall.png, manifest.json.

  python eval_gap.py --config configs/demo.yaml --synthetic-dir runs/demo/synth_x1 \\
      --features classifier:runs/demo/cls_real --output-dir runs/demo/gap_synth_x1

Not done yet (issue #16): streaming statistics for sets too large for memory, --shard / accelerate launch, the gap
stage inside `make <dataset>` and `make demo`, the ablation's gap column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from common import (
    HELD_OUT,
    HelpFormatter,
    ImageFiles,
    RunDir,
    atomic_path,
    atomic_write,
    config_dict,
    get_logger,
    load_classifier,
    load_dataset,
    load_synthetic,
    parse_args,
    progress,
    resolve_split,
    split_fingerprint,
    write_json,
)

# ----------------------------------------------------------------------------------------------------------------------
# The figures. Features are float64 numpy arrays [N, D]; everything below is exact for the points it is given.


def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) in float64 (FID's definition). A singular product gets the usual
    small ridge; the imaginary part that sqrtm leaves from rounding is dropped."""
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(len(cov1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + ridge) @ (cov2 + ridge))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean.real))


def fid(x: np.ndarray, y: np.ndarray) -> float:
    return frechet_distance(*gaussian_fit(x), *gaussian_fit(y))


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def kid(x: np.ndarray, y: np.ndarray, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with k(a, b) = (a·b / D + 1)³, mean and
    std over `subsets` random subsets of min(subset_size, len) points of each set."""
    rng = np.random.default_rng(seed)
    size = min(subset_size, len(x), len(y))
    values = [
        _mmd2_unbiased_poly(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(values)), float(np.std(values))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict:
    """Precision / recall (k-NN manifolds) and density / coverage (Naeem et al. 2020) of `fake` against `real`.
    The radius of a point is the distance to its k-th nearest neighbour in its own set (itself excluded)."""
    k = min(k, len(real) - 1, len(fake) - 1)
    real_radius = np.sort(_pairwise(real, real), axis=1)[:, k]
    fake_radius = np.sort(_pairwise(fake, fake), axis=1)[:, k]
    real_fake = _pairwise(real, fake)  # [R, F]
    inside_real = real_fake < real_radius[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((real_fake < fake_radius[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum(axis=0).mean() / k),
        "coverage": float((real_fake.min(axis=1) < real_radius).mean()),
    }


def linear_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The paper's linear-kernel MMD² (common.mmd_loss's form): ‖mean x − mean y‖² / D."""
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff / x.shape[1])


def subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n rows, a seeded choice: the k-NN figures cost O(N²) distances, so they run on a sample."""
    return x if len(x) <= n else x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def gap_figures(real: np.ndarray, other: np.ndarray, args) -> dict:
    kid_mean, kid_std = kid(real, other, args.kid_subsets, args.kid_subset_size, args.seed)
    sampled = (subsample(real, args.prdc_images, args.seed), subsample(other, args.prdc_images, args.seed + 1))
    return {
        "fid": fid(real, other),
        "kid": kid_mean,
        "kid_std": kid_std,
        **prdc(*sampled, args.k),
        "linear_mmd": linear_mmd(real, other),
        "images": len(other),
    }


def per_class_figures(real, real_y, other, other_y, classes, args) -> dict:
    """gap_figures per class; a class with fewer than 3 images on either side is left out (no covariance)."""
    out = {}
    for label, name in enumerate(classes):
        r, o = real[real_y == label], other[other_y == label]
        if min(len(r), len(o)) >= 3:
            out[name] = gap_figures(r, o, args)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Feature extractors: (embed(list of paths) -> float64 [N, D], a name for the cache).


def clip_features(model_id: str, device):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(model_id, dtype=torch.float32).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(model_id)

    def transform(image):
        return processor(images=image, return_tensors="pt").pixel_values[0]

    return lambda x: model(pixel_values=x).image_embeds, transform


def timm_features(name: str, device):
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(name, pretrained=True, num_classes=0).to(device).eval()  # num_classes=0: pooled features
    return model, create_transform(**resolve_data_config({}, model=model))


def classifier_features(run_dir: str, device):
    model, transform, _ = load_classifier(run_dir, device)
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True), transform


def build_extractor(spec: str, args, device):
    kind, _, arg = spec.partition(":")
    if kind == "clip":
        return clip_features(arg or args.clip_model, device)
    if kind == "inception":
        return timm_features("inception_v3.tv_in1k", device)
    if kind == "timm" and arg:
        return timm_features(arg, device)
    if kind == "classifier" and arg:
        return classifier_features(arg, device)
    raise ValueError(f"--features {spec}: use clip[:MODEL], inception, timm:NAME or classifier:RUN_DIR")


@torch.no_grad()
def embed(paths, extractor, args, device, desc: str) -> np.ndarray:
    forward, transform = extractor
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=args.batch_size, num_workers=args.workers
    )
    feats = [forward(x.to(device)).float().cpu() for _, x in progress(loader, desc=desc)]  # stored as float32
    return torch.cat(feats).numpy() if feats else np.zeros((0, 0))


def cached_features(index, fp: str, extractor, args, device, cache_dir: Path, log) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of an image set (fingerprint `fp`), from the cache when the set and the feature space are
    unchanged."""
    from safetensors.numpy import load_file, save_file

    key = "".join(c if c.isalnum() or c in "-_." else "_" for c in args.features)
    cache = cache_dir / f"{index.name}-{index.split}-{fp}-{key}.safetensors"
    labels = np.array([s.label for s in index.samples])
    if cache.is_file():
        log.info(f"{index.name} {index.split}: features from {cache}")
        return load_file(cache)["features"].astype(np.float64), labels
    feats = embed([index.abspath(i) for i in range(len(index))], extractor, args, device, f"{index.split} features")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({"features": feats}, str(tmp))
    return feats.astype(np.float64), labels  # the figures are computed in float64


# ----------------------------------------------------------------------------------------------------------------------
# Outputs


def write_markdown(path: Path, results: dict) -> None:
    names = ("fid", "kid", "precision", "recall", "density", "coverage", "linear_mmd")
    lines = [
        f"# Distribution gap: {results['synthetic_dir']} vs real {results['real_split']}",
        "",
        f"Features: `{results['features']}`. Floor: real {results['real_split']} vs real {results['held_out_split']}.",
        "",
        "| set | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for row in ("synthetic", "floor"):
        lines.append(f"| {row} | " + " | ".join(f"{results[row][n]:.4g}" for n in names) + " |")
    lines += ["", f"Largest per-class FID gap (synthetic FID − floor FID): {', '.join(results['largest_gap_classes'])}"]
    lines += ["", "| class | synthetic FID | floor FID | precision | recall |", "|---|---|---|---|---|"]
    for name, row in results["per_class"].items():
        floor = results["per_class_floor"].get(name, {}).get("fid", float("nan"))
        lines.append(f"| {name} | {row['fid']:.4g} | {floor:.4g} | {row['precision']:.3f} | {row['recall']:.3f} |")
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def write_plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["per_class"])
    synth = [results["per_class"][n]["fid"] for n in names]
    floor = [results["per_class_floor"].get(n, {}).get("fid", np.nan) for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    ax.bar(np.arange(len(names)) - 0.2, synth, 0.4, label="synthetic vs real train")
    ax.bar(np.arange(len(names)) + 0.2, floor, 0.4, label="floor: real held-out vs real train")
    ax.set_xticks(np.arange(len(names)), names, rotation=60, ha="right")
    ax.set_ylabel("FID")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "per_class.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for row, marker in (("synthetic", "o"), ("floor", "x")):
        ax.scatter(results[row]["recall"], results[row]["precision"], marker=marker, s=80, label=row)
    ax.set_xlim(0, 1.05), ax.set_ylim(0, 1.05), ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.legend()
    fig.tight_layout()
    with atomic_path(out / "precision_recall.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (configs/<dataset>.yaml, section eval_gap)")
    p.add_argument("--synthetic-dir", required=False, default=None, help="a synthesize.py output (required)")
    p.add_argument("--dataset", default=None, help="the real dataset (common.load_dataset)")
    p.add_argument("--data-root", default=None, help="root of the real dataset")
    p.add_argument("--test-split", default=HELD_OUT, help="the real held-out split for the floor")
    p.add_argument("--features", default="clip", help="clip[:MODEL] | inception | timm:NAME | classifier:RUN_DIR")
    p.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="for --features clip")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours for precision/recall/density/coverage")
    p.add_argument("--prdc-images", type=int, default=10000, help="per set, for the k-NN figures (Naeem et al.: 10k)")
    p.add_argument("--kid-subsets", type=int, default=50)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--output-dir", default=None, help="default <runs-dir>/<dataset>/gap_<synthetic dir name>")
    p.add_argument("--overwrite", action="store_true", help="move an existing run with another config aside")
    return p


def main(argv=None) -> dict:
    parser = get_parser()
    args = parse_args(parser, argv, "eval_gap")
    if not args.synthetic_dir:
        parser.error("--synthetic-dir DIR (a synthesize.py output) is required")
    synthetic = load_synthetic(args.synthetic_dir)
    real = load_dataset(args.dataset, args.data_root, "train")
    held_out_split = resolve_split(args.dataset, args.data_root, args.test_split)
    held_out = load_dataset(args.dataset, args.data_root, held_out_split)
    if synthetic.classes != real.classes:
        raise ValueError(f"{args.synthetic_dir} has other classes (or another order) than {args.dataset} train")
    out = Path(args.output_dir or Path(args.runs_dir) / args.dataset / f"gap_{Path(args.synthetic_dir).name}")
    config = config_dict(args, exclude=("batch_size", "workers", "runs_dir", "output_dir", "overwrite"))
    sets = {"train": real, held_out_split: held_out, "synthetic": synthetic}
    config["sets"] = fps = {name: split_fingerprint(index) for name, index in sets.items()}
    run = RunDir(out, config, args.overwrite)
    start, device = time.time(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = build_extractor(args.features, args, device)  # a wrong model fails here, before the run dir exists
    if run.start() == "done":
        return run.manifest()["metrics"]
    log = get_logger(out)
    cache_dir = out.parent / "gap_features"
    (r, ry), (h, hy), (s, sy) = (
        cached_features(index, fps[name], extractor, args, device, cache_dir, log) for name, index in sets.items()
    )
    results = {
        "synthetic_dir": str(args.synthetic_dir),
        "features": args.features,
        "real_split": "train",
        "held_out_split": held_out_split,
        "synthetic": gap_figures(r, s, args),
        "floor": gap_figures(r, h, args),
        "per_class": per_class_figures(r, ry, s, sy, real.classes, args),
        "per_class_floor": per_class_figures(r, ry, h, hy, real.classes, args),
    }
    excess = {
        n: v["fid"] - results["per_class_floor"].get(n, {}).get("fid", 0.0) for n, v in results["per_class"].items()
    }
    results["largest_gap_classes"] = sorted(excess, key=excess.get, reverse=True)[:5]
    write_json(out / "results.json", results)
    write_markdown(out / "results.md", results)
    write_plots(out, results)
    metrics = {
        **{k: results["synthetic"][k] for k in ("fid", "kid", "precision", "recall", "density", "coverage")},
        **{f"floor_{k}": results["floor"][k] for k in ("fid", "kid", "precision", "recall")},
        "elapsed_s": round(time.time() - start, 1),
    }
    run.finish(metrics, inputs={"synthetic_dir": str(args.synthetic_dir), "data_root": str(args.data_root)})
    log.info(
        f"gap of {args.synthetic_dir}: FID {metrics['fid']:.3g} (floor {metrics['floor_fid']:.3g}), "
        f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}; {out / 'results.md'}"
    )
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
