"""Copy detection with SSCD: does any synthetic image replicate a real training image? (paper §4.5, App. G.4)

The paper (Fig. 4) embeds every synthetic and every real training image with the SSCD copy-detection model
`sscd_disc_large` (ResNeXt101, 1024-d, L2-normalised descriptors; Pizzi et al. 2022), retrieves the nearest real images
by inner product for each synthetic one and shows the closest pairs. Following Somepalli et al. (2023, somepago/DCR) we
add numbers: the top-1 similarity distribution (mean, 95th percentile), the replication rate (top-1 above --threshold),
and the same for a real-vs-real background (each real image's nearest *other* real image), which tells how close
"different" images of this dataset already are.

The model is a TorchScript file, `--model sscd_disc_large.torchscript.pt` by default, downloaded by the user from
https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt (facebookresearch/sscd-copy-detection
README). TorchScript files run code when loaded: load only files from a source you trust. Preprocessing is the SSCD
README's: RGB, short edge resized (aspect kept; `--resize square` is its square alternative), ImageNet mean/std.
`--make-standin PATH` writes a small stand-in TorchScript descriptor (pooled pixel layout, fixed random projection,
L2-normalised) for offline tests and the demo; results computed with it say so (`descriptor.standin` in results.json)
and measure pixel-layout near-duplicates only, not SSCD similarity.

Inputs: the real training split (--dataset/--data-root), a finished synthesize.py output (--synthetic-dir; a plain
ImageFolder also works). The run's identity holds the fingerprints of both sets and of the model file, so a regenerated
set or a new model is a config mismatch, never an old result. Outputs (--output-dir, default
runs/<dataset>/sscd_<synthetic dir name>/): results.json, matches.jsonl (top-k real matches of every synthetic image),
histogram.png, top_matches.png, log.txt, manifest.json (written last). Descriptors are cached under --cache-dir
(default sscd_cache/ beside the output folder, keyed by model, preprocessing, file path, size and mtime) and shared by
every synthetic set: a re-run embeds only images not seen before.

Commands:
    one GPU / CPU: python sscd_sim.py --config configs/in10.yaml --synthetic-dir runs/in10/synth_x1 \\
                       --model /path/to/sscd_disc_large.torchscript.pt
    (single process; the search runs on the GPU when there is one, in blocks of --chunk-size reference descriptors)
    stand-in:      python sscd_sim.py --make-standin runs/demo/sscd_standin.torchscript.pt
    demo:          python sscd_sim.py --config configs/demo.yaml --synthetic-dir runs/demo/synth_x1 \\
                       --model runs/demo/sscd_standin.torchscript.pt
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms

import common

STANDIN_TAG = "realfake_standin.txt"  # extra file inside a stand-in TorchScript archive
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SSCD README


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    seed_help = "background subset's seed"
    common.add_run_options(p, "sscd_<synthetic dir name>", seed_help=seed_help, data_fingerprinted=True)
    a = p.group("copy detection (paper App. G.4)").add_argument
    a("--synthetic-dir", default=None, help="synthesize.py output or any ImageFolder (default: <dataset>/synth_x1)")
    a("--model", default="sscd_disc_large.torchscript.pt", help="SSCD TorchScript file (where to get it: above)")
    p.not_hashed("synthetic_dir", "model")  # their files' fingerprints are the identity (sets, model_fingerprint)
    a("--resize", default="short-edge", choices=("short-edge", "square"), help="SSCD README: short edge, or square")
    a("--size", type=int, default=288, help="288 for short-edge (SSCD README), 320 for square")
    a("--top-k", type=int, default=5, help="real matches kept per synthetic image (paper: 5)")
    a("--num-show", type=int, default=3, help="most similar pairs in top_matches.png (paper Fig. 4: 3)")
    a("--threshold", type=float, default=0.5, help="replication: top-1 similarity above it (Somepalli et al.: 0.5)")
    a("--background-queries", type=int, default=0, help="real-vs-real queries (0 = all; else a seeded subset)")
    a = p.speed_group().add_argument
    a("--cache-dir", default=None, help="descriptor cache (default sscd_cache/ beside the output folder)")
    a("--batch-size", type=common.positive_int, default=64, help="embedding batch size")
    a("--chunk-size", type=int, default=65536, help="reference descriptors per similarity block")
    a("--make-standin", default=None, metavar="PATH", help="write the offline stand-in descriptor to PATH and exit")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# Descriptor model: the SSCD TorchScript file, or the project's labelled stand-in.


class StandinDescriptor(torch.nn.Module):
    """NOT SSCD. A pixel-layout descriptor for offline tests and the demo: average-pool to a grid x grid layout,
    remove each channel's mean (so two images of the same colour are not "copies"), project with a fixed random
    Gaussian matrix (which keeps inner products, Johnson-Lindenstrauss), L2-normalise. Exact copies score 1."""

    def __init__(self, dims: int = 256, grid: int = 16, seed: int = 0):
        super().__init__()
        self.grid = grid
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(3 * grid * grid, dims, generator=generator) / dims**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x, self.grid)
        x = x - x.mean(dim=(2, 3), keepdim=True)
        return torch.nn.functional.normalize(x.flatten(1) @ self.projection, dim=1)


def save_standin(path: str | Path, dims: int = 256, seed: int = 0) -> Path:
    """Script the stand-in and save it as TorchScript, tagged inside the archive so results can say what it is."""
    note = "realfake stand-in descriptor (pooled pixel layout + random projection), NOT SSCD"
    with warnings.catch_warnings():  # TorchScript: the format SSCD ships (see above)
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(StandinDescriptor(dims=dims, seed=seed).eval())
        # The file's hash is the identity of every run that uses it, and the archive's bytes also hold this script's
        # path (TorchScript's debug info): rewritten from a moved or renamed project folder, it stopped the next
        # `make demo` with a mismatch in model_fingerprint. So a stand-in that is the same model is kept.
        if is_saved_standin(path, scripted, note):
            return Path(path)
        # Saved to memory first: saved to a file, the archive inside is named after that (temp) file.
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={STANDIN_TAG: note})
    with common.atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return Path(path)


def is_saved_standin(path: str | Path, scripted: torch.jit.ScriptModule, note: str) -> bool:
    """`path` holds the stand-in `scripted` with this note: the same code and tensors, whatever its bytes."""
    extra = {STANDIN_TAG: ""}
    try:
        saved = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (OSError, RuntimeError, ValueError):  # none there, or not TorchScript: written anew
        return False
    ours, theirs = scripted.state_dict(), saved.state_dict()
    return (
        extra[STANDIN_TAG] == note.encode()
        and saved.code == scripted.code
        and ours.keys() == theirs.keys()
        and all(torch.equal(ours[k], theirs[k]) for k in ours)
    )


def require_descriptor_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"descriptor model {path} not found: download sscd_disc_large.torchscript.pt from "
            f"https://dl.fbaipublicfiles.com/sscd-copy-detection/ (only trusted TorchScript "
            f"files: loading one runs its code) and pass --model, or build the offline stand-in "
            f"with --make-standin PATH"
        )
    return path


def load_descriptor(path: str | Path, device: torch.device, sha256_16: str | None = None):
    """torch.jit.load the descriptor model; returns (model, info) with info['standin'] set for the stand-in.
    `sha256_16`: the file's hash if the caller has it (the run's identity holds it), so it is not read twice."""
    path = require_descriptor_file(path)
    extra = {STANDIN_TAG: ""}
    with warnings.catch_warnings():  # torch deprecates TorchScript, but SSCD's only code-free format is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location=device, _extra_files=extra).eval()
    standin = bool(extra[STANDIN_TAG])
    info = {
        "path": str(path),
        "sha256_16": sha256_16 or common.fingerprint(path),
        "standin": standin,
        "note": extra[STANDIN_TAG].decode() if standin else "SSCD TorchScript descriptor",
    }
    return model, info


# ----------------------------------------------------------------------------------------------------------------------
# Embedding with a cache: a descriptor is stored once per (model, preprocessing, file path, size, mtime).


def make_transform(resize: str, size: int):
    shape = size if resize == "short-edge" else [size, size]
    return transforms.Compose(
        [transforms.Resize(shape), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def cache_key(path: Path | common.ShardMember) -> str:
    """A file, or an image in a tar shard (by its tar's identity and its place in it)."""
    where = path.tar if isinstance(path, common.ShardMember) else path
    stat = where.stat()
    key = f"{where.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return f"{key}|{path.offset}|{path.size}" if isinstance(path, common.ShardMember) else key


class EmbeddingCache:
    """Append-only: each embedding pass adds chunk files (keys + descriptors); nothing is rewritten."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: dict[str, np.ndarray] = {}
        for chunk in sorted(folder.glob("chunk_*.npz")):
            with np.load(chunk) as data:
                self.rows.update(zip(data["keys"].tolist(), data["emb"]))

    def add(self, keys: list[str], emb: np.ndarray) -> None:
        if not keys:
            return
        n = len(list(self.folder.glob("chunk_*.npz")))
        with common.atomic_path(self.folder / f"chunk_{n:06d}.npz") as tmp:
            np.savez(tmp, keys=np.array(keys), emb=emb.astype(np.float32))
        self.rows.update(zip(keys, emb))


@torch.no_grad()
def embed(model, paths: list[Path], cache: EmbeddingCache, args, device, desc: str) -> tuple[torch.Tensor, int]:
    """[N, D] descriptors of `paths` (cached ones reused); returns them and how many were computed now."""
    keys = [cache_key(p) for p in paths]
    todo = [i for i, k in enumerate(keys) if k not in cache.rows]
    loader = torch.utils.data.DataLoader(
        common.ImageFiles([paths[i] for i in todo], make_transform(args.resize, args.size)),
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=list,
    )
    new_keys, new_emb = [], []
    for batch in common.progress(loader, desc=desc, total=len(loader)):
        # Short-edge resizing keeps aspect ratios, so shapes differ: run the model once per shape in the batch.
        by_shape: dict[tuple, list] = {}
        for i, x in batch:
            by_shape.setdefault(tuple(x.shape), []).append((i, x))
        for group in by_shape.values():
            out = model(torch.stack([x for _, x in group]).to(device)).float().cpu().numpy()
            new_keys += [keys[todo[i]] for i, _ in group]
            new_emb.append(out)
        if len(new_keys) >= 10000:  # flush so an interrupted run keeps its work
            cache.add(new_keys, np.concatenate(new_emb))
            new_keys, new_emb = [], []
    cache.add(new_keys, np.concatenate(new_emb) if new_emb else np.zeros((0, 0), np.float32))
    emb = torch.from_numpy(np.stack([cache.rows[k] for k in keys])) if keys else torch.zeros(0, 0)
    # SSCD descriptors are already L2-normalised; normalise again so any model gives cosine similarities.
    return torch.nn.functional.normalize(emb.float(), dim=1), len(todo)


# ----------------------------------------------------------------------------------------------------------------------
# Search and report.


@torch.no_grad()
def topk_search(
    queries: torch.Tensor, refs: torch.Tensor, k: int, chunk: int, device, self_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k inner products of every query over all references, in blocks of `chunk` references (and queries), so
    memory stays bounded for a million-image training set. `self_index[q]` (or −1) is a reference to skip for query q
    (the query itself, for the real-vs-real background)."""
    k = min(k, len(refs) - (self_index is not None))
    best_v, best_i = [], []
    for q0 in range(0, len(queries), chunk):
        q = queries[q0 : q0 + chunk].to(device)
        vals = torch.full((len(q), k), -float("inf"), device=device)
        idx = torch.zeros((len(q), k), dtype=torch.long, device=device)
        for r0 in range(0, len(refs), chunk):
            sims = q @ refs[r0 : r0 + chunk].to(device).T
            if self_index is not None:
                own = self_index[q0 : q0 + chunk].to(device) - r0
                rows = torch.nonzero((own >= 0) & (own < sims.shape[1])).squeeze(1)
                sims[rows, own[rows]] = -float("inf")
            cand_i = torch.arange(r0, r0 + sims.shape[1], device=device).expand_as(sims)
            vals, pick = torch.cat([vals, sims], 1).topk(k, dim=1)
            idx = torch.cat([idx, cand_i], 1).gather(1, pick)
        best_v.append(vals.cpu())
        best_i.append(idx.cpu())
    return torch.cat(best_v), torch.cat(best_i)


def top1_stats(top1: torch.Tensor, threshold: float) -> dict:
    x = top1.double().numpy()
    return {
        "count": int(len(x)),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "p50": float(np.percentile(x, 50)),
        "p95": float(np.percentile(x, 95)),
        "max": float(x.max()),
        "replication_rate": float((x > threshold).mean()),
        "num_replications": int((x > threshold).sum()),
    }


# Files a synthesize.py output holds before its manifest.json: with them and without it, the set is unfinished.
SYNTHESIZE_FILES = ("run_config.json", "classes.json", "manifest.jsonl")


def load_generated(folder: str | Path):
    """A finished synthesize.py output (labels and files from its manifest) or, failing that, any ImageFolder."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        return common.load_synthetic(folder)
    if started := [name for name in SYNTHESIZE_FILES if (folder / name).is_file()]:
        # Read as an ImageFolder, it would be the images made so far, and the results those of a smaller set.
        raise FileNotFoundError(
            f"{folder} is an unfinished synthesize.py output ({', '.join(started)} but no manifest.json): finish it "
            f"(run the same synthesize.py command again; it resumes) and run sscd_sim.py then"
        )
    return common.read_imagefolder(folder, name="generated", split="")


def plot_histogram(path: Path, synth: torch.Tensor, background: torch.Tensor, threshold: float, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(synth.min().item(), background.min().item(), 0.0), 1.0, 51)
    ax.hist(background.numpy(), bins=bins, alpha=0.6, density=True, label="real vs nearest other real")
    ax.hist(synth.numpy(), bins=bins, alpha=0.6, density=True, label="synthetic vs nearest real")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"replication threshold {threshold:g}")
    ax.set(xlabel=f"top-1 similarity ({label})", ylabel="density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_top_matches(path: Path, pairs: list[dict], images: list[tuple], label: str) -> None:
    """Paper Fig. 4: the most similar synthetic/real pairs (`images`: where each pair's two images are), side by
    side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(5, 2.6 * len(pairs)), squeeze=False)
    for row, pair, where in zip(axes, pairs, images):
        for ax, image, title in zip(row, where, ("synthetic", "nearest real")):
            ax.imshow(common.load_image(image))
            ax.set_title(f"{title}" + (f"  sim {pair['similarity']:.3f}" if ax is row[1] else ""), fontsize=8)
            ax.axis("off")
    fig.suptitle(f"most similar pairs ({label})", fontsize=9)
    fig.tight_layout()
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def background_queries(real, args) -> torch.Tensor:
    """Which real images query the background: all, or a subset chosen by a seeded hash of their ids."""
    n = len(real)
    if args.background_queries <= 0 or args.background_queries >= n:
        return torch.arange(n)
    order = sorted(range(n), key=lambda i: common.item_seed(args.seed, "sscd-background", real.image_id(i)))
    return torch.tensor(sorted(order[: args.background_queries]))


def write_matches(path: Path, synth, real, vals: torch.Tensor, idx: torch.Tensor) -> None:
    """One row per synthetic image: its top-k real matches with their similarities."""
    rows = [
        {
            "file": synth.samples[i].path,
            "label": synth.samples[i].label,
            "matches": [
                {"path": real.samples[j].path, "label": real.samples[j].label, "similarity": float(v)}
                for v, j in zip(vals[i].tolist(), idx[i].tolist())
            ],
        }
        for i in range(len(synth))
    ]
    common.write_jsonl(path, rows)


def show_top_matches(out: Path, synth, real, vals, idx, num_show: int, label: str) -> list[dict]:
    """The `num_show` most similar synthetic/real pairs: listed for results.json and drawn in top_matches.png."""
    shown = vals[:, 0].argsort(descending=True)[:num_show].tolist()
    pairs = [
        {
            "synthetic_path": str(synth.abspath(i)),
            "real_path": str(real.abspath(idx[i, 0].item())),
            "similarity": float(vals[i, 0]),
        }
        for i in shown
    ]
    if pairs:
        images = [(synth.abspath(i), real.abspath(idx[i, 0].item())) for i in shown]
        plot_top_matches(out / "top_matches.png", pairs, images, label)
    return pairs


def synthetic_set_dir(args) -> Path:
    """--synthetic-dir, by default the dataset's x1 set (the paper's); it must exist."""
    synthetic_dir = Path(args.synthetic_dir) if args.synthetic_dir else common.default_run_dir(args, "synth_x1")
    if not synthetic_dir.is_dir():
        raise FileNotFoundError(
            f"synthetic set {synthetic_dir} does not exist: run synthesize.py first or pass --synthetic-dir"
        )
    return synthetic_dir


def run_config(args, real, synth) -> dict:
    """The run's identity. The files define it (as in eval_gap): a regenerated synthetic set, a changed real split or
    another model file at the same path is a config mismatch, not a result of images that are no longer there."""
    config = common.config_dict(args)
    config["sets"] = {"train": common.split_fingerprint(real), "synthetic": common.split_fingerprint(synth)}
    config["model_fingerprint"] = common.fingerprint(args.model)
    return config


def main(argv=None) -> dict:
    args = common.parse_args(get_parser(), argv, "sscd_sim")
    if args.make_standin:
        return {"standin": str(save_standin(args.make_standin))}
    synthetic_dir = synthetic_set_dir(args)
    out = common.output_dir(args, f"sscd_{synthetic_dir.name}")
    require_descriptor_file(args.model)
    real = common.load_dataset(args.dataset, args.data_root, "train")
    synth = load_generated(synthetic_dir)
    config = run_config(args, real, synth)
    common.warn_if_made_from_other_data(synthetic_dir, config["sets"]["train"])
    run = common.RunDir(out, config, args.overwrite)
    if run.start() == "done":
        return run.manifest()["metrics"]
    log = common.get_logger(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    model, descriptor = load_descriptor(args.model, device, config["model_fingerprint"])
    if descriptor["standin"]:
        log.warning(f"descriptor {args.model} is the project's STAND-IN, not SSCD: it finds pixel-layout copies")
    preprocessing = f"{args.resize}-{args.size}"
    cache_dir = Path(args.cache_dir or out.parent / "sscd_cache")  # beside the output: shared by its sibling runs
    cache = EmbeddingCache(cache_dir / f"{descriptor['sha256_16']}_{preprocessing}")
    real_emb, new_real = embed(model, [real.abspath(i) for i in range(len(real))], cache, args, device, "embed real")
    syn_emb, new_syn = embed(model, [synth.abspath(i) for i in range(len(synth))], cache, args, device, "embed synth")
    log.info(
        f"descriptors: {len(real)} real ({new_real} new), {len(synth)} synthetic ({new_syn} new), "
        f"dim {real_emb.shape[1]}"
    )

    vals, idx = topk_search(syn_emb, real_emb, args.top_k, args.chunk_size, device)
    queries = background_queries(real, args)
    bg_vals, _ = topk_search(real_emb[queries], real_emb, 1, args.chunk_size, device, self_index=queries)

    run.check_in_place()
    write_matches(out / "matches.jsonl", synth, real, vals, idx)
    label = "stand-in descriptor, NOT SSCD" if descriptor["standin"] else "SSCD"
    metrics = {
        "synthetic_vs_real": top1_stats(vals[:, 0], args.threshold),
        "real_vs_real_background": top1_stats(bg_vals[:, 0], args.threshold),
        "threshold": args.threshold,
        "num_real": len(real),
        "num_synthetic": len(synth),
        "descriptor": descriptor,
        "preprocessing": preprocessing,
        "top_matches": show_top_matches(out, synth, real, vals, idx, args.num_show, label),
        "num_embedded": {"real": new_real, "synthetic": new_syn},
    }
    common.write_json(out / "results.json", metrics)
    plot_histogram(out / "histogram.png", vals[:, 0], bg_vals[:, 0], args.threshold, label)
    for name in ("synthetic_vs_real", "real_vs_real_background"):
        m = metrics[name]
        log.info(
            f"{name:24s} top-1 mean {m['mean']:.4f}  p95 {m['p95']:.4f}  replication rate (> {args.threshold:g}) "
            f"{m['replication_rate']:.4f}  [{label}]"
        )
    return run.finish(metrics, {"synthetic_dir": str(synthetic_dir), "data_root": str(args.data_root)})["metrics"]


if __name__ == "__main__":
    main()
