"""Membership inference with LiRA (Carlini et al. 2022) on classifiers trained on synthetic vs real data (paper §4.5).

The paper's privacy claim (§4.5, App. G.4, Fig. 3): a classifier trained on Real-Fake synthetic data leaks less
membership of the real training images than one trained on those images directly. We measure it the way the privacy
literature does. M shadow pipelines (--num-shadows) each see a random half of the real training set, given by a balanced
keep matrix (every image IN for exactly M/2 shadows). Two arms, each one pipeline per keep row, run by the existing
stage scripts as subprocesses (never imported, so this file holds no copy of their logic):

    synthetic arm: finetune.py --subset-mask ROW -> synthesize.py (x1) -> train_cls.py on the synthetic set
    real arm:      train_cls.py --subset-mask ROW (trained on the IN half directly)

Every shadow gets its own seed (generation and training noise must vary per shadow, else LiRA measures seed effects).
Each shadow classifier is queried on every real training image (eval mode, identity + h-flip) and the logit-scaled
confidence φ = z_y − logsumexp_{j≠y} z_j is kept in float64. Attacks, each leave-one-out over target models and pooled:
online, online fixed variance, offline (one-sided Gaussian CDF test as in Carlini et al.'s Algorithm 1; the reference
code's two-sided logpdf test is `--offline-test two-sided`), offline fixed variance, global threshold.

Inputs: the real training split (--dataset/--data-root), the stage scripts (beside this file; they run in the working
directory, so relative paths mean the same to them as here) and their config (--stage-config, by default the --config
given here: each stage reads its own section of it), extra per-stage flags (--finetune-args etc.).
Outputs (--output-dir, default runs/<dataset>/mia_lira/):
    keep.npy [M, N] bool, masks/shadow_XX.npy (the rows, as --subset-mask files), shadows/<arm>/shadow_XX/{finetune,
    synth,cls}/ (the stage outputs) + scores.npy [N, 2] float64, scores_<arm>.npy [M, N, 2], results.json, results.md,
    roc.png (log-log ROC, both arms), log.txt, manifest.json (written last).
Re-running resumes: a shadow stage whose manifest.json exists is skipped, cached scores are reused.

Commands:
    one GPU:     python mia_lira.py --config configs/in10.yaml --num-shadows 16          (= make mia DATASET=in10)
    multi-GPU:   python mia_lira.py --config configs/in10.yaml --launcher "accelerate launch --num_processes 8"
    job arrays:  python mia_lira.py --config configs/in10.yaml --shard $I/$N   (trains shadows I, I+N, ...; the
                 last job to finish, or any later run, queries and attacks)
    CPU (demo):  python mia_lira.py --config configs/demo.yaml
    attack only: python mia_lira.py --config configs/in10.yaml --scores-from runs/in10/mia_lira \\
                     --offline-test two-sided --output-dir runs/in10/mia_lira_twosided
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import norm

import common

PROJECT_DIR = Path(__file__).resolve().parent  # the stage scripts it launches sit beside it (tests use stand-ins)
STAGE_SCRIPTS = ("finetune.py", "synthesize.py", "train_cls.py")

ARMS = ("synthetic", "real")
ATTACKS = ("online", "online_fixed_variance", "offline", "offline_fixed_variance", "global_threshold")
FPRS = (0.001, 0.01)  # paper / Carlini et al. report TPR at 0.1% FPR; 1% is the common extra
SIGMA_FLOOR = 1e-6  # a shadow set with identical scores has σ = 0 and an infinite likelihood ratio otherwise


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    common.add_run_options(p, "mia_lira", seed_help="global seed (keep matrix, shadow seeds)")
    # Each image is IN for exactly half of the shadows.
    a = p.group("shadow pipelines (paper App. G.4, following Carlini et al.)").add_argument
    a("--num-shadows", type=int, default=16, help="M shadow pipelines per arm (paper: 16; even, >= 4)")
    a("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="which arms to run")
    a("--stage-config", default=None, help="config passed to the stage scripts (default: --config)")
    a("--pretrained-model", default=None, help="generator passed to finetune.py/synthesize.py")
    a("--vg-encoder", default=None, help="visual-guidance image encoder passed to finetune.py")
    a("--captions", default=None, help="captions.jsonl passed to finetune.py/synthesize.py")
    a("--finetune-args", default="", help="extra flags for every finetune.py call (one string)")
    a("--synthesize-args", default="", help="extra flags for every synthesize.py call (one string)")
    a("--train-cls-args", default="", help="extra flags for every train_cls.py call (one string)")
    a = p.group("attacks").add_argument
    a("--scores-from", default=None, help="attack only: reuse this mia_lira dir's keep.npy and scores")
    # The offline test: one-sided Pr[Z < φ], Z ~ N(μ_out, σ_out²) (Carlini et al. Alg. 1), or the reference plot.py's
    # two-sided −log N(φ; μ_out, σ_out²).
    a("--offline-test", default="one-sided", choices=("one-sided", "two-sided"), help="offline LiRA test")
    a("--num-targets", type=int, default=0, help="leave-one-out targets to rotate over (0 = all M)")
    # The shadows' classifiers test on it; the attacks score train images only, so it is no part of this identity.
    common.add_test_split(speed := p.speed_group(), "the real split train_cls.py tests every shadow on")
    a = speed.add_argument
    a("--batch-size", type=common.positive_int, default=256, help="query batch size")
    a("--launcher", default="", help="stage command prefix, e.g. 'accelerate launch --num_processes 8'; '': python")
    a("--shard", type=common.parse_shard, default="0/1", help="i/n: train shadows i, i+n, ...; attacks need all scores")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# LiRA math: pure functions on arrays, tested on synthetic Gaussian scores (tests/test_mia_lira.py).


def check_num_shadows(num_models: int) -> None:
    if num_models < 4 or num_models % 2:
        raise ValueError(
            f"--num-shadows must be even and >= 4 (leave-one-out needs an IN and an OUT shadow per "
            f"image), got {num_models}"
        )


def make_keep_matrix(image_ids: list[str], num_models: int, seed: int) -> np.ndarray:
    """[M, N] bool, each column with exactly M/2 True: image j is IN for the first M/2 models of a permutation seeded
    by (seed, image id), so the matrix is a pure function of the seed and the ids, not of file order."""
    check_num_shadows(num_models)
    keep = np.zeros((num_models, len(image_ids)), dtype=bool)
    for j, image_id in enumerate(image_ids):
        perm = np.random.default_rng(common.item_seed(seed, "lira-keep", image_id)).permutation(num_models)
        keep[perm[: num_models // 2], j] = True
    return keep


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """φ = log(p_y / (1 − p_y)) = z_y − logsumexp_{j≠y} z_j, exactly and in float64 (Carlini et al. §4.3): a float32
    log(p/(1−p)) saturates to ±inf for confident models. logits [..., C], labels broadcastable to logits[..., 0]."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).expand(z.shape[:-1]).unsqueeze(-1)
    z_y = z.gather(-1, y).squeeze(-1)
    others = z.scatter(-1, y, float("-inf"))
    return (z_y - torch.logsumexp(others, dim=-1)).numpy()


def _norm_logpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)


def _in_out_scores(scores: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The IN and the OUT shadows' scores [S, N, A], NaN where a shadow does not count for an example.

    Every example uses the same number of IN (and of OUT) shadows, the smallest over examples, as the reference's
    truncation does: leaving the target out makes members have M/2−1 IN shadows and non-members M/2, and a σ
    estimated from fewer samples is smaller (ddof 0), which on its own pushes members' likelihood ratios down.
    """
    use_in = keep & (np.cumsum(keep, 0) <= keep.sum(0).min())
    use_out = ~keep & (np.cumsum(~keep, 0) <= (~keep).sum(0).min())
    return np.where(use_in[:, :, None], scores, np.nan), np.where(use_out[:, :, None], scores, np.nan)


def lira_attacks(
    shadow_scores: np.ndarray, shadow_keep: np.ndarray, target_scores: np.ndarray, offline_test: str = "one-sided"
) -> dict[str, np.ndarray]:
    """Membership scores of one target model's queries, higher = more likely a member, for every attack.

    shadow_scores [S, N, A] φ of the shadows, shadow_keep [S, N], target_scores [N, A]. Each example needs at least
    one IN and one OUT shadow. Gaussians per example and per query, combined over the A queries by averaging the
    log-likelihoods (independent queries, as in the reference code).
    """
    s_in, s_out = _in_out_scores(shadow_scores, shadow_keep)
    # Per example and query, as the reference code: median and std (ddof 0) of the IN and of the OUT scores.
    mu_in, sd_in = np.nanmedian(s_in, 0), np.nanstd(s_in, 0)
    mu_out, sd_out = np.nanmedian(s_out, 0), np.nanstd(s_out, 0)
    if np.isnan(mu_in).any() or np.isnan(mu_out).any():
        raise ValueError("some example has no IN or no OUT shadow; use a balanced keep matrix with >= 4 models")
    x = target_scores
    floor = lambda s: np.maximum(s, SIGMA_FLOOR)  # noqa: E731
    # Fixed variance: one global σ (reference code: np.std of all IN scores for the online test, of all OUT scores for
    # the offline one), more robust than per-example σ from ~M/2 samples.
    g_in, g_out = floor(np.nanstd(s_in)), floor(np.nanstd(s_out))
    out = {
        "online": (_norm_logpdf(x, mu_in, floor(sd_in)) - _norm_logpdf(x, mu_out, floor(sd_out))).mean(-1),
        "online_fixed_variance": (_norm_logpdf(x, mu_in, g_in) - _norm_logpdf(x, mu_out, g_in)).mean(-1),
        "global_threshold": x.mean(-1),
    }
    for name, sd in (("offline", floor(sd_out)), ("offline_fixed_variance", g_out)):
        if offline_test == "one-sided":  # log Pr[Z < φ]: only unusually *high* confidence points to membership
            out[name] = norm.logcdf(x, mu_out, sd).mean(-1)
        elif offline_test == "two-sided":  # reference plot.py: unlikely under OUT in either direction
            out[name] = -_norm_logpdf(x, mu_out, sd).mean(-1)
        else:
            raise ValueError(f"unknown offline test {offline_test!r}; choose one-sided or two-sided")
    return out


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); higher score = predicted member."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError("the ROC needs both members and non-members")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, y = np.asarray(scores)[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # thresholds between distinct scores only
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    return np.r_[0.0, fp / (~labels).sum()], np.r_[0.0, tp / labels.sum()]


def roc_metrics(labels: np.ndarray, scores: np.ndarray, fprs=FPRS) -> dict:
    """AUC, balanced accuracy at the best threshold, TPR at each low FPR (strictly below it, as the reference code),
    and the number of non-members behind each figure (TPR@0.1% with 5k non-members rests on < 5 false positives)."""
    fpr, tpr = roc_curve(labels, scores)
    n_neg = int((~np.asarray(labels, dtype=bool)).sum())
    result = {
        "auc": float(np.trapezoid(tpr, fpr)),
        "balanced_accuracy": float(np.max(1 - (fpr + 1 - tpr) / 2)),
        "num_members": int(len(labels) - n_neg),
        "num_nonmembers": n_neg,
    }
    for level in fprs:
        result[f"tpr_at_{level:g}_fpr"] = float(tpr[fpr < level].max())
        result[f"false_positives_at_{level:g}_fpr"] = int(np.ceil(level * n_neg) - 1)  # most FPs allowed below it
    return result


def evaluate_attacks(scores: np.ndarray, keep: np.ndarray, targets, offline_test: str = "one-sided"):
    """Leave-one-out: each target model in turn, the other M−1 as shadows; membership from the target's keep row.
    Returns {attack: metrics on the pooled (score, label) pairs of all targets, + per-target AUC mean/std} and
    {attack: (labels, scores)} for the ROC plot."""
    pooled: dict[str, list] = {a: [] for a in ATTACKS}
    per_target: dict[str, list] = {a: [] for a in ATTACKS}
    for t in targets:
        shadows = np.arange(len(scores)) != t
        for name, pred in lira_attacks(scores[shadows], keep[shadows], scores[t], offline_test).items():
            pooled[name].append(pred)
            per_target[name].append(roc_metrics(keep[t], pred)["auc"])
    labels = np.concatenate([keep[t] for t in targets])
    results, curves = {}, {}
    for name in ATTACKS:
        preds = np.concatenate(pooled[name])
        results[name] = {
            **roc_metrics(labels, preds),
            "auc_per_target_mean": float(np.mean(per_target[name])),
            "auc_per_target_std": float(np.std(per_target[name])),
            "num_targets": len(targets),
        }
        curves[name] = (labels, preds)
    return results, curves


# ----------------------------------------------------------------------------------------------------------------------
# Shadow pipelines: the stage scripts as subprocesses, one per keep row; a stage whose manifest.json exists is skipped.

# The stage scripts' flags this file relies on, beyond the shared ones (--config --dataset --data-root --seed
# --output-dir --subset-mask); named once here so a renamed flag is a one-line change.
SYNTH_FINETUNE_DIR = "--lora-dir"  # synthesize.py: the finetune.py output (LoRA + visual tokens)
SYNTH_SCALE = "--scale"  # synthesize.py: synthetic images per real image (paper §4.5: an equal amount, x1)
CLS_TRAIN_DIRS = "--train-dirs"  # train_cls.py: 'real' (the train split) and/or synthesize.py output dirs


def shadow_seed(seed: int, shadow: int) -> int:
    """Each shadow's own seed (generation and training noise must differ between shadows, eval-and-privacy §2.6)."""
    return common.item_seed(seed, "lira-shadow", shadow) % (1 << 31)


def stage_command(args, script: str, out_dir: Path, seed: int, mask: Path | None, extra: list[str]) -> list[str]:
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    cmd = [*launcher, str(PROJECT_DIR / script)]
    if args.stage_config:
        cmd += ["--config", str(args.stage_config)]
    # No --data-root when none was given: each stage finds the dataset as this one did (configs/paths.yaml, $ROOT).
    cmd += ["--dataset", args.dataset, *optional("--data-root", args.data_root), "--seed", str(seed)]
    return cmd + ["--output-dir", str(out_dir), *optional("--subset-mask", mask), *extra]


def optional(flag: str, value) -> list[str]:
    return [flag, str(value)] if value is not None else []


def shadow_stages(args, arm: str, shadow: int, shadow_dir: Path, mask: Path) -> list[tuple[Path, list[str]]]:
    """The (output dir, command) of each stage of one shadow pipeline, in order."""
    seed, split = shadow_seed(args.seed, shadow), shlex.split
    ft_dir, synth_dir, cls_dir = shadow_dir / "finetune", shadow_dir / "synth", shadow_dir / "cls"
    if arm == "real":
        stages, cls_mask, train_dirs = [], mask, "real"
    else:
        generator = optional("--pretrained-model", args.pretrained_model) + optional("--captions", args.captions)
        ft_extra = [*generator, *optional("--vg-encoder", args.vg_encoder), *split(args.finetune_args)]
        synth_extra = [*generator, SYNTH_FINETUNE_DIR, str(ft_dir), SYNTH_SCALE, "1", *split(args.synthesize_args)]
        stages = [(ft_dir, "finetune.py", mask, ft_extra), (synth_dir, "synthesize.py", mask, synth_extra)]
        cls_mask, train_dirs = None, str(synth_dir)
    # Passed only when named: at held-out, train_cls's own --config (a separate --stage-config) may name the split.
    test_split = optional("--test-split", args.test_split if args.test_split != common.HELD_OUT else None)
    cls_extra = [CLS_TRAIN_DIRS, train_dirs, *test_split, *split(args.train_cls_args)]
    stages.append((cls_dir, "train_cls.py", cls_mask, cls_extra))
    return [(out_dir, stage_command(args, script, out_dir, seed, m, extra)) for out_dir, script, m, extra in stages]


def run_shadow(args, arm: str, shadow: int, shadow_dir: Path, mask: Path, log) -> None:
    for out_dir, cmd in shadow_stages(args, arm, shadow, shadow_dir, mask):
        if (out_dir / "manifest.json").is_file():
            continue  # finished earlier: resuming the experiment skips it
        log.info("%s shadow %d: %s", arm, shadow, shlex.join(cmd))
        # In the caller's working directory: the paths given here (outputs, masks, data, configs) are relative to it.
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(
                f"{arm} shadow {shadow} failed in `{shlex.join(cmd)}` (its log is in {out_dir}); fix "
                f"the cause and re-run mia_lira.py: finished stages and shadows are skipped"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Queries: each shadow classifier on every real training image, eval mode, identity + h-flip, φ in float64.


def load_shadow_classifier(cls_dir: Path, classes: list[str], device: torch.device):
    """A shadow classifier (eval mode) and its eval transform, after checking its label order matches the dataset's."""
    model, transform, info = common.load_classifier(cls_dir, device)
    if list(info["classes"]) != list(classes):  # φ needs the true label's logit: the label orders must agree
        raise ValueError(
            f"{cls_dir}: classifier classes {info['classes'][:5]}... differ from the dataset's "
            f"{classes[:5]}...; the shadow was trained on another label order"
        )
    return model, transform


@torch.no_grad()
def query_scores(model, transform, index, args, device, desc: str) -> np.ndarray:
    """[N, 2] float64 φ for the identity and the mirrored view of every image, in index order."""
    images = common.ImageFiles([index.abspath(i) for i in range(len(index))], transform)
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    labels = np.array([s.label for s in index.samples])
    scores = []
    for positions, x in common.progress(loader, desc=desc, leave=False):
        x = x.to(device)
        logits = torch.stack([model(x), model(torch.flip(x, dims=[3]))], dim=1)  # [B, 2, C]
        scores.append(logit_scaled_confidence(logits.double().cpu(), labels[positions.numpy(), None]))
    return np.concatenate(scores)


def require_stage_scripts() -> None:
    """Checked before any shadow starts: a mia_lira.py copied without its stages fails at once, not mid-experiment."""
    if missing := [name for name in STAGE_SCRIPTS if not (PROJECT_DIR / name).is_file()]:
        raise FileNotFoundError(
            f"mia_lira.py runs the stage scripts beside it, and {PROJECT_DIR} lacks {', '.join(missing)}: copy "
            f"{', '.join(STAGE_SCRIPTS)} (and common.py) there with it"
        )


def save_npy(path: Path, array: np.ndarray) -> None:
    with common.atomic_path(path) as tmp:
        np.save(tmp, array)


# ----------------------------------------------------------------------------------------------------------------------
# The experiment, the report, main.


def stage_config_hash(path) -> str | None:
    """Hash of the stage config less the sections of the stages no shadow runs (caption, eval_ood, mia_lira,
    sscd_sim), so editing what the shadows read is a config change here too (a finished shadow is skipped without
    asking its stage script). The eval_gap and demo sections count as well, though no shadow reads them."""
    if path is None:
        return None
    data = yaml.safe_load(Path(path).read_text()) or {}
    return common.config_hash(
        {k: v for k, v in data.items() if k not in ("caption", "eval_ood", "mia_lira", "sscd_sim")}
    )


def prepare_keep(out: Path, index, args) -> np.ndarray:
    """keep.npy + one --subset-mask file per shadow; an existing keep.npy must match (it defines every shadow)."""
    keep = make_keep_matrix([index.image_id(i) for i in range(len(index))], args.num_shadows, args.seed)
    if (out / "keep.npy").is_file() and not np.array_equal(np.load(out / "keep.npy"), keep):
        raise RuntimeError(
            f"{out}/keep.npy differs from the one this config defines (did the dataset change?); "
            f"use another --output-dir or --overwrite"
        )
    save_npy(out / "keep.npy", keep)
    for s, row in enumerate(keep):
        save_npy(out / "masks" / f"shadow_{s:02d}.npy", row)
    return keep


def collect_scores(args, out: Path, arm: str, index, log) -> np.ndarray | None:
    """[M, N, 2] φ of every shadow of the arm, querying (and caching) those not yet scored; None if a shadow of
    the arm is not trained yet (another --shard job is still on it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dirs = [out / "shadows" / arm / f"shadow_{s:02d}" for s in range(args.num_shadows)]
    if not all((d / "cls" / "manifest.json").is_file() for d in dirs):
        return None
    scores = []
    for s, d in enumerate(dirs):
        if not (d / "scores.npy").is_file():
            model, transform = load_shadow_classifier(d / "cls", index.classes, device)
            save_npy(d / "scores.npy", query_scores(model, transform, index, args, device, f"query {arm} {s}"))
            log.info("%s shadow %d: scored %d images", arm, s, len(index))
        scores.append(np.load(d / "scores.npy"))
    return np.stack(scores)


def write_report(out: Path, results: dict, curves: dict, offline_test: str) -> None:
    lines = [
        f"LiRA membership inference (offline test: {offline_test}; pooled leave-one-out targets)",
        "",
        "| arm | attack | AUC | bal. acc. | TPR@0.1%FPR | TPR@1%FPR | non-members | targets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, attacks in results.items():
        for name, m in attacks.items():
            lines.append(
                f"| {arm} | {name} | {m['auc']:.4f} | {m['balanced_accuracy']:.4f} | "
                f"{m['tpr_at_0.001_fpr']:.4f} | {m['tpr_at_0.01_fpr']:.4f} | {m['num_nonmembers']} | "
                f"{m['num_targets']} |"
            )
    with common.atomic_write(out / "results.md") as f:
        f.write("\n".join(lines) + "\n")
    common.write_json(out / "results.json", results)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(4 * len(ATTACKS), 4), squeeze=False)
    for ax, name in zip(axes[0], ATTACKS):
        lowest = 1.0
        for arm, arm_curves in curves.items():
            fpr, tpr = roc_curve(*arm_curves[name])
            lowest = min(lowest, 1 / max(1, results[arm][name]["num_nonmembers"]))
            ax.loglog(fpr, tpr, label=f"{arm} (AUC {results[arm][name]['auc']:.3f})")
        ax.loglog([lowest, 1], [lowest, 1], "k--", lw=0.8)  # chance
        ax.set(xlim=(lowest / 2, 1), ylim=(lowest / 2, 1), xlabel="FPR", ylabel="TPR", title=name)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with common.atomic_path(out / "roc.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def shadow_scores(args, out: Path, log) -> tuple[np.ndarray, dict | None]:
    """(keep matrix, per-arm scores): from --scores-from, or by running this job's shadows; scores None while
    other --shard jobs' shadows are unfinished."""
    if args.scores_from:  # attack-only: reuse a finished experiment's scores
        src = Path(args.scores_from)
        return np.load(src / "keep.npy"), {arm: np.load(src / f"scores_{arm}.npy") for arm in args.arms}
    index = common.load_dataset(args.dataset, args.data_root, "train")
    keep = prepare_keep(out, index, args)
    shard_index, shard_count = args.shard
    for arm in args.arms:
        for s in range(shard_index, args.num_shadows, shard_count):
            mask = out / "masks" / f"shadow_{s:02d}.npy"
            run_shadow(args, arm, s, out / "shadows" / arm / f"shadow_{s:02d}", mask, log)
    scores = {arm: collect_scores(args, out, arm, index, log) for arm in args.arms}
    if any(v is None for v in scores.values()):
        return keep, None
    for arm, arm_scores in scores.items():
        save_npy(out / f"scores_{arm}.npy", arm_scores)
    return keep, scores


def attack(args, keep: np.ndarray, scores: dict, log) -> tuple[dict, dict]:
    """Every attack on every arm's scores, over the first --num-targets target models (all when <= 0)."""
    targets = range(len(keep)) if args.num_targets <= 0 else range(min(args.num_targets, len(keep)))
    results, curves = {}, {}
    for arm, arm_scores in scores.items():
        if arm_scores.shape[:2] != keep.shape:
            raise ValueError(f"scores_{arm} has shape {arm_scores.shape}, keep.npy {keep.shape}: not one experiment")
        results[arm], curves[arm] = evaluate_attacks(arm_scores, keep, list(targets), args.offline_test)
        for name, m in results[arm].items():
            log.info(
                f"{arm:9s} {name:23s} AUC {m['auc']:.4f}  bal.acc {m['balanced_accuracy']:.4f}  TPR@0.1%FPR "
                f"{m['tpr_at_0.001_fpr']:.4f}  TPR@1%FPR {m['tpr_at_0.01_fpr']:.4f}  "
                f"({m['num_nonmembers']} non-members)"
            )
    return results, curves


def main(argv=None) -> dict:
    args = common.parse_args(get_parser(), argv, "mia_lira")
    out = common.output_dir(args, "mia_lira")
    args.stage_config = args.stage_config or args.config
    config = common.config_dict(args)
    config["stage_config_hash"] = stage_config_hash(args.stage_config) if not args.scores_from else None
    if args.scores_from and not (Path(args.scores_from) / "keep.npy").is_file():
        raise FileNotFoundError(f"--scores-from {args.scores_from}: no keep.npy there (not a mia_lira.py output)")
    if not args.scores_from:
        check_num_shadows(args.num_shadows)
        require_stage_scripts()
        common.load_dataset(args.dataset, args.data_root, "train")
    run = common.RunDir(out, config, args.overwrite, part=args.shard)
    if run.start() == "done":
        return run.manifest()["metrics"]
    log = common.get_logger(out)

    keep, scores = shadow_scores(args, out, log)
    if scores is None:
        log.info("shadows of other --shard jobs are not finished; re-run (any shard) once they are to attack")
        return {"status": "partial"}
    if len(keep) < 8:
        log.warning(
            f"{len(keep)} shadows: per-example σ rests on {len(keep) // 2 - 1} sample(s) per side; read the "
            "fixed-variance rows"
        )
    results, curves = attack(args, keep, scores, log)
    run.check_in_place()
    write_report(out, results, curves, args.offline_test)
    inputs = {"scores_from": args.scores_from, "num_images": int(keep.shape[1])}
    return run.finish(results, inputs)["metrics"]


if __name__ == "__main__":
    main()
