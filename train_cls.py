"""Train an image classifier (ResNet-50 by default) on real, synthetic, or real+synthetic images (paper App. F, Tab. 8).

Every accuracy in the paper comes from this stage: a timm model trained from scratch (IN-10/100/1K, EuroSAT) or from
ImageNet weights (CUB, Cars, Pets) on the images named by `--train-dirs`, then top-1/top-5 on the *real* test split.
`--train-dirs real` is the dataset's own train split (read by common.load_dataset), any other entry is a synthesize.py
output (classes.json + manifest.jsonl), so real-only, synthetic-only and real+synthetic runs are one flag apart.
Labels always follow the dataset's class list; a synthetic set with other classes is an error.

Inputs : --dataset/--data-root (real train + test split), --train-dirs, optional --subset-mask (LiRA shadows).
Outputs: <output-dir>/ (default runs/<dataset>/cls_<name>: real | <synth dir> | mix_x<N> for real + synth_x<N>)
           model.safetensors   timm state_dict (`model.load_state_dict(safetensors.torch.load_file(...))`)
           classes.json        {"classes": [...], "class_names": [...]} in label order
           metrics.jsonl       one row per epoch (loss, lr, top1, top5, img/s, data-wait fraction)
           checkpoints/        accelerate state of the last epoch(s); a re-run of the same command resumes
           manifest.json       written last: config, metrics (top1/top5 on the real test split) and a "classifier"
                               entry (timm model and kwargs, weights, eval transform, classes) from which
                               common.load_classifier rebuilds the model for eval_ood.py and mia_lira.py

Commands (the Tab. 8 recipe comes from the dataset's YAML section; any flag overrides it):
  one GPU : python train_cls.py --config configs/in10.yaml --data-root /data/imagenet \\
                --train-dirs real runs/in10/synth_x1
  8 GPUs  : accelerate launch --multi_gpu --num_processes 8 train_cls.py --config configs/in10.yaml ...
  CPU     : python train_cls.py --config configs/demo.yaml --train-dirs real
  speed   : python bench.py train --model resnet50 --fake-data 12288 --fake-size 400 --batch-size 256 \\
                --max-device-batch 256   (GPU, as make bench-gpu; make bench-train is the CPU-sized one)

Recipes: `--recipe paper` (default) is Tab. 8, the defaults `--help` lists; `--recipe release` adds what the authors'
timm 0.9.2 run did for IN-10/100 beyond Tab. 8 (timm defaults the table does not list). IN-1K's is configs/in1k.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2
from timm.utils import distribute_bn

import common

AUTOCAST_ON_GPU = "bf16"  # --mixed-precision auto on a GPU
RELEASE_RECIPE = {"opt": "sgd", "warmup_epochs": 5, "smoothing": 0.1, "color_jitter": 0.4}  # timm "sgd" = Nesterov


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    common.add_run_options(p, "cls_<name>", seed_help="training seed", workers=8, resume=True, data_fingerprinted=True)
    a = (data := p.group("data")).add_argument
    common.add_test_split(data, "the real test split")
    a("--train-dirs", nargs="+", default=["real"], hashed=False, help="'real' (the train split), synthesize.py outputs")
    a("--subset-mask", default=None, help=".npy bool mask over the real train split (LiRA shadows)")
    common.add_skip_bad(p, "the manifest (train and test images)")
    a = p.group("model (Tab. 8: ResNet-50; from scratch, ImageNet weights for CUB/Cars/Pets)").add_argument
    a("--model", default="resnet50", help="any timm model name")
    a("--pretrained", action="store_true", help="start from timm's ImageNet weights")
    a("--pretrained-file", default=None, help="local weights file for --pretrained (offline)")
    a("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="more timm.create_model args")
    a("--drop-path", type=float, default=0.0, help="stochastic depth (Tab. 8: 0.05 for IN-1K)")
    a("--input-size", type=int, default=224, help="train = test resolution (Tab. 8: 224 or 448)")
    a("--crop-pct", type=float, default=None, help="eval crop fraction (default: the model's, 0.95)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format (GPU speed)")
    a = p.group("optimisation (Tab. 8)").add_argument
    release = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in RELEASE_RECIPE.items())
    a("--recipe", choices=["paper", "release"], default="paper", help=f"release: {release} (where still at Tab. 8's)")
    a("--epochs", type=common.positive_int, default=200, help="training epochs")
    a("--batch-size", type=common.positive_int, default=1024, help="GLOBAL batch (Tab. 8: 128 x 8 GPUs)")
    a("--max-device-batch", type=common.positive_int, default=128, help="largest micro-batch per process")
    a("--opt", default="momentum", help="timm optimizer: momentum (SGD, paper), sgd (Nesterov), lamb")
    a("--lr", type=float, default=0.1, help="peak learning rate (after any warmup)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=5e-4, help="weight decay")
    a("--sched", default="multistep", help="timm scheduler: multistep (paper), cosine (IN-1K)")
    a("--decay-milestones", type=int, nargs="+", default=[50, 100, 150], help="multistep: epochs the lr drops at")
    a("--decay-rate", type=float, default=0.2, help="multistep: lr factor at each milestone")
    a("--warmup-epochs", type=int, default=0, help="linear warmup epochs (timm steps it per epoch)")
    a("--warmup-lr", type=float, default=1e-5, help="lr the warmup starts from")
    a("--min-lr", type=float, default=0.0, help="lr floor of the schedule")
    a = p.group("augmentation and loss (Tab. 8; IN-1K adds RandAugment, mixup, cutmix, BCE)").add_argument
    a("--scale", type=float, nargs=2, default=[0.08, 1.0], help="random-resized-crop area range")
    a("--hflip", type=float, default=0.5, help="horizontal-flip probability")
    a("--color-jitter", type=float, default=0.0, help="colour-jitter strength")
    a("--aa", default=None, help="timm auto-augment string, e.g. rand-m7-mstd0.5 (IN-1K)")
    a("--train-interpolation", default="random", help="release (timm) default; paper silent")
    a("--smoothing", type=float, default=0.0, help="label smoothing")
    a("--mixup", type=float, default=0.0, help="mixup alpha (IN-1K: 0.2)")
    a("--cutmix", type=float, default=0.0, help="cutmix alpha (IN-1K: 1.0)")
    a("--bce-loss", action="store_true", help="binary cross-entropy (IN-1K)")
    common.add_mixed_precision(p.group("system"), AUTOCAST_ON_GPU)
    a = p.speed_group().add_argument
    a("--name", default=None, help="run name for the default output dir (default: from --train-dirs)")
    a("--epochs-per-job", type=int, default=None, help="stop after N epochs (time-limited jobs)")
    a("--eval-every", type=int, default=1, help="evaluate on the test split every N epochs")
    a("--keep-checkpoints", type=int, default=1, help="newest epoch checkpoints kept")
    return p


def apply_recipe(args: argparse.Namespace, parser: common.StageParser) -> None:
    if args.recipe == "release":
        for key, value in RELEASE_RECIPE.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)


# ----------------------------------------------------------------------------------------------------------------------
# Data


class ImageList(torch.utils.data.Dataset):
    """(path, label) pairs. Training keys are (epoch, i): each image's augmentation is seeded by (seed, epoch, i), so it
    does not depend on worker count, world size or a resume (timm's transforms draw from the global RNGs)."""

    def __init__(self, paths, labels, transform, seed: int = 0, jpegs: list[bytes] | None = None):
        self.paths, self.labels, self.transform, self.seed, self.jpegs = paths, labels, transform, seed, jpegs

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            epoch, i = key
            common.seed_everything(common.item_seed(self.seed, "augment", epoch, i))
        else:
            i = key
        img = common.load_image(io.BytesIO(self.jpegs[i]) if self.jpegs is not None else self.paths[i])
        return self.transform(img), self.labels[i]


def load_train_sources(args, test_classes: list[str]) -> tuple[list, list, dict]:
    """Paths and labels of every --train-dirs source, relabelled to the test split's class order."""
    paths, labels, inputs = [], [], {}
    named = ["real" if is_real_source(s, args.data_root) else str(Path(s).resolve()) for s in args.train_dirs]
    if len(set(named)) < len(named):  # its images would count twice, and the real:synthetic ratio change unseen
        raise ValueError(f"--train-dirs names one source twice: {args.train_dirs} ('real' is the --data-root)")
    for source in args.train_dirs:
        if is_real_source(source, args.data_root):
            index = common.load_dataset(args.dataset, args.data_root, "train")
            if args.subset_mask:
                index = index.subset(common.load_subset_mask(args.subset_mask, len(index)))
            index, bad, identity = common.check_images(index, args.skip_bad)
        else:  # synthesize.py wrote each file atomically: no decode of up to 12.8 M files
            index, bad = common.load_synthetic(source), {}
            identity = common.split_fingerprint(index)
        if sorted(index.classes) != sorted(test_classes):
            extra = sorted(set(index.classes) - set(test_classes))
            missing = sorted(set(test_classes) - set(index.classes))
            raise ValueError(
                f"training source {source} has other classes than the {args.dataset} {args.test_split} split: "
                f"not in {args.test_split} {extra[:5]}, missing {missing[:5]}. Give both splits the same class "
                f"folders (or class list); a synthetic set must come from this dataset's train split."
            )
        # A source may list the same classes in another order: map by class id, never by position or folder sort.
        remap = [test_classes.index(c) for c in index.classes]
        paths += [index.abspath(i) for i in range(len(index))]
        labels += [remap[s.label] for s in index.samples]
        inputs[source] = {"images": len(index), "fingerprint": identity, "skipped_bad": bad}
    real = [inputs[s]["fingerprint"] for s in args.train_dirs if is_real_source(s, args.data_root)]
    for source in args.train_dirs:
        if real and not is_real_source(source, args.data_root):
            common.warn_if_made_from_other_data(source, real[0])
    if args.subset_mask and not real:
        raise ValueError("--subset-mask selects images of the real train split, but --train-dirs has no 'real'")
    if empty := [c for c, n in zip(test_classes, np.bincount(labels, minlength=len(test_classes))) if n == 0]:
        raise ValueError(
            f"no training image of class(es) {empty[:5]} in {args.train_dirs} (--skip-bad or --subset-mask may have "
            "left none, or a fractional --scale gave the class no synthetic copy): a classifier cannot learn them"
        )
    return paths, labels, inputs


def is_real_source(source: str, data_root) -> bool:
    return source == "real" or (data_root is not None and Path(source).resolve() == Path(data_root).resolve())


class EpochBatches:
    """Micro-batches of (epoch, index) keys for this process, epoch after epoch, for one long-lived DataLoader.

    Each step takes the next `batch` images of a per-epoch permutation seeded by (seed, epoch) and cuts them into
    world × accum micro-batches; process r runs micro-batches r·accum ... r·accum + accum − 1. So any split of one
    global batch (8 GPUs, or 1 GPU accumulating 8) trains on the same micro-batches: same BatchNorm statistics, and
    seeded by `global_micro`, the same mixup draws. The last incomplete global batch is dropped (as timm does).
    """

    def __init__(
        self, n: int, batch: int, seed: int, epochs: range, rank: int, world: int, accum: int, *, max_steps=None
    ):
        self.n, self.batch, self.seed, self.rank, self.world, self.accum = n, batch, seed, rank, world, accum
        self.epochs = epochs
        self.steps = min(n // batch, max_steps or n)

    def __len__(self):
        return len(self.epochs) * self.steps * self.accum

    def __iter__(self):
        for epoch in self.epochs:
            order = common.epoch_order(self.n, self.seed, "order", epoch)
            micro = self.batch // (self.world * self.accum)
            for s in range(self.steps):
                step = order[s * self.batch : (s + 1) * self.batch].tolist()
                for a in range(self.accum):
                    c = self.rank * self.accum + a
                    yield [(epoch, i) for i in step[c * micro : (c + 1) * micro]]


def global_micro(m: int, rank: int, world: int, accum: int) -> int:
    """Process `rank`'s m-th micro-batch of an epoch, numbered as in EpochBatches for all processes together."""
    return (m // accum) * world * accum + rank * accum + m % accum


# ----------------------------------------------------------------------------------------------------------------------
# Model, optimisation, loss: timm's factories, configured from the flags


def model_kwargs(args) -> dict:
    """--model-kwargs output_stride=8 -> {"output_stride": 8} (values parsed as YAML scalars)."""
    pairs = [kv.split("=", 1) for kv in args.model_kwargs]
    if any(len(kv) != 2 for kv in pairs):
        raise ValueError(f"--model-kwargs takes KEY=VALUE pairs, got {args.model_kwargs}")
    return {k: yaml.safe_load(v) for k, v in pairs}


def build_model(args, num_classes: int):
    kwargs = {**model_kwargs(args), "num_classes": num_classes, "drop_path_rate": args.drop_path or None}
    if args.pretrained and args.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(args.pretrained_file)}
    try:
        return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if args.pretrained and not args.pretrained_file:
            raise RuntimeError(
                f"could not fetch ImageNet weights for {args.model} ({err}); when offline, pass "
                f"--pretrained-file PATH (a timm .safetensors/.pth checkpoint)"
            ) from err
        raise


def eval_transform_cfg(args, model) -> dict:
    """The eval transform as `timm.data.create_transform` kwargs: the model's defaults at --input-size (recorded in
    the manifest so that eval_ood.py and mia_lira.py see images exactly as the test split did)."""
    cfg = resolve_data_config({"input_size": (3, args.input_size, args.input_size)}, model=model)
    if args.crop_pct is not None:
        cfg["crop_pct"] = args.crop_pct
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def build_transforms(args, eval_cfg: dict):
    train = create_transform(
        eval_cfg["input_size"],
        is_training=True,
        scale=tuple(args.scale),
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=eval_cfg["mean"],
        std=eval_cfg["std"],
    )
    return train, create_transform(**eval_cfg, is_training=False)


def build_loss(args, num_classes: int):
    """timm's train.py choice: mixup -> soft targets (BCE or CE); else label smoothing; else plain CE."""
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=num_classes
        )
        return mixup, (BinaryCrossEntropy(smoothing=0.0) if args.bce_loss else SoftTargetCrossEntropy())
    if args.bce_loss:
        return None, BinaryCrossEntropy(smoothing=args.smoothing)
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()


def accumulation_steps(batch: int, world: int, max_device: int) -> int:
    """Smallest number of micro-batches per step that keeps each at most `max_device` and divides the batch evenly."""
    if batch % world:
        raise ValueError(f"--batch-size {batch} is not divisible by the {world} processes")
    accum = max(1, math.ceil(batch / (world * max_device)))
    while (batch // world) % accum:
        accum += 1
    return accum


# ----------------------------------------------------------------------------------------------------------------------
# Train and evaluate


@dataclasses.dataclass
class Training:
    """What a training step needs, prepared by accelerate; `accum` micro-batches make one optimizer step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: torch.nn.Module
    mixup: Any
    accelerator: Any
    accum: int


def train_steps(t: Training, batches_iter, n_micro: int, args, epoch: int, num_updates: int):
    """Run `n_micro` micro-batches (n_micro / accum optimizer steps). Returns loss, images, seconds, data-wait s."""
    model, optimizer, accelerator = t.model, t.optimizer, t.accelerator
    model.train()
    device, total_loss, images, wait = accelerator.device, 0.0, 0, 0.0
    start = time.perf_counter()
    for m in common.progress(range(n_micro), accelerator.is_main_process, desc=f"epoch {epoch + 1}", leave=False):
        t0 = time.perf_counter()
        x, y = next(batches_iter)
        wait += time.perf_counter() - t0
        x = x.to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last) if args.channels_last else x
        y = y.to(device, non_blocking=True)
        # mixup (numpy RNG) and drop-path (torch RNG) seeded per micro-batch of the global batch: identical after a
        # resume and for any world size x accumulation split
        micro = global_micro(m, accelerator.process_index, accelerator.num_processes, t.accum)
        s = common.item_seed(args.seed, "step", epoch, micro)
        torch.manual_seed(s)
        np.random.seed(s % (1 << 32))
        if t.mixup is not None:
            x, y = t.mixup(x, y)
        with accelerator.accumulate(model):  # the prepared optimizer steps only on the accum-th micro-batch
            with accelerator.autocast():
                loss = t.criterion(model(x), y)
            accelerator.backward(loss)  # divided by accum inside
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            num_updates += 1
            t.scheduler.step_update(num_updates)
        total_loss += loss.item() * len(x)
        images += len(x)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(images, 1), "images": images, "seconds": seconds, "data_wait": wait}, num_updates


@torch.no_grad()
def evaluate(model, index, transform, accelerator, args) -> dict:
    """Top-1/top-5 on `index`, each process taking every world-th image; counts summed over processes."""
    model.eval()
    device = accelerator.device
    ids = list(range(accelerator.process_index, len(index), accelerator.num_processes))
    data = ImageList([str(index.abspath(i)) for i in ids], [index.samples[i].label for i in ids], transform)
    loader = torch.utils.data.DataLoader(data, batch_size=args.max_device_batch, num_workers=args.workers)
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    for x, y in loader:
        x = x.to(device)
        with accelerator.autocast():
            logits = model(x.contiguous(memory_format=torch.channels_last) if args.channels_last else x).float()
        counts += torch.tensor([*common.top_hits(logits.cpu(), y), len(y)], dtype=torch.float64, device=device)
    counts = accelerator.reduce(counts, reduction="sum")
    return {"top1": 100.0 * counts[0].item() / counts[2].item(), "top5": 100.0 * counts[1].item() / counts[2].item()}


def default_name(train_dirs: list[str]) -> str:
    """The run name the Makefile and README use: real, synth_x<N>, mix_x<N> (real + synth_x<N>), else a+b+..."""
    names = ["real" if d == "real" else Path(d).name for d in train_dirs]
    if len(names) == 2 and names[0] == "real" and names[1].startswith("synth_"):
        return "mix_" + names[1].removeprefix("synth_")
    return "+".join(names)


def epoch_loader(train_set, args, rank: int, world: int, accum: int, epochs: range, *, max_steps=None):
    """(batch sampler, iterator) over `epochs`: one DataLoader for them all, so workers persist."""
    batches = EpochBatches(len(train_set), args.batch_size, args.seed, epochs, rank, world, accum, max_steps=max_steps)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=batches,
        num_workers=args.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    return batches, iter(loader)


def resume(accelerator, scheduler, args, run: common.RunDir, log) -> tuple[int, list]:
    """(epochs done, their metrics rows). Model, optimizer and scaler come from the last checkpoint; the schedule
    and the data are functions of the epoch, so they are set, not restored."""
    latest, start_epoch = common.starting_checkpoint(run, args.resume)
    rows, metrics_path = [], run.path / "metrics.jsonl"
    if latest:
        accelerator.load_state(str(latest))
        log.info(f"resumed from {latest} ({start_epoch} epochs done)")
        if metrics_path.is_file():
            rows = [r for r in common.read_jsonl(metrics_path) if r["epoch"] <= start_epoch]
    scheduler.step(start_epoch)
    return start_epoch, rows


def make_accelerator(args):
    amp = common.resolve_mixed_precision(args.mixed_precision, AUTOCAST_ON_GPU)
    return Accelerator(mixed_precision=amp, cpu=not torch.cuda.is_available())  # torchrun on CPUs: one group


def prepare_training(args, accelerator, model, num_classes: int, steps_per_epoch: int) -> Training:
    """timm's optimizer and scheduler (warmup and decay stepped per epoch) from the recipe's flags, loss and mixup for
    `model`, prepared by accelerate; the micro-batches per step."""
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    accum = accumulation_steps(args.batch_size, accelerator.num_processes, args.max_device_batch)
    accelerator.gradient_accumulation_steps = accum
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(args))
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.epochs,
        decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        updates_per_epoch=steps_per_epoch,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    mixup, criterion = build_loss(args, num_classes)
    return Training(model, optimizer, scheduler, criterion, mixup, accelerator, accum)


def parse_args_with_recipe(parser, argv, require_data: bool = True):
    args = common.parse_args(parser, argv, "train_cls")
    apply_recipe(args, parser)
    if require_data and args.dataset is None:  # its root, if not given, as every stage: common.load_dataset
        parser.error("--dataset is required (or a --config that sets it)")
    return args


def finish(run, model, args, test_index, eval_cfg, metrics, inputs) -> dict:
    """Final weights (plain timm state_dict), classes.json and the manifest that makes the run self-describing."""
    classes, class_names = test_index.classes, test_index.class_names
    run.check_in_place()
    if run.is_main:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with common.atomic_path(run.path / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        common.write_json(run.path / "classes.json", {"classes": classes, "class_names": class_names})
    classifier = {
        "model": args.model,
        "num_classes": len(classes),
        "model_kwargs": model_kwargs(args),
        "weights": "model.safetensors",
        "eval_transform": eval_cfg,
        "classes": classes,
        "class_names": class_names,
    }
    metrics = {**metrics, "epochs": args.epochs}
    run.finish(metrics, inputs=inputs, extra={"classifier": classifier})
    return metrics


def retest_if_changed(run, model, tested: dict, evaluate_test) -> dict:
    """A finished run's figures; if its held-out split changed since it was tested (`tested`: the split now), its
    weights are tested again on it (training never read that split, so nothing else is redone). A run that recorded
    no fingerprint of it (made before they were recorded) is taken as it is."""
    manifest = run.manifest()
    if manifest["inputs"].get("test_split", {}).get("fingerprint") in (None, tested["fingerprint"]):
        return manifest["metrics"]
    run.write_again()
    model.load_state_dict(load_file(run.path / "model.safetensors"))
    metrics = {**manifest["metrics"], **evaluate_test()}
    if run.is_main:
        print(f"{run.path}: the {tested['split']} split changed since this run was tested; tested again: {metrics}")
    run.finish(
        metrics, inputs={**manifest["inputs"], "test_split": tested}, extra={"classifier": manifest["classifier"]}
    )
    return metrics


def run_epochs(training: Training, loader, rows: list, evaluate_test, args, run: common.RunDir, log) -> dict:
    """Train the loader's epochs, each followed by its metrics row (and the test figures every --eval-every epochs and
    at the last) and a checkpoint. Returns the latest test figures ({} if none were taken)."""
    batches, it = loader
    accelerator, metrics = training.accelerator, {}
    num_updates = batches.epochs.start * batches.steps
    for epoch in batches.epochs:
        lr = training.optimizer.param_groups[0]["lr"]  # the epoch's lr (timm applies milestone m from epoch m - 1)
        stats, num_updates = train_steps(training, it, batches.steps * training.accum, args, epoch, num_updates)
        training.scheduler.step(epoch + 1)
        if accelerator.num_processes > 1:  # one model to test and save: timm train.py's --dist-bn reduce (release)
            distribute_bn(training.model, accelerator.num_processes, reduce=True)
        row = {
            "epoch": epoch + 1,
            "train_loss": stats["loss"],
            "lr": lr,
            "img_per_s": stats["images"] * accelerator.num_processes / stats["seconds"],
            "data_wait_frac": stats["data_wait"] / stats["seconds"],
        }
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            metrics = evaluate_test()
            row.update(metrics)
        rows.append(row)
        log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if accelerator.is_main_process:  # before the checkpoint: a resume from it finds its row (later ones dropped)
            run.check_in_place()
            common.write_jsonl(run.path / "metrics.jsonl", rows)
        common.save_checkpoint(accelerator, run, epoch + 1, args.keep_checkpoints)
    return metrics


def main(argv=None) -> dict:
    args = parse_args_with_recipe(get_parser(), argv)
    accelerator = make_accelerator(args)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    name = args.name or default_name(args.train_dirs)
    out = common.output_dir(args, f"cls_{name}")
    common.seed_everything(args.seed)

    args.test_split = common.resolve_split(args.dataset, args.data_root, args.test_split)
    test_index = common.load_dataset(args.dataset, args.data_root, args.test_split)
    test_index, test_bad, test_fp = common.check_images(test_index, args.skip_bad)  # before training, not at 1st eval
    classes = test_index.classes
    paths, labels, inputs = load_train_sources(args, classes)
    model = build_model(args, len(classes))
    eval_cfg = eval_transform_cfg(args, model)
    train_tf, eval_tf = build_transforms(args, eval_cfg)
    if len(labels) < args.batch_size:
        raise ValueError(f"{len(labels)} training images but --batch-size {args.batch_size}: lower the batch size")

    args.num_classes = len(classes)
    config = common.config_dict(args)
    # The training sets' files, not their paths, are the run's identity: a changed set is a mismatch, not a resume.
    config["train_fingerprints"] = [inputs[source]["fingerprint"] for source in args.train_dirs]
    tested = {"split": args.test_split, "images": len(test_index), "skipped_bad": test_bad, "fingerprint": test_fp}
    inputs["test_split"] = tested
    run = common.RunDir(out, config, overwrite=args.overwrite, is_main=is_main)
    if run.begin(accelerator.wait_for_everyone) == "done":
        evaluate_saved = functools.partial(evaluate, model, test_index, eval_tf, accelerator, args)
        return retest_if_changed(run, model.to(accelerator.device), tested, evaluate_saved)
    log = common.get_logger(out, is_main)

    steps_per_epoch = len(labels) // args.batch_size
    training = prepare_training(args, accelerator, model, len(classes), steps_per_epoch)
    model, scheduler, accum = training.model, training.scheduler, training.accum
    train_set = ImageList(paths, labels, train_tf, args.seed)

    start_epoch, rows = resume(accelerator, scheduler, args, run, log)
    scheduler.step_update(start_epoch * steps_per_epoch)
    end_epoch = args.epochs if args.epochs_per_job is None else min(args.epochs, start_epoch + args.epochs_per_job)
    log.info(
        f"{len(labels)} train images from {args.train_dirs}, {len(classes)} classes, batch {args.batch_size} = "
        f"{world} processes x {accum} micro-batches of {args.batch_size // world // accum}; epochs "
        f"{start_epoch}->{end_epoch} of {args.epochs}"
    )
    evaluate_test = functools.partial(evaluate, model, test_index, eval_tf, accelerator, args)
    loader = epoch_loader(train_set, args, accelerator.process_index, world, accum, range(start_epoch, end_epoch))
    metrics = run_epochs(training, loader, rows, evaluate_test, args, run, log)
    if end_epoch < args.epochs:
        log.info(f"stopped after {end_epoch} epochs (--epochs-per-job); run the same command again to continue")
        return {"epochs_done": end_epoch, **metrics}
    if not metrics:  # interrupted after the last checkpoint: the final evaluation is all that is left
        metrics = evaluate_test()
    return finish(run, accelerator.unwrap_model(model), args, test_index, eval_cfg, metrics, inputs)


if __name__ == "__main__":
    main()
