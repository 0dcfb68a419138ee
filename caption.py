"""Caption every training image with BLIP-2 (paper §3.2, following CiP, Lei et al. 2023).

The paper's prompt is "photo of {classname}, {caption}" for the ImageNet sets, with one BLIP-2 caption per real
image. CiP's recipe (model, precision, no text prompt, greedy decoding, caption length) is the option defaults.
The fine-grained sets (CUB, Cars, Pets, EuroSAT) use no caption, so this stage is only run for in10/in100/in1k (and
any dataset you choose).

Inputs:  a dataset (`--dataset`, `--data-root`, `--split`), a BLIP-2 checkpoint (`--model` hub id or local dir).
Outputs (`--output-dir`, default runs/<dataset>/captions/):
  captions.jsonl   one line per image, in dataset order: {"path": <path relative to the dataset root>, "caption": str}
  parts/           per-process part files (kept: they are the resume state)
  manifest.json    written last: config, model and split fingerprints, the images --skip-bad left out, counts

Every image is checked before any is captioned: a bad one stops the stage naming every bad file, or with --skip-bad
is left out (listed in the manifest). Resumable: images already in any part file are skipped; so a finished run whose
split has changed since (images added or removed) captions only the new images and merges captions.jsonl again for
the current split. Sharded: under `accelerate launch` each process captions a strided part of the remaining images
into its own part file; `--shard i/n` splits the work over independent jobs (job arrays). The job that finds every
image captioned merges the parts (no image lost or duplicated).

Commands:
  one GPU:      python caption.py --config configs/in10.yaml --data-root /data/imagenet
  multi-GPU:    accelerate launch --num_processes 8 caption.py --config configs/in10.yaml --data-root /data/imagenet
  job array:    python caption.py ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT   (re-run any one to merge)
  CPU (tiny):   python caption.py --dataset demo --data-root runs/demo/data --model path/to/tiny-blip2
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoProcessor, Blip2ForConditionalGeneration

import common

PAPER_MODEL = "Salesforce/blip2-opt-2.7b"  # paper §3.2 via CiP (LeavesLei/Caption_in_Prompt)


def get_parser() -> common.StageParser:
    p = common.StageParser(__doc__)
    common.add_run_options(p, "captions", seed_help="unused by greedy decoding; recorded")
    a = (captioner := p.group("captioner (paper §3.2 via CiP)")).add_argument
    a("--split", default="train", help="split to caption (the paper captions the training images)")
    a("--model", default=PAPER_MODEL, help="BLIP-2 hub id or local directory (transformers layout)")
    a("--revision", default=None, help="hub revision of --model")
    p.unshared.add("revision")  # a top-level revision pins the generator (pretrained_model), not BLIP-2
    common.add_dtype(captioner)
    a("--max-new-tokens", type=int, default=16, help="CiP: max_length 16 (paper: short captions)")
    a("--num-beams", type=int, default=1, help="1 = greedy decoding (CiP)")
    a("--prompt", default=None, help="text prompt for BLIP-2; none in the paper/CiP (plain captioning)")
    a = p.speed_group().add_argument
    a("--batch-size", type=common.positive_int, default=64, help="images per forward pass per process (CiP: 65)")
    a("--shard", type=common.parse_shard, default="0/1", help="i/n: this job's part (job arrays)")
    common.add_skip_bad(p, "the manifest")
    return p


def captions_made(out_dir: Path) -> dict[str, str]:
    """Captions already written by any process of any earlier attempt into parts/ (first occurrence wins), and those
    of an earlier merge: a finished run reopened after its parts/ were cleaned up captions nothing twice."""
    done: dict[str, str] = {}
    merged = out_dir / "captions.jsonl"
    for part in [*sorted((out_dir / "parts").glob("part-*.jsonl")), *([merged] if merged.is_file() else [])]:
        for row in common.read_jsonl(part):
            done.setdefault(row["path"], row["caption"])
    return done


def repair_tail(path: Path) -> None:
    """Drop a truncated last line (an interrupted append) before appending again, so the file stays valid JSONL."""
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def reopen(run: common.RunDir, state, log) -> None:
    """Make a finished run whose split changed an interrupted one again (left "done", the next stage stops on the new
    images' missing captions and sends the user back here, or its manifest misses the images now skipped). Without
    its manifest, make and the next stages do not take it as complete while it runs; its part files and captions.jsonl,
    keyed by path, keep every caption already made."""
    log.info("the split changed since this run finished: captioning the images it lacks (if any) and merging again")
    state.wait_for_everyone()  # every process has read the old manifest (run.begin) before it goes
    if state.is_main_process:
        run.manifest_path.unlink(missing_ok=True)  # missing: another --shard job reopened it first
    run.begin(state.wait_for_everyone)


def load_blip2(args, device: torch.device):
    dtype = common.resolve_dtype(args.dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(args.model, revision=args.revision)
        model = Blip2ForConditionalGeneration.from_pretrained(args.model, revision=args.revision, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"cannot load BLIP-2 from '{args.model}': {err}. Pass --model with a hub id (online, or in the "
            f"HF cache when HF_HUB_OFFLINE=1) or a local directory saved with save_pretrained."
        ) from err
    return processor, model.to(device).eval(), dtype


@torch.no_grad()
def caption_batch(processor, model, images, args, dtype) -> list[str]:
    """Greedy BLIP-2 captions of a list of PIL images (no text prompt: the model starts from its BOS token)."""
    kwargs = {"text": [args.prompt] * len(images)} if args.prompt else {}
    inputs = processor(images=images, return_tensors="pt", **kwargs).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=False)
    return [text.strip() for text in processor.batch_decode(out, skip_special_tokens=True)]


def run_part(index, todo, part_file: Path, args, device, is_main: bool, log) -> int:
    """Caption `todo` (dataset positions) into this process's part file, one flushed line per image."""
    if not todo:
        return 0
    processor, model, dtype = load_blip2(args, device)
    loader = torch.utils.data.DataLoader(
        common.ImageFiles([index.abspath(i) for i in todo], transform=lambda image: image),  # BLIP-2 resizes
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=lambda b: list(zip(*b)),
    )
    repair_tail(part_file)
    part_file.parent.mkdir(parents=True, exist_ok=True)
    with open(part_file, "a") as out:
        for rows, images in common.progress(loader, is_main, desc="caption", unit="batch"):
            for row, text in zip(rows, caption_batch(processor, model, list(images), args, dtype)):
                out.write(json.dumps({"path": index.samples[todo[row]].path, "caption": text}) + "\n")
            out.flush()  # a crash loses at most the current batch
    log.info(f"captioned {len(todo)} images into {part_file.name}")
    return len(todo)


def merge(run: common.RunDir, index, new: int, inputs: dict, log) -> dict:
    """Once every image of the split has a caption in some part file: captions.jsonl in split order, and the
    manifest. Until then (other --shard jobs still running) the number still missing."""
    done = captions_made(run.path)
    missing = [s.path for s in index.samples if s.path not in done]
    if missing:  # other jobs of a job array are still running: the last one to finish merges
        log.info(f"{len(missing)} images still uncaptioned (other --shard jobs); re-run any job to merge when done")
        return {"images": len(index), "captioned_now": new, "missing": len(missing)}
    run.check_in_place()
    common.write_jsonl(run.path / "captions.jsonl", ({"path": s.path, "caption": done[s.path]} for s in index.samples))
    lengths = [len(done[s.path].split()) for s in index.samples]
    metrics = {
        "images": len(index),
        "captioned_now": new,
        "empty_captions": sum(n == 0 for n in lengths),
        "mean_words": sum(lengths) / max(len(lengths), 1),
    }
    run.finish(metrics, inputs=inputs)
    log.info(f"wrote {run.path / 'captions.jsonl'}: {metrics}")
    return metrics


def main(argv=None) -> dict:
    args = common.parse_args(get_parser(), argv, "caption")

    state = PartialState()
    out_dir = common.output_dir(args, "captions")
    config = common.config_dict(args)
    # Checked up front, as in the other stages that read the real images: a bad image found at its batch stopped the
    # run hours in; left out (--skip-bad), it is neither captioned nor expected in captions.jsonl.
    index, skipped_bad, split_fingerprint = common.check_images(
        common.load_dataset(args.dataset, args.data_root, args.split), args.skip_bad
    )
    common.check_pretrained(AutoConfig.from_pretrained, args.model, args.revision, "BLIP-2")
    run = common.RunDir(out_dir, config, args.overwrite, state.is_main_process, args.shard)
    status = run.begin(state.wait_for_everyone)
    # A finished run stands while its split's files are the ones it captioned (their fingerprint) and its
    # captions.jsonl is there. Else it captions the images it lacks, if any, and merges again: the merge then also
    # names in the manifest what --skip-bad left out, and a captions.jsonl deleted by hand comes back from the parts.
    manifest = run.manifest() if status == "done" else {"inputs": {}}
    same_split = manifest["inputs"].get("split_fingerprint") == split_fingerprint
    if status == "done" and same_split and (out_dir / "captions.jsonl").is_file():
        return manifest["metrics"]
    log = common.get_logger(out_dir, state.is_main_process)
    if status == "done":
        reopen(run, state, log)

    # The job's part (--shard) is fixed over the whole dataset, so jobs that start at different times never overlap;
    # within it, images already in a part file are done (resume) and the rest is split over this job's processes.
    done = captions_made(out_dir)
    state.wait_for_everyone()  # every process has read the same state before any of them appends
    job_items = common.shard_items(range(len(index)), *args.shard)
    todo = [i for i in job_items if index.samples[i].path not in done]
    mine = common.shard_items(todo, state.process_index, state.num_processes)
    job, jobs = args.shard
    part_file = out_dir / "parts" / f"part-{job}of{jobs}-{state.process_index}of{state.num_processes}.jsonl"
    log.info(
        f"{len(index)} images, {len(done)} already captioned; this job: {len(todo)} to do, this process: {len(mine)}"
    )
    new = run_part(index, mine, part_file, args, state.device, state.is_main_process, log)
    state.wait_for_everyone()

    if not state.is_main_process:
        return {"images": len(index), "captioned_now": new}
    inputs = {
        "model": common.fingerprint(args.model, args.revision),
        "data_root": str(index.root),
        "split_fingerprint": split_fingerprint,
        "skipped_bad": skipped_bad,
    }
    return merge(run, index, new, inputs, log)


if __name__ == "__main__":
    main()
