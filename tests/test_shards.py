"""synthesize.py --output-format wds: tar shards round-trip, resume after a kill, reuse across layouts, train_cls
reads them as it reads folders, and --plan."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import args_for
from PIL import Image
from safetensors.torch import load_file

import synthesize
import train_cls
from common import ImageReadError, load_image, load_synthetic, read_json, read_jsonl

WDS = "--scale 1.5 --output-format wds --shard-samples 5".split()  # 18 images of 12 sources: shards of 5, 5, 5, 3
SHARD_FIELDS = {"shard", "key", "offset", "size"}


def folder_rows(rows):
    return [{k: v for k, v in r.items() if k not in SHARD_FIELDS} for r in rows]


def tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_shards_hold_the_folder_sets_images_labels_and_rows(tiny_sd, tiny_dataset, tmp_path):
    folder, wds = tmp_path / "folder", tmp_path / "wds"
    synthesize.main(args_for(tiny_sd, tiny_dataset, folder, "--scale", "1.5"))
    m = synthesize.main(args_for(tiny_sd, tiny_dataset, wds, *WDS))
    assert m["complete"] and m["images"] == 18 and m["shards"] == 4 and m["output_format"] == "wds"
    assert sorted(p.name for p in (wds / "shards").iterdir()) == [
        f"00000{b}.{e}" for b in range(4) for e in ("json", "tar")
    ]
    assert not [p for p in wds.iterdir() if p.is_dir() and p.name != "shards"]  # no class folders
    rows = read_jsonl(wds / "manifest.jsonl")
    assert folder_rows(rows) == read_jsonl(folder / "manifest.jsonl")  # same images, same order, same seeds
    assert m["bytes"] == sum((wds / "shards" / f"00000{b}.tar").stat().st_size for b in range(4))
    # WebDataset layout: per sample <key>.jpg, <key>.cls, <key>.json next to each other; every member is readable.
    seen = []
    for b in range(4):
        members = tar_members(wds / "shards" / f"00000{b}.tar")
        assert len(members) % 3 == 0
        for (img, data), (cls, label), (meta, row) in zip(members[::3], members[1::3], members[2::3]):
            key = img[: -len(".jpg")]
            assert (cls, meta) == (f"{key}.cls", f"{key}.json") and "." not in key.rsplit("/", 1)[1]
            row = json.loads(row)
            assert int(label) == row["label"] and f"{key}.jpg" == row["file"]
            folder_pixels = np.asarray(Image.open(folder / row["file"]), dtype=np.int16)
            assert np.abs(np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) - folder_pixels).max() <= 2
            seen.append(row["file"])
    assert sorted(seen) == sorted(r["file"] for r in rows)  # each image once
    labels = [r["label"] for r in read_json(wds / "shards" / "000000.json")["samples"]]
    assert len(set(labels)) > 1  # a shard mixes classes (seeded order), a streaming reader needs no big buffer
    ds = load_synthetic(wds)
    assert [s.path for s in ds.samples] == [r["file"] for r in read_jsonl(folder / "manifest.jsonl")]
    assert load_image(ds.abspath(3)).size == (32, 32)


def test_a_kill_during_a_shard_resumes_without_duplicates_or_losses(tiny_sd, tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "wds"
    real_write = synthesize.write_shard
    written = []

    def dies_on_the_third_shard(out_dir, b, *a):
        if len(written) == 2:
            raise KeyboardInterrupt  # kill -9 in the middle of a shard: its tar is never renamed into place
        written.append(b)
        return real_write(out_dir, b, *a)

    monkeypatch.setattr(synthesize, "write_shard", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        synthesize.main(args_for(tiny_sd, tiny_dataset, out, *WDS, "--batch-size", "4"))
    monkeypatch.setattr(synthesize, "write_shard", real_write)
    done = sorted(written)
    # Also a tar whose index was never written (killed between the two), and a writer's temp file.
    (out / "shards" / "000003.tar").write_bytes(b"partial")
    (out / "shards" / ".000003.tar.x.tmp").write_bytes(b"junk")
    before = {b: (out / "shards" / f"{b:06d}.tar").read_bytes() for b in done}
    m = synthesize.main(args_for(tiny_sd, tiny_dataset, out, *WDS, "--batch-size", "4"))
    missing = [b for b in range(4) if b not in done]
    shard_sizes = [5, 5, 5, 3]
    assert m["complete"] and m["generated"] == sum(shard_sizes[b] for b in missing)
    assert all((out / "shards" / f"{b:06d}.tar").read_bytes() == before[b] for b in done)  # left alone
    rows = read_jsonl(out / "manifest.jsonl")
    assert len(rows) == 18 and len({r["file"] for r in rows}) == 18
    assert not list(out.glob("*/.*"))
    # A damaged shard (truncated tar) is redone on the next run; the rest stay.
    tar = out / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    (out / "manifest.json").unlink()
    m = synthesize.main(args_for(tiny_sd, tiny_dataset, out, *WDS))
    assert m["generated"] == 5 and m["complete"]


def test_job_array_shards_and_reuse_across_layouts(tiny_sd, tiny_dataset, tmp_path):
    """--shard i/n splits whole tar shards between jobs; a wds x2 reuses a folder x1's 12 images (same seeds) and a
    folder x2 unpacks them from a wds x1's shards."""
    clean, split = tmp_path / "clean", tmp_path / "split"
    synthesize.main(args_for(tiny_sd, tiny_dataset, clean, *WDS))
    assert not synthesize.main(args_for(tiny_sd, tiny_dataset, split, *WDS, "--shard", "0/2"))["complete"]
    # train_cls and eval_gap, given the set while a job has still to run, say so: it was "not a synthesize.py output"
    with pytest.raises(FileNotFoundError, match=r"unfinished synthesize.py output .* each --shard i/n job"):
        load_synthetic(split)
    assert synthesize.main(args_for(tiny_sd, tiny_dataset, split, *WDS, "--shard", "1/2"))["complete"]
    assert read_jsonl(split / "manifest.jsonl") == read_jsonl(clean / "manifest.jsonl")
    # The jobs share one log.txt: each line says which job it is, so a job that never finished can be named.
    done = [line for line in (split / "log.txt").read_text().splitlines() if "] done" in line]
    assert [("--shard 0/2" in line, "--shard 1/2" in line) for line in done] == [(True, False), (False, True)]
    assert "--shard" not in (clean / "log.txt").read_text()  # a single job says nothing of job arrays

    x1_folder, x1_wds = tmp_path / "x1_folder", tmp_path / "x1_wds"
    synthesize.main(args_for(tiny_sd, tiny_dataset, x1_folder))
    synthesize.main(args_for(tiny_sd, tiny_dataset, x1_wds, "--output-format", "wds", "--shard-samples", "5"))
    wds2 = synthesize.main(
        args_for(
            tiny_sd, tiny_dataset, tmp_path / "x2_wds", *"--scale 2 --output-format wds --reuse-from".split(), x1_folder
        )
    )
    assert wds2["generated"] == 12 and wds2["images"] == 24
    folder2 = synthesize.main(
        args_for(tiny_sd, tiny_dataset, tmp_path / "x2_folder", "--scale", "2", "--reuse-from", x1_wds)
    )
    assert folder2["generated"] == 12 and folder2["images"] == 24
    a = load_synthetic(x1_folder)
    by_name = {s.path: i for i, s in enumerate(load_synthetic(tmp_path / "x2_wds").samples)}
    for i, sample in enumerate(a.samples):  # reused images are the folder run's bytes, unchanged
        b = load_synthetic(tmp_path / "x2_wds")
        assert b.abspath(by_name[sample.path]).read_bytes() == a.abspath(i).read_bytes()


def test_train_cls_reads_a_shard_set_as_the_folder_set(tiny_sd, tiny_dataset, tmp_path):
    """The same images as shards or files train the same classifier: same order, labels, pixels, figures."""
    folder, wds = tmp_path / "folder", tmp_path / "wds"
    synthesize.main(args_for(tiny_sd, tiny_dataset, folder))
    synthesize.main(
        args_for(tiny_sd, tiny_dataset, wds, "--output-format", "wds", "--shard-samples", "5", "--reuse-from", folder)
    )
    common = (
        "--dataset demo --model test_resnet --input-size 32 --batch-size 4 --max-device-batch 4 --lr 0.05 "
        "--decay-milestones 2 --workers 2 --amp no --epochs 2 --seed 3"
    ).split() + ["--data-root", str(tiny_dataset)]
    results = {}
    for name, source in (("folder", folder), ("wds", wds)):
        out = tmp_path / f"cls_{name}"
        results[name] = train_cls.main(common + ["--train-dirs", "real", str(source), "--output-dir", str(out)])
    assert results["folder"]["top1"] == results["wds"]["top1"]
    a, b = (load_file(tmp_path / f"cls_{name}" / "model.safetensors") for name in ("folder", "wds"))
    tol = {"rtol": 0, "atol": 0} if not torch.cuda.is_available() else {"rtol": 1e-3, "atol": 1e-4}
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), **tol) for k in a)


def test_a_truncated_shard_is_a_named_read_error(tiny_sd, tiny_dataset, tmp_path):
    out = tmp_path / "wds"
    synthesize.main(args_for(tiny_sd, tiny_dataset, out, *WDS))
    ds = load_synthetic(out)
    last = max(range(len(ds)), key=lambda i: (ds.samples[i].shard, ds.samples[i].offset))
    tar = out / ds.samples[last].shard
    tar.write_bytes(tar.read_bytes()[: ds.samples[last].offset + 10])
    with pytest.raises(ImageReadError, match=ds.samples[last].path):
        load_image(ds.abspath(last))
    # read_bytes itself refuses the short read (reuse copies these bytes into a folder set without decoding them)
    with pytest.raises(ImageReadError, match=rf"{ds.samples[last].path}: .* ends before byte"):
        ds.abspath(last).read_bytes()


def test_plan_counts_images_files_and_bytes_without_a_model(tiny_sd, tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synthesize, "load_pipeline", lambda *a, **k: pytest.fail("--plan loaded the model"))
    plan = synthesize.main(
        args_for(tiny_sd, tiny_dataset, tmp_path / "p", *WDS, "--plan", "--config", "configs/demo.yaml")
    )
    assert plan["images"] == 18 and plan["files"] == 8  # 4 shards: a tar and an index each
    assert plan["bytes"] == 18 * (synthesize.stored_bytes(32, 95, "jpg") + synthesize.WDS_BYTES_PER_IMAGE)
    hours = plan["gpu_hours"]
    assert set(hours) == {"finetune", "synthesize", "train_cls real", "train_cls synth_x1.5", "train_cls mix_x1.5"}
    assert hours["train_cls mix_x1.5"] == pytest.approx(hours["train_cls real"] + hours["train_cls synth_x1.5"])
    printed = capsys.readouterr().out
    assert "GPU-hours" in printed and not (tmp_path / "p").exists()
    # 32 px images: sizes in a unit that shows them (the printout said "about 0 kB/image, 0.00 TB")
    per_image = synthesize.stored_bytes(32, 95, "jpg") + synthesize.WDS_BYTES_PER_IMAGE
    assert f"about {per_image / 1e3:.2g} kB/image, {18 * per_image / 1e3:.0f} kB" in printed
    assert [synthesize.readable_bytes(b) for b in (0.428e12, 33.4e3, 2.5e8)] == ["0.43 TB", "33 kB", "0.25 GB"]
    # bytes scale with the stored pixels: 256 px is about a quarter of 512 px at the same quality
    assert synthesize.stored_bytes(512, 95, "jpg") == synthesize.MEASURED_JPEG_BYTES[(512, 95)]
    assert 3.0 < synthesize.stored_bytes(512, 95, "jpg") / synthesize.stored_bytes(256, 95, "jpg") < 4.0


def test_plan_counts_only_the_sources_a_subset_mask_keeps(tiny_sd, tiny_dataset, tmp_path, capsys):
    """A LiRA shadow's synthesis (--subset-mask) reads the selected sources only; --plan counted the whole split."""
    mask = tmp_path / "mask.npy"
    np.save(mask, np.arange(12) % 3 == 0)  # 4 of the 12 sources
    plan = synthesize.main(args_for(tiny_sd, tiny_dataset, tmp_path / "p", *WDS, "--plan", "--subset-mask", mask))
    assert plan["images"] == 6 and plan["files"] == 4  # x1.5 of 4 sources: shards of 5 and 1
    assert "(4 sources: demo train split, --subset-mask" in capsys.readouterr().out


def test_eval_gap_and_sscd_read_a_shard_set_as_its_folder_twin(
    tiny_sd, tiny_dataset, tiny_clip_vision, tmp_path_factory, tmp_path
):
    import eval_gap
    import sscd_sim

    folder, wds = tmp_path / "folder", tmp_path / "wds"
    synthesize.main(args_for(tiny_sd, tiny_dataset, folder))
    synthesize.main(
        args_for(tiny_sd, tiny_dataset, wds, *"--output-format wds --shard-samples 5 --reuse-from".split(), folder)
    )
    gap, copies = {}, {}
    standin = tmp_path / "standin.pt"
    sscd_sim.main(["--make-standin", str(standin)])
    for name, source in (("folder", folder), ("wds", wds)):
        argv = f"--dataset demo --data-root {tiny_dataset} --synthetic-dir {source} --kid-subsets 3 --kid-subset-size 8"
        argv = argv.split() + ["--features", f"clip:{tiny_clip_vision}", "--output-dir", str(tmp_path / f"gap_{name}")]
        gap[name] = eval_gap.main(argv)
        copies[name] = sscd_sim.main(
            f"--dataset demo --data-root {tiny_dataset} --synthetic-dir {source} --model {standin}".split()
            + [
                "--num-workers",
                "0",
                "--output-dir",
                str(tmp_path / f"sscd_{name}"),
                "--cache-dir",
                str(tmp_path / f"cache_{name}"),
            ]
        )
    assert gap["folder"]["fid"] == pytest.approx(gap["wds"]["fid"], abs=1e-9) and "precision" in gap["wds"]
    assert {k: v for k, v in copies["wds"].items() if isinstance(v, float)} == pytest.approx(
        {k: v for k, v in copies["folder"].items() if isinstance(v, float)}
    )


def test_bad_sources_stay_recorded_when_a_job_runs_again_with_nothing_left_to_do(tiny_sd, tiny_dataset, tmp_path):
    """A re-run of a job whose shards were complete rewrote its bad-source file as [] (complete shards are never read
    again), and the manifest then counted a missing image but no bad source. A shard's index records them."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    (root / "train" / "green_square" / "green_square_001.png").write_bytes(b"not a png")
    for first, last in (("0/2", "1/2"), ("1/2", "0/2")):  # one of them holds the bad source's shard
        out = tmp_path / first.replace("/", "of")
        for part in (first, first, last):
            m = synthesize.main(args_for(tiny_sd, root, out, *WDS, "--skip-bad", "--shard", part))
        assert m["complete"] and m["images"] == 18 - m["bad_images"] and m["bad_images"] > 0
        assert m["bad_sources"] == 1
        bad = read_json(out / "manifest.json")["inputs"]["bad_sources"]
        assert list(bad) == ["green_square/green_square_001.png"]
