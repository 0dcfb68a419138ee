"""Evaluate a train_cls.py classifier in distribution and on OOD test sets: top-1/top-5 (paper §4.4, App. G.3).

The classifier is rebuilt from its own manifest (timm model name, class list, weights, eval transform), so every set
is seen through exactly the transform the test split was. A set is either

  a split of the run's dataset   `test`, `val`, or any folder of an ImageFolder/demo dataset (`sketch`, `rendition`)
  an ImageNet OOD set            `imagenet-v2=PATH`     MatchedFrequency, folders 0..999 = integer class ids (or wnids)
                                 `imagenet-sketch=PATH` 1000 wnid folders (a single `sketch/` level is descended)
                                 `imagenet-r=PATH`, `imagenet-a=PATH`   200 wnid folders each
                                 `imagenet-val=PATH`    1000 wnid folders (val prepared as torchvision does)

Label spaces are matched by class id (wnid or folder name), never by position. A set is scored on the classes that
both the classifier and the set know: images of other classes are skipped and only the logits of the shared classes
enter top-k. For a 1000-way model on ImageNet-R/-A this is the standard 200-logit mask (hendrycks eval.py); for an
IN-10/IN-100 model it restricts every set to the classes it was trained on. results.json says which mask was used.

Inputs : --classifier DIR (a train_cls.py output), --sets ..., --dataset/--data-root for split names.
Outputs: <output-dir>/ (default runs/<dataset>/ood_<classifier dir name>)
           results.json, results.md   per set: images, classes scored, logit mask, top-1, top-5 (results.json:
                                      a split's unreadable images left out, --skip-bad)
           logits/<set>.safetensors   cached logits over all the classifier's classes, with the image list in
                                      logits/<set>.paths.txt; a re-run, also with more sets, computes only what is
                                      missing
           manifest.json              written last
Commands:
  one GPU : python eval_ood.py --config configs/in1k.yaml --classifier runs/in1k/cls_mix_x1 --sets val \\
              imagenet-v2=/data/imagenetv2-matched-frequency-format-val imagenet-sketch=/data/sketch \\
              imagenet-r=/data/imagenet-r imagenet-a=/data/imagenet-a
  8 GPUs  : accelerate launch --num_processes 8 eval_ood.py ...   (images split over processes, logits merged)
  CPU     : python eval_ood.py --config configs/demo.yaml --classifier runs/demo/cls_real --sets test sketch rendition
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import common

AUTOCAST_ON_GPU = "bf16"  # --mixed-precision auto on a GPU (the forward pass only)

WNID = re.compile(r"^n\d{8}$")
IMAGENET_SETS = {  # kind -> file with the set's label space (wnids in ImageNet index order)
    "imagenet-v2": "imagenet1k_wnids.txt",
    "imagenet-sketch": "imagenet1k_wnids.txt",
    "imagenet-val": "imagenet1k_wnids.txt",
    "imagenet-r": "imagenet_r_wnids.txt",
    "imagenet-a": "imagenet_a_wnids.txt",
}


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    common.add_run_options(p, "ood_<classifier dir name>", workers=8, data_fingerprinted=True)
    a = (model := p.group("classifier")).add_argument
    a("--classifier", default=None, help="a train_cls.py output directory (required); its weights are the identity")
    p.not_hashed("classifier")  # classifier_weights: the same run from a moved runs folder or another spelling
    common.add_mixed_precision(model, AUTOCAST_ON_GPU)
    # A root only locates a set, and every set scored is fingerprinted (a changed one is scored again): as the same
    # root given as KIND=PATH in --sets, in the environment or in configs/paths.yaml, no part of the identity.
    roots = p.speed_group("OOD set roots (not part of the run's identity: every set scored is fingerprinted)")
    for kind in IMAGENET_SETS:  # settable in the YAML eval_ood section, the environment or configs/paths.yaml
        env = kind.replace("-", "_").upper() + "_ROOT"
        roots.add_argument(
            f"--{kind}",
            default=None,
            help=f"root of {kind}, for --sets {kind} (default ${env} or configs/paths.yaml beside common.py)",
        )
    # A set added to a finished run reuses the other sets' cached logits: which sets is no part of the identity.
    which = p.speed_group("which images are scored (not part of the run's identity)")
    which.add_argument(
        "--sets",
        nargs="+",
        default=[common.HELD_OUT],
        help=f"dataset split names ({common.HELD_OUT}: --test-split), and/or ImageNet OOD sets as KIND=PATH or a "
        "bare KIND whose path is given by the option of that name (above); KIND in " + ", ".join(IMAGENET_SETS),
    )
    common.add_test_split(which, f"the split --sets {common.HELD_OUT} names")
    common.add_skip_bad(p, "results.json (dataset splits)")
    p.speed_group().add_argument("--batch-size", type=common.positive_int, default=256, help="per process")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Sets: every reader returns (name, image paths, class id per image, the set's label space)


def parse_set(spec: str, args=None) -> tuple[str, str | None, str | None]:
    """'sketch' -> (sketch, None, None); 'imagenet-r=/data/r' or 'imagenet-r' with --imagenet-r /data/r ->
    (imagenet-r, imagenet-r, /data/r)."""
    if "=" not in spec:
        if spec in IMAGENET_SETS:
            # the option, else IMAGENET_V2_ROOT (etc.) or configs/paths.yaml; imagenet-val is ImageNet's val/
            path = getattr(args, spec.replace("-", "_"), None) or common.data_location(spec.replace("-", "_") + "_root")
            if path is None and spec == "imagenet-val" and common.data_location("imagenet_root"):
                path = str(Path(common.data_location("imagenet_root")) / "val")
            return spec, spec, path
        return spec, None, None
    kind, path = spec.split("=", 1)
    if kind not in IMAGENET_SETS:
        raise ValueError(
            f"--sets {spec}: unknown set kind '{kind}'; use a split name of the dataset or one of "
            f"{sorted(IMAGENET_SETS)} as KIND=PATH"
        )
    return kind, kind, path


def class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(dirs) == 1 and not common.list_images(dirs[0], recursive=False) and not WNID.match(dirs[0].name):
        return class_dirs(dirs[0])  # ImageNet-Sketch archives unpack to sketch/<wnid>/
    return dirs


def folder_class(folder: str, wnids: list[str], kind: str) -> str:
    """Class id of an OOD folder. ImageNet-v2 names folders by integer class index: int('10') -> wnids[10] (sorting
    them as strings, as ImageFolder would, puts '10' before '2' and scrambles 990 of the 1000 labels)."""
    if WNID.match(folder):
        return folder
    if kind == "imagenet-v2" and folder.isdigit() and int(folder) < len(wnids):
        return wnids[int(folder)]
    raise ValueError(f"{kind}: folder '{folder}' is neither a wnid nor an ImageNet-v2 class index")


@dataclasses.dataclass
class EvalSet:
    """The images of one --sets entry: their paths and class ids, the set's label space, its files' fingerprint
    (common.split_fingerprint), the unreadable images left out (--skip-bad; dataset splits only)."""

    name: str
    paths: list[Path]
    ids: list[str]
    space: list[str]
    fingerprint: str
    skipped_bad: dict[str, str] | None = None


def read_imagenet_set(kind: str, root: str) -> EvalSet:
    """An ImageNet OOD set: its images, their class ids, the set's label space."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{kind}: directory {root} does not exist")
    imagenet = common.read_lines(common.data_file("imagenet1k_wnids.txt"))
    space = common.read_lines(common.data_file(IMAGENET_SETS[kind]))
    paths, ids = [], []
    for folder in class_dirs(root):
        wnid = folder_class(folder.name, imagenet, kind)
        if wnid not in space:
            raise ValueError(f"{kind}: folder {folder} is class {wnid}, which is not in {IMAGENET_SETS[kind]}")
        images = common.list_images(folder)
        paths += images
        ids += [wnid] * len(images)
    fingerprint = common.files_fingerprint(root, [str(p.relative_to(root)) for p in paths])
    return EvalSet(kind, paths, ids, space, fingerprint)


def read_split(name: str, args, log) -> EvalSet:
    """A split of the run's dataset (its root, if not given, as every stage finds it: common.load_dataset), its
    images checked as the classifier's own test split was."""
    if args.dataset is None:
        raise ValueError(f"--sets {name}: a split name needs --dataset (or a --config that sets it)")
    split = common.load_dataset(args.dataset, args.data_root, name)
    index, bad, fingerprint = common.check_images(split, args.skip_bad, log=log)
    paths = [index.abspath(i) for i in range(len(index))]
    return EvalSet(name, paths, [index.classes[s.label] for s in index.samples], list(index.classes), fingerprint, bad)


def read_sets(args, log) -> tuple[list[EvalSet], list[str]]:
    """Every --sets entry read, and every dataset split's images checked (common.check_images), before the first
    logits, so a bad image in the last split stops the run before any output (ImageNet OOD sets are listed, not
    checked); with the names of the sets skipped for want of a path."""
    sets, skipped = [], []
    for spec in args.sets:
        name, kind, path = parse_set(spec, args)
        if kind is not None and path is None:  # e.g. ImageNet-A not downloaded: say so, evaluate the rest
            log.warning(f"skipping {name}: no path (pass {name}=PATH in --sets or --{name} PATH)")
            skipped.append(name)
            continue
        sets.append(read_imagenet_set(kind, path) if kind else read_split(name, args, log))
        if not sets[-1].paths:
            raise ValueError(f"--sets {spec}: no images found")
    return sets, skipped


def shared_classes(model_classes: list[str], space: list[str]) -> tuple[list[int], dict[str, int]]:
    """Logit indices kept (the classifier's classes the set knows, in the classifier's order) and class id -> position
    among the kept logits, which is the target of top-k."""
    keep = [j for j, c in enumerate(model_classes) if c in set(space)]
    return keep, {model_classes[j]: pos for pos, j in enumerate(keep)}


def score_set(logits: torch.Tensor, ids: list[str], model_classes: list[str], space: list[str]) -> dict:
    """Top-1/top-5 over the shared classes only: images of other classes dropped, other logits masked out."""
    keep, target_of = shared_classes(model_classes, space)
    if not keep:
        raise ValueError("the set shares no class with the classifier (check --dataset or the set's kind)")
    rows = [i for i, c in enumerate(ids) if c in target_of]
    if not rows:
        raise ValueError("the set has no image of the classifier's classes")
    targets = torch.tensor([target_of[ids[i]] for i in rows])
    top1, top5 = common.top_hits(logits[rows][:, keep], targets)  # as train_cls.py counts them
    acc = {"top1": 100.0 * top1 / len(rows), "top5": 100.0 * top5 / len(rows)}
    masked = len(keep) < len(model_classes) or len(keep) < len(set(space))
    note = (
        f"scored on {len(keep)} classes shared by the classifier ({len(model_classes)}) and the set "
        f"({len(set(space))}); {len(ids) - len(rows)} images of other classes skipped; top-k over those "
        f"{len(keep)} logits only"
        if masked
        else "full label space, no mask"
    )
    return {
        "images": len(rows),
        "classes_scored": len(keep),
        "logit_mask": masked,
        "note": note,
        "top5_k": min(5, len(keep)),
        **acc,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Model and logits


@torch.no_grad()
def compute_logits(model, paths, transform, state, args, desc: str) -> torch.Tensor:
    """Logits of this process's strided share of `paths` (float32, all the classifier's classes)."""
    mine = paths[state.process_index :: state.num_processes]
    loader = torch.utils.data.DataLoader(
        common.ImageFiles(mine, transform),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=torch.cuda.is_available(),
    )
    dtype = common.DTYPES.get(common.resolve_mixed_precision(args.mixed_precision, AUTOCAST_ON_GPU))
    out = []
    for _, x in common.progress(loader, state.is_main_process, desc=desc, leave=False):
        with torch.autocast(state.device.type, dtype=dtype, enabled=dtype is not None):
            out.append(model(x.to(state.device, non_blocking=True)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.num_classes)


def cache_key(weights_hash: str, transform_cfg: dict, images: EvalSet) -> str:
    text = json.dumps([weights_hash, transform_cfg, [str(p) for p in images.paths], images.fingerprint], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_logits(cache: Path, key: str, n: int) -> torch.Tensor | None:
    if not cache.is_file():
        return None
    with safe_open(str(cache), "pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        logits = f.get_tensor("logits")
    return logits if len(logits) == n else None


@dataclasses.dataclass
class Classifier:
    """A train_cls.py output, loaded: the model, its eval transform, its manifest's classifier entry, its weights'
    hash."""

    model: torch.nn.Module
    transform: Any
    info: dict
    weights_hash: str


def set_logits(images: EvalSet, clf: Classifier, state, args, run: common.RunDir, log) -> torch.Tensor:
    """The set's logits from the cache if the classifier, transform and images are unchanged, else computed."""
    name, paths, out = images.name, images.paths, run.path
    cache = out / "logits" / f"{name}.safetensors"
    key = cache_key(clf.weights_hash, clf.info["eval_transform"], images)
    logits = cached_logits(cache, key, len(paths))
    if logits is not None:
        log.info(f"{name}: {len(paths)} logits from cache")
        return logits
    part = compute_logits(clf.model, paths, clf.transform, state, args, desc=name)
    run.check_in_place()  # moved aside while computing: this classifier's logits stay out of the run now there
    parts_dir = out / "logits" / f".{name}.parts"
    with common.atomic_path(parts_dir / f"{state.process_index}.safetensors") as tmp:
        save_file({"logits": part.contiguous()}, str(tmp))
    state.wait_for_everyone()

    # undo the strided split: image i was computed by process i % world as its (i // world)-th row
    world = state.num_processes
    shards = [load_file(parts_dir / f"{r}.safetensors")["logits"] for r in range(world)]
    logits = torch.zeros(len(paths), shards[0].shape[1])
    for r, shard in enumerate(shards):
        logits[r::world] = shard
    state.wait_for_everyone()
    run.check_in_place()
    if state.is_main_process:
        with common.atomic_path(cache) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp), metadata={"key": key})
        with common.atomic_write(cache.with_suffix(".paths.txt")) as f:
            f.write("\n".join(map(str, paths)) + "\n")
        for file in parts_dir.iterdir():
            file.unlink()
        parts_dir.rmdir()
    return logits


def markdown_table(results: dict, classifier: str, skipped: list[str]) -> str:
    lines = [
        f"OOD evaluation of `{classifier}` (top-k over the classes shared by classifier and set)",
        "",
        "| set | images | classes scored | logit mask | top-1 | top-5 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        top5 = f"{r['top5']:.2f}" + ("" if r["top5_k"] == 5 else f" (top-{r['top5_k']})")
        lines.append(
            f"| {name} | {r['images']} | {r['classes_scored']} | {'yes' if r['logit_mask'] else 'no'} | "
            f"{r['top1']:.2f} | {top5} |"
        )
    if skipped:  # a table without them reads as if they had been scored
        lines += [
            "",
            f"Not scored, for want of a path: {', '.join(skipped)} (pass NAME=PATH in --sets or --NAME PATH).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = get_parser()
    args = common.parse_args(parser, argv, "eval_ood")
    if args.classifier is None:
        parser.error("--classifier DIR (a train_cls.py output) is required")
    classifier = Path(args.classifier)
    if args.dataset is not None:
        test_split = {common.HELD_OUT: args.test_split}
        args.sets = [common.resolve_split(args.dataset, args.data_root, test_split.get(s, s)) for s in args.sets]
    state = PartialState()
    out = Path(args.output_dir or Path(args.runs_dir) / (args.dataset or "ood") / f"ood_{classifier.name}")
    model, transform, info = common.load_classifier(classifier, state.device)
    clf = Classifier(model, transform, info, common.fingerprint(classifier / info["weights"]))
    config = {**common.config_dict(args), "classifier_weights": clf.weights_hash}
    run = common.RunDir(out, config, overwrite=args.overwrite, is_main=state.is_main_process)
    finished = run.begin(state.wait_for_everyone) == "done"
    log = common.get_logger(out, state.is_main_process)
    results, (sets, skipped) = {}, read_sets(args, log)
    fingerprints = {images.name: images.fingerprint for images in sets}
    if finished:  # scored again if a set was added, or its files changed, since (a cached set's logits are reused)
        manifest = run.manifest()
        scored = manifest.get("fingerprints", {})
        if not (changed := [name for name, fp in fingerprints.items() if scored.get(name) != fp]):
            return manifest["metrics"]
        log.info(f"scoring the sets added or changed since this run: {changed}")
        run.write_again()
    for images in sets:
        name = images.name
        logits = set_logits(images, clf, state, args, run, log)
        results[name] = score_set(logits, images.ids, info["classes"], images.space)
        if images.skipped_bad is not None:
            results[name]["skipped_bad"] = images.skipped_bad
        log.info(f"{name}: top1 {results[name]['top1']:.2f} top5 {results[name]['top5']:.2f} ({results[name]['note']})")
    metrics = {f"{n}/{k}": r[k] for n, r in results.items() for k in ("top1", "top5")}
    run.check_in_place()
    if state.is_main_process:
        common.write_json(out / "results.json", results)
        with common.atomic_write(out / "results.md") as f:
            f.write(markdown_table(results, str(classifier), skipped))
    run.finish(
        metrics,
        inputs={"classifier": str(classifier), "classifier_weights": clf.weights_hash},
        extra={"sets": list(args.sets), "skipped": skipped, "results": results, "fingerprints": fingerprints},
    )
    return metrics


if __name__ == "__main__":
    main()
