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
visual guidance uses), inception (timm's inception_v3.tv_in1k 2048-d pool features: torchvision's Inception-v3, so
FID-like, but not comparable with papers' FID, which uses the TF Inception weights), timm:<model name> (any timm
model's pooled features), classifier:<train_cls.py run> (that classifier's penultimate features). Each set's
statistics are cached under <output-dir>/../gap_features/, keyed by the set's fingerprint (paths, sizes, mtimes; a
synthetic set's manifest), the feature space with the weights behind it (feature_space) and the sample: the real
splits are embedded once and reused by every synthetic variant, and a changed set is embedded again. Folder and
tar-shard sets alike.

Inputs : --synthetic-dir (a synthesize.py output), --dataset / --data-root (the real train and held-out splits).
Outputs: <output-dir>/results.json, results.md, per_class.png, precision_recall.png, manifest.json.

  python eval_gap.py --config configs/demo.yaml --synthetic-dir runs/demo/synth_x1 \\
      --features classifier:runs/demo/cls_real --output-dir runs/demo/gap_synth_x1

Scale: one streaming pass per set (GapStats): FID and the linear MMD over every image from running sums (D² floats),
KID and the k-NN figures on a seeded overall sample, the per-class figures on a seeded sample of up to
--per-class-images per class; so IN-1K x10 needs the sums and about classes x 1,000 rows in memory, not 12.8 M rows.
Each process of `accelerate launch` and each `--shard i/n` job embeds its part of every set, saved every
--checkpoint-every images (a re-run resumes it); the job that finishes the last part merges them and writes the figures.

  accelerate launch eval_gap.py --config configs/in1k.yaml --synthetic-dir runs/in1k/synth_x10
  python eval_gap.py ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
from accelerate import PartialState
from safetensors.numpy import load_file, save_file
from scipy import linalg
from timm.data import create_transform, resolve_data_config
from timm.models import parse_model_name
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import common

INCEPTION = "inception_v3.tv_in1k"  # timm's name of torchvision's Inception-v3 (--features inception; docstring)

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
    within = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within - 2 * kxy.mean())


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
    return linear_mmd_of_means(x.mean(0), y.mean(0))


def linear_mmd_of_means(mu_x: np.ndarray, mu_y: np.ndarray) -> float:
    diff = mu_x - mu_y
    return float(diff @ diff / len(diff))


def subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most n rows, a seeded choice: the k-NN figures cost O(N²) distances, so they run on a sample."""
    return x if len(x) <= n else x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def gap_figures(
    real: np.ndarray, other: np.ndarray, args, fits: tuple | None = None, images: int | None = None
) -> dict:
    """Every figure of `other` against `real`: KID and the k-NN figures on the rows given; FID and the linear MMD from
    `fits` ((mean, covariance) of real and other: a streamed set's fits over every image), else from the rows.
    `images`: the set's size to record (default: the rows')."""
    real_fit, other_fit = fits or (gaussian_fit(real), gaussian_fit(other))
    kid_mean, kid_std = kid(real, other, args.kid_subsets, args.kid_subset_size, args.seed)
    sampled = (subsample(real, args.prdc_images, args.seed), subsample(other, args.prdc_images, args.seed + 1))
    return {
        "fid": frechet_distance(*real_fit, *other_fit),
        "kid": kid_mean,
        "kid_std": kid_std,
        **prdc(*sampled, args.k),
        "linear_mmd": linear_mmd_of_means(real_fit[0], other_fit[0]),
        "images": len(other) if images is None else images,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Streaming statistics: one pass over a set of any size, in bounded memory, shardable and resumable.


class GapStats:
    """What the figures need of one image set (module docstring, Scale), gathered batch by batch: per-class counts
    and feature sums, the sum of outer products and the sample's rows. Sums add and samples unite, so the parts of
    processes, jobs and resumed chunks merge exactly."""

    def __init__(self, num_classes: int):
        self.count = np.zeros(num_classes, np.int64)
        self.sums = self.outer = None  # [classes, D], [D, D] float64, sized by the first batch
        self.rows: dict[int, np.ndarray] = {}  # set position -> float32 features of the sampled images
        self.done = 0  # how many of this part's positions are in (resume)

    def add(self, positions: np.ndarray, feats: np.ndarray, labels: np.ndarray, keep: set) -> None:
        x = feats.astype(np.float64)
        if self.sums is None:
            self.sums, self.outer = np.zeros((len(self.count), x.shape[1])), np.zeros((x.shape[1],) * 2)
        np.add.at(self.sums, labels, x)
        np.add.at(self.count, labels, 1)
        self.outer += x.T @ x
        self.rows.update({int(p): f for p, f in zip(positions, feats.astype(np.float32)) if int(p) in keep})
        self.done += len(positions)

    def merge(self, other: "GapStats") -> "GapStats":
        if other.sums is not None:
            if self.sums is None:
                self.sums, self.outer = np.zeros_like(other.sums), np.zeros_like(other.outer)
            self.sums += other.sums
            self.outer += other.outer
        self.count += other.count
        self.rows.update(other.rows)
        self.done += other.done
        return self

    def gaussian(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance of every image (np.cov's, from the sums)."""
        n = self.count.sum()
        mu = self.sums.sum(0) / n
        return mu, (self.outer - n * np.outer(mu, mu)) / (n - 1)

    def sample(self, positions) -> np.ndarray:
        return np.stack([self.rows[int(p)] for p in positions]).astype(np.float64)

    def save(self, path: Path) -> None:
        keys = np.array(sorted(self.rows), dtype=np.int64)
        dim = 0 if self.sums is None else self.sums.shape[1]
        tensors = {
            "count": self.count,
            "sums": self.sums if self.sums is not None else np.zeros((len(self.count), 0)),
            "outer": self.outer if self.outer is not None else np.zeros((0, 0)),
            "row_positions": keys,
            "rows": np.stack([self.rows[k] for k in keys]) if len(keys) else np.zeros((0, dim), np.float32),
            "done": np.array([self.done], dtype=np.int64),
        }
        with common.atomic_path(path) as tmp:
            save_file(tensors, str(tmp))

    @classmethod
    def load(cls, path: Path) -> "GapStats":
        t = load_file(str(path))
        stats = cls(len(t["count"]))
        stats.count, stats.done = t["count"], int(t["done"][0])
        if t["sums"].shape[1]:
            stats.sums, stats.outer = t["sums"], t["outer"]
        stats.rows = {int(p): r for p, r in zip(t["row_positions"], t["rows"])}
        return stats


@dataclasses.dataclass
class SamplePlan:
    """The seeded sample a set keeps: positions overall (KID and the k-NN figures) and per class label (every
    per-class figure)."""

    overall: np.ndarray
    per_class: dict[int, np.ndarray]

    def positions(self) -> set[int]:
        """Every position either sample keeps: the rows GapStats holds on to."""
        return set(self.overall.tolist()).union(*(set(v.tolist()) for v in self.per_class.values()))


@dataclasses.dataclass
class EmbeddedSet:
    """An image set's feature statistics (None while other shards still embed their parts) and its sample plan."""

    stats: GapStats | None
    sample: SamplePlan


def sample_plan(labels: np.ndarray, args) -> SamplePlan:
    """The seeded sample a set keeps: a pure function of the labels and the seed, so every shard keeps the same."""
    n = len(labels)
    size = min(n, max(args.prdc_images, args.kid_subset_size))
    overall = np.sort(np.random.default_rng(args.seed).choice(n, size, replace=False))
    per_class = {}
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        pick = np.random.default_rng([args.seed, int(label)]).choice(
            len(where), min(len(where), args.per_class_images), replace=False
        )
        per_class[int(label)] = np.sort(where[pick])
    return SamplePlan(overall, per_class)


def streamed_figures(real: EmbeddedSet, other: EmbeddedSet, args) -> dict:
    """gap_figures with FID and the linear MMD over every image (from the sums), KID and the k-NN figures on the
    seeded overall samples (the same as gap_figures' when a set is no larger than its sample)."""
    r, o = real.stats.sample(real.sample.overall), other.stats.sample(other.sample.overall)
    return gap_figures(r, o, args, (real.stats.gaussian(), other.stats.gaussian()), int(other.stats.count.sum()))


def streamed_per_class(real: EmbeddedSet, other: EmbeddedSet, classes, args) -> dict:
    """gap_figures per class on the per-class samples; a class with fewer than 3 images on either side is left out."""
    out = {}
    for label, name in enumerate(classes):
        r_pos, o_pos = real.sample.per_class.get(label, []), other.sample.per_class.get(label, [])
        if min(len(r_pos), len(o_pos)) >= 3:
            r, o = real.stats.sample(r_pos), other.stats.sample(o_pos)
            out[name] = gap_figures(r, o, args, images=int(other.stats.count[label]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Feature extractors.


@dataclasses.dataclass
class Extractor:
    """A feature space's model: `forward` maps an image batch to features [B, D], `transform` a PIL image to its
    input tensor."""

    forward: Callable
    transform: Callable


def clip_features(model_id: str, device):
    model = CLIPVisionModelWithProjection.from_pretrained(model_id, dtype=torch.float32).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(model_id)

    def transform(image):
        return processor(images=image, return_tensors="pt").pixel_values[0]

    return Extractor(lambda x: model(pixel_values=x).image_embeds, transform)


def timm_features(name: str, device):
    model = timm.create_model(name, pretrained=True, num_classes=0).to(device).eval()  # num_classes=0: pooled features
    return Extractor(model, create_transform(**resolve_data_config({}, model=model)))


def classifier_features(run_dir: str, device):
    model, transform, _ = common.load_classifier(run_dir, device)
    return Extractor(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), transform)


def feature_space(spec: str, args) -> str:
    """The --features space, as the cache and the run's identity name it: the kind and the weights behind it, a local
    model (a CLIP dir, a classifier run's weights) by the hash of its files, so another --clip-model or a retrained
    classifier never gets the old features or figures. A file-name fragment."""
    kind, _, arg = spec.partition(":")
    weights = {"clip": arg or args.clip_model, "inception": INCEPTION, "timm": arg}.get(kind)
    if kind == "classifier" and arg:
        weights = Path(arg) / "model.safetensors"  # not its manifest, which a re-test rewrites for the same weights
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{kind}-{common.fingerprint(weights)}")


def check_features(spec: str, args) -> None:
    """Fail with the fix, before the run starts, on a --features that names no model. The model itself is loaded
    only once the run has work: a finished run's re-run loads none."""
    kind, _, arg = spec.partition(":")
    if kind == "clip":
        common.check_pretrained(CLIPVisionConfig.from_pretrained, arg or args.clip_model, what="a CLIP image encoder")
    elif kind == "classifier" and arg and not (Path(arg) / "manifest.json").is_file():
        raise FileNotFoundError(f"--features {spec}: {arg} is not a finished train_cls.py run (no manifest.json)")
    elif not (kind == "inception" or (kind == "timm" and timm_name_ok(arg)) or (kind == "classifier" and arg)):
        raise ValueError(
            f"--features {spec}: use clip[:MODEL], inception, timm:NAME (a timm model) or classifier:RUN_DIR"
        )


def timm_name_ok(name: str) -> bool:
    """A timm model name, or a source timm resolves itself (hf-hub:ORG/NAME, local-dir:PATH)."""
    return timm.is_model(name) or parse_model_name(name)[0] is not None


def build_extractor(spec: str, args, device) -> Extractor:
    """The --features model (check_features has checked the spec)."""
    kind, _, arg = spec.partition(":")
    if kind == "clip":
        return clip_features(arg or args.clip_model, device)
    if kind == "classifier":
        return classifier_features(arg, device)
    return timm_features(INCEPTION if kind == "inception" else arg, device)


@dataclasses.dataclass
class Part:
    """This job's and process's share of an image set: the set, its labels, the positions of the share, and the file
    the share's statistics are saved to (so it resumes)."""

    index: common.DatasetIndex
    labels: np.ndarray
    positions: np.ndarray
    path: Path


@dataclasses.dataclass
class Embedding:
    """How this job embeds image sets: the feature extractor and its space, the options, the process it runs in, and
    the cache its statistics go to (module docstring)."""

    extractor: Extractor
    space: str  # feature_space's name of it
    args: argparse.Namespace
    state: PartialState
    cache_dir: Path
    log: logging.Logger

    def set_stats(self, index, name: str, fp: str) -> EmbeddedSet:
        """An image set's statistics (None while other shards still embed their parts) and sample plan; cached under
        cache_dir, this job's part resumable."""
        args, state = self.args, self.state
        sampling = f"s{args.seed}-o{max(args.prdc_images, args.kid_subset_size)}-c{args.per_class_images}"
        stem = f"{index.name}-{index.split}-{fp}-{self.space}-{sampling}"
        final = self.cache_dir / f"{stem}.safetensors"
        labels = np.array([s.label for s in index.samples])
        plan = sample_plan(labels, args)
        if final.is_file():
            self.log.info(f"{name}: statistics from {final}")
            return EmbeddedSet(GapStats.load(final), plan)
        keep = plan.positions()
        (i, n), (r, w) = args.shard, (state.process_index, state.num_processes)
        positions = np.array(common.local_items(list(range(len(index))), (i, n), r, w))
        part = Part(index, labels, positions, self.cache_dir / f"{stem}.part-{i}of{n}-{r}of{w}.safetensors")
        stats = GapStats.load(part.path) if part.path.is_file() else GapStats(len(index.classes))
        if stats.done < len(positions):
            self.embed_part(part, stats, keep, f"{name} features")
        state.wait_for_everyone()
        return EmbeddedSet(merge_parts(self.cache_dir, stem, len(index)), plan)

    @torch.no_grad()
    def embed_part(self, part: Part, stats: GapStats, keep: set, desc: str) -> None:
        """Embed the part's images not yet in `stats` (a resumed part starts where it stopped), adding them batch by
        batch; the part is saved every --checkpoint-every images and at the end."""
        forward, transform, args = self.extractor.forward, self.extractor.transform, self.args
        todo = part.positions[stats.done :]
        images = common.ImageFiles([part.index.abspath(int(i)) for i in todo], transform)
        loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.workers)
        since = 0
        for batch, x in common.progress(loader, desc=desc, is_main=self.state.is_main_process):
            where = todo[batch.numpy()]
            feats = forward(x.to(self.state.device)).float().cpu().numpy()  # features kept float32
            stats.add(where, feats, part.labels[where], keep)
            since += len(where)
            if since >= args.checkpoint_every:
                stats.save(part.path)
                since = 0
        stats.save(part.path)


def merge_parts(cache_dir: Path, stem: str, size: int) -> GapStats | None:
    """The whole set's statistics once the finished parts (of any jobs and processes) cover it, saved as <stem>."""
    final = cache_dir / f"{stem}.safetensors"
    if final.is_file():
        return GapStats.load(final)
    parts = sorted(cache_dir.glob(f"{stem}.part-*.safetensors"))
    merged = None
    try:
        for path in parts:
            merged = GapStats.load(path) if merged is None else merged.merge(GapStats.load(path))
    except FileNotFoundError:  # another job merged the parts meanwhile
        return GapStats.load(final)
    covered = 0 if merged is None else int(merged.count.sum())
    if covered < size:
        return None
    if covered > size:
        raise RuntimeError(
            f"the parts {cache_dir}/{stem}.part-* cover {covered} images of a set of {size}: parts from runs with "
            f"other --shard or process counts are mixed; delete them and run again"
        )
    merged.save(final)
    for path in parts:
        path.unlink(missing_ok=True)
    return merged


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
    ranked = ", ".join(results["largest_gap_classes"])
    lines += ["", f"Classes by FID excess over their floor (synthetic FID − floor FID), largest first: {ranked}"]
    lines += ["", "| class | synthetic FID | floor FID | precision | recall |", "|---|---|---|---|---|"]
    for name, row in results["per_class"].items():
        floor = results["per_class_floor"].get(name, {}).get("fid", float("nan"))
        lines.append(f"| {name} | {row['fid']:.4g} | {floor:.4g} | {row['precision']:.3f} | {row['recall']:.3f} |")
    with common.atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def write_plots(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["per_class"])
    synth = [results["per_class"][n]["fid"] for n in names]
    floor = [results["per_class_floor"].get(n, {}).get("fid", np.nan) for n in names]
    bars, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    ax.bar(np.arange(len(names)) - 0.2, synth, 0.4, label="synthetic vs real train")
    ax.bar(np.arange(len(names)) + 0.2, floor, 0.4, label="floor: real held-out vs real train")
    ax.set_xticks(np.arange(len(names)), names, rotation=60, ha="right")
    ax.set_ylabel("FID")
    ax.legend()
    scatter, ax = plt.subplots(figsize=(4.5, 4))
    for row, marker in (("synthetic", "o"), ("floor", "x")):
        ax.scatter(results[row]["recall"], results[row]["precision"], marker=marker, s=80, label=row)
    ax.set_xlim(0, 1.05), ax.set_ylim(0, 1.05), ax.set_xlabel("recall"), ax.set_ylabel("precision"), ax.legend()
    for fig, name in ((bars, "per_class.png"), (scatter, "precision_recall.png")):
        fig.tight_layout()
        with common.atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    seed_help = "seed of the samples (KID, k-NN figures)"
    common.add_run_options(p, "gap_<synthetic dir name>", seed_help=seed_help, data_fingerprinted=True)
    a = p.group("sets and figures").add_argument
    a("--synthetic-dir", help="a synthesize.py output (required); its fingerprint is the identity, not the path")
    spec = "clip[:MODEL] | inception | timm:NAME | classifier:RUN_DIR"
    a("--features", default="clip", help=f"{spec}; the kind and weights are the identity (feature_space), not the path")
    p.not_hashed("synthetic_dir", "features")
    a("--clip-model", default="openai/clip-vit-large-patch14", help="for --features clip")
    a("--k", type=int, default=5, help="nearest neighbours for precision/recall/density/coverage")
    a("--prdc-images", type=int, default=10000, help="per set, for the k-NN figures (Naeem et al.: 10k)")
    a("--kid-subsets", type=int, default=50, help="KID: random subsets averaged")
    a("--kid-subset-size", type=int, default=1000, help="KID: images per subset")
    a("--per-class-images", type=int, default=1000, help="per set and class, for the per-class figures")
    # Resolved, the split's name and fingerprint are in the identity (config["sets"]); the option itself is not, so
    # held-out and the name it resolves to are the same run.
    floor = p.speed_group("floor (not part of the run's identity: the split's fingerprint is)")
    common.add_test_split(floor, "the real held-out split for the floor")
    a = p.speed_group().add_argument
    a("--batch-size", type=common.positive_int, default=64, help="images per feature-extractor batch")
    a("--shard", type=common.parse_shard, default="0/1", help="i/n: this job's part of every set")
    a("--checkpoint-every", type=int, default=50000, help="images between saves of a part (resume)")
    common.add_skip_bad(p, "the manifest (real train and held-out images)")
    return p


def all_figures(real: EmbeddedSet, held_out: EmbeddedSet, synthetic: EmbeddedSet, classes, args) -> dict:
    """Synthetic vs real train and the floor (real held-out vs real train), overall and per class. Names the five
    classes with the largest excess FID over their floor."""
    out = {
        "synthetic": streamed_figures(real, synthetic, args),
        "floor": streamed_figures(real, held_out, args),
        "per_class": streamed_per_class(real, synthetic, classes, args),
        "per_class_floor": streamed_per_class(real, held_out, classes, args),
    }
    excess = {n: v["fid"] - out["per_class_floor"].get(n, {}).get("fid", 0.0) for n, v in out["per_class"].items()}
    out["largest_gap_classes"] = sorted(excess, key=excess.get, reverse=True)[:5]
    return out


def main(argv=None) -> dict:
    parser = get_parser()
    args = common.parse_args(parser, argv, "eval_gap")
    if not args.synthetic_dir:
        parser.error("--synthetic-dir DIR (a synthesize.py output) is required")
    synthetic = common.load_synthetic(args.synthetic_dir)
    # Every real image checked before any work (as finetune / train_cls do): a bad one fails here, not mid-embedding.
    real, real_bad, real_fp = common.check_images(
        common.load_dataset(args.dataset, args.data_root, "train"), args.skip_bad
    )
    held_out_split = common.resolve_split(args.dataset, args.data_root, args.test_split)
    held_out, held_out_bad, held_out_fp = common.check_images(
        common.load_dataset(args.dataset, args.data_root, held_out_split), args.skip_bad
    )
    common.warn_if_made_from_other_data(args.synthetic_dir, real_fp)
    if synthetic.classes != real.classes:
        raise ValueError(f"{args.synthetic_dir} has other classes (or another order) than {args.dataset} train")
    out = common.output_dir(args, f"gap_{Path(args.synthetic_dir).name}")
    config = common.config_dict(args)
    sets = {"train": real, held_out_split: held_out, "synthetic": synthetic}
    # The real splits' fingerprints from check_images: a second stat of every file costs 7 s at IN-1K (5 us/image).
    fps = {"train": real_fp, held_out_split: held_out_fp, "synthetic": common.split_fingerprint(synthetic)}
    config["sets"] = fps
    check_features(args.features, args)
    config["feature_space"] = space = feature_space(args.features, args)  # --features names a model, not its weights
    state = PartialState(cpu=not torch.cuda.is_available())
    run = common.RunDir(out, config, args.overwrite, state.is_main_process, args.shard)
    start = time.time()
    if run.begin(state.wait_for_everyone) == "done":
        return run.manifest()["metrics"]
    log = common.get_logger(out, state.is_main_process)
    extractor = build_extractor(args.features, args, state.device)
    embedding = Embedding(extractor, space, args, state, out.parent / "gap_features", log)
    gathered = {name: embedding.set_stats(index, name, fps[name]) for name, index in sets.items()}
    if any(embedded.stats is None for embedded in gathered.values()) or not state.is_main_process:
        log.info("this part's features are in; the figures come from the job that finishes the last part")
        return None
    results = {"synthetic_dir": str(args.synthetic_dir), "features": args.features, "real_split": "train"}
    figures = all_figures(gathered["train"], gathered[held_out_split], gathered["synthetic"], real.classes, args)
    results.update(held_out_split=held_out_split, **figures)
    run.check_in_place()
    common.write_json(out / "results.json", results)
    write_markdown(out / "results.md", results)
    write_plots(out, results)
    metrics = {
        **{k: results["synthetic"][k] for k in ("fid", "kid", "precision", "recall", "density", "coverage")},
        **{f"floor_{k}": results["floor"][k] for k in ("fid", "kid", "precision", "recall")},
        "elapsed_s": round(time.time() - start, 1),
    }
    skipped_bad = {"train": real_bad, held_out_split: held_out_bad}  # --skip-bad: the real images left out
    inputs = {"synthetic_dir": str(args.synthetic_dir), "data_root": str(args.data_root), "skipped_bad": skipped_bad}
    run.finish(metrics, inputs=inputs)
    log.info(
        f"gap of {args.synthetic_dir}: FID {metrics['fid']:.3g} (floor {metrics['floor_fid']:.3g}), "
        f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}; {out / 'results.md'}"
    )
    return metrics


if __name__ == "__main__":
    main()
