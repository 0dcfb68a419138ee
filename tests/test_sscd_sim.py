"""SSCD copy detection (sscd_sim.py) with the project's stand-in TorchScript descriptor saved to disk, so the real
loading path (torch.jit.load of a file) runs; the real sscd_disc_large file cannot be downloaded here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import as_made_before, moved_aside_before
from PIL import Image

import common
import sscd_sim
from common import load_dataset


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sscd") / "standin.torchscript.pt"
    assert sscd_sim.main(["--make-standin", str(path)]) == {"standin": str(path)}
    return path


def make_synthetic_dir(root: Path, real_root: Path, copy_from: str) -> Path:
    """A finished synthesize.py-shaped output: one exact copy of a real image and three unrelated images."""
    real = load_dataset("demo", real_root, "train")
    rows = []
    src = real.root / copy_from
    (root / "0").mkdir(parents=True)
    shutil.copy(src, root / "0" / "copy_0.png")
    rows.append({"file": "0/copy_0.png", "label": 0, "source": copy_from})
    rng = np.random.default_rng(7)
    for k in range(3):  # structure unrelated to the real images: stripes, a gradient, fresh noise
        if k == 0:
            arr = np.tile((np.arange(32) // 4 % 2 * 255)[None, :, None], (32, 1, 3))
        elif k == 1:
            arr = np.tile(np.linspace(0, 255, 32)[:, None, None], (1, 32, 3))
        else:
            arr = rng.integers(0, 255, (32, 32, 3))
        Image.fromarray(arr.astype(np.uint8)).save(root / "0" / f"other_{k}.png")
        rows.append({"file": f"0/other_{k}.png", "label": 0, "source": copy_from})
    (root / "classes.json").write_text(json.dumps({"classes": real.classes, "class_names": real.class_names}))
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "manifest.json").write_text(json.dumps({"config": {}, "metrics": {"images": len(rows)}}))  # written last
    return root


def sscd_argv(data_root, synth, model, out, *extra) -> list[str]:
    base = ["--dataset", "demo", "--data-root", str(data_root), "--synthetic-dir", str(synth), "--model", str(model)]
    return base + ["--output-dir", str(out), "--num-workers", "0", *map(str, extra)]


def test_standin_is_labelled_and_normalised(standin):
    model, info = sscd_sim.load_descriptor(standin, torch.device("cpu"))
    assert info["standin"] and "NOT SSCD" in info["note"]
    x = torch.randn(3, 3, 40, 56)
    emb = model(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(model(x[:1]), emb[:1])  # deterministic and per-image
    with pytest.raises(FileNotFoundError, match="trusted"):
        sscd_sim.load_descriptor(standin.parent / "missing.pt", torch.device("cpu"))


def test_the_standin_made_from_a_moved_project_is_the_same_file(tmp_path):
    """The archive's bytes hold the path of the script that made it (TorchScript's debug info), and its hash is every
    sscd run's identity: after the project folder was moved or renamed, `make demo` made it anew with other bytes and
    stopped at sscd_sim with a mismatch in model_fingerprint. An equal stand-in already there is kept."""
    elsewhere = tmp_path / "moved_project"
    elsewhere.mkdir()
    for script in ("sscd_sim.py", "common.py"):
        shutil.copy(common.PROJECT_DIR / script, elsewhere / script)
    path = tmp_path / "standin.pt"
    made = "import sscd_sim, sys; sscd_sim.save_standin(sys.argv[1])"
    subprocess.run([sys.executable, "-c", made, str(path)], cwd=elsewhere, check=True, capture_output=True)
    before = path.read_bytes()
    sscd_sim.save_standin(path)
    assert path.read_bytes() == before
    sscd_sim.save_standin(path, seed=1)  # another model: written anew
    other = sscd_sim.load_descriptor(path, "cpu")[0].projection
    assert torch.equal(other, sscd_sim.StandinDescriptor(seed=1).projection)


def test_topk_search_matches_dense_computation():
    g = torch.Generator().manual_seed(0)
    refs = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(11, 8, generator=g), dim=1)
    vals, idx = sscd_sim.topk_search(queries, refs, 5, chunk=4, device="cpu")
    dense = queries @ refs.T
    want_v, want_i = dense.topk(5, dim=1)
    torch.testing.assert_close(vals, want_v)
    assert torch.equal(idx, want_i)
    # Background: the query itself is skipped, so its top-1 is its nearest *other* reference.
    own = torch.tensor([3, 17, 36])
    vals, idx = sscd_sim.topk_search(refs[own], refs, 1, chunk=5, device="cpu", self_index=own)
    masked = refs[own] @ refs.T
    masked[torch.arange(3), own] = -float("inf")
    assert torch.equal(idx[:, 0], masked.argmax(1)) and not (idx[:, 0] == own).any()


def test_copy_is_found_and_unrelated_images_are_not(tmp_path, tiny_dataset, standin):
    real = load_dataset("demo", tiny_dataset, "train")
    copied = real.samples[5].path
    synth = make_synthetic_dir(tmp_path / "synth", tiny_dataset, copied)
    out, cache = tmp_path / "sscd", tmp_path / "cache"
    argv = [
        "--dataset",
        "demo",
        "--data-root",
        str(tiny_dataset),
        "--synthetic-dir",
        str(synth),
        "--model",
        str(standin),
        "--output-dir",
        str(out),
        "--cache-dir",
        str(cache),
        *"--num-workers 0 --chunk-size 5".split(),
    ]
    metrics = sscd_sim.main(argv)
    rows = {r["file"]: r for r in map(json.loads, (out / "matches.jsonl").read_text().splitlines())}
    top = rows["0/copy_0.png"]["matches"]
    assert top[0]["path"] == copied and top[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert len(top) == 5 and all(a["similarity"] >= b["similarity"] for a, b in zip(top, top[1:]))
    for k in range(3):
        assert rows[f"0/other_{k}.png"]["matches"][0]["similarity"] < 0.5
    s = metrics["synthetic_vs_real"]
    assert s["num_replications"] == 1 and s["replication_rate"] == pytest.approx(0.25) and s["count"] == 4
    assert metrics["descriptor"]["standin"] is True
    assert metrics["top_matches"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    bg = metrics["real_vs_real_background"]
    assert bg["count"] == len(real) and bg["max"] < 0.99  # nearest *other* image: no self-match at 1
    assert metrics["num_embedded"] == {"real": len(real), "synthetic": 4}
    for name in ("results.json", "histogram.png", "top_matches.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert sscd_sim.main(argv) == metrics  # complete: a no-op

    # Another synthetic set against the same real images: only the new image is embedded.
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 90).save(synth / "0" / "new.png")
    with open(synth / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"file": "0/new.png", "label": 0}) + "\n")
    again = sscd_sim.main(
        [
            *argv[:-6],
            "--output-dir",
            str(tmp_path / "sscd2"),
            "--cache-dir",
            str(cache),
            *"--num-workers 0 --threshold 0.99".split(),
        ]
    )
    assert again["num_embedded"] == {"real": 0, "synthetic": 1}
    assert again["synthetic_vs_real"]["count"] == 5 and again["synthetic_vs_real"]["num_replications"] == 1


def test_identity_is_the_files_of_the_sets_and_the_model(tmp_path, tiny_dataset, standin, monkeypatch):
    """A re-run after `synthesize.py --overwrite` regenerated the set (same paths, other images) said 'already
    finished' and kept the old matches; the same files under another data root are the same run."""
    real = load_dataset("demo", tiny_dataset, "train")
    synth = make_synthetic_dir(tmp_path / "synth", tiny_dataset, real.samples[5].path)
    out, cache = tmp_path / "sscd", ("--cache-dir", tmp_path / "cache")
    model_reads, real_fingerprint = [], common.fingerprint
    monkeypatch.setattr(common, "fingerprint", lambda p, *a: model_reads.append(p) or real_fingerprint(p, *a))
    first = sscd_sim.main(sscd_argv(tiny_dataset, synth, standin, out, *cache))
    assert first["synthetic_vs_real"]["num_replications"] == 1
    assert [str(p) for p in model_reads].count(str(standin)) == 1  # hashed once: identity and descriptor info
    assert first["descriptor"]["sha256_16"] == real_fingerprint(standin)
    monkeypatch.undo()
    moved = tmp_path / "moved_data"
    shutil.copytree(tiny_dataset, moved)  # copy2: sizes and mtimes kept, so the same split fingerprint
    assert sscd_sim.main(sscd_argv(moved, synth, standin, out, *cache)) == first

    # Regenerated in place: the copy is now noise, and the manifest rows changed with the images.
    noise = np.random.default_rng(1).integers(0, 255, (32, 32, 3)).astype(np.uint8)
    Image.fromarray(noise).save(synth / "0" / "copy_0.png")
    rows = [{**json.loads(line), "seed": 1} for line in (synth / "manifest.jsonl").read_text().splitlines()]
    (synth / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(common.ConfigMismatchError, match="sets"):
        sscd_sim.main(sscd_argv(tiny_dataset, synth, standin, out, *cache))
    again = sscd_sim.main(sscd_argv(tiny_dataset, synth, standin, out, *cache, "--overwrite"))
    assert again["synthetic_vs_real"]["num_replications"] == 0 and again["num_embedded"]["synthetic"] == 1

    other_model = sscd_sim.save_standin(tmp_path / "other.pt", seed=1)
    shutil.copy(standin, tmp_path / "model.pt")
    sscd_sim.main(sscd_argv(tiny_dataset, synth, tmp_path / "model.pt", tmp_path / "sscd_m", *cache))
    shutil.copy(other_model, tmp_path / "model.pt")  # another model file at the same path
    with pytest.raises(common.ConfigMismatchError, match="model_fingerprint"):
        sscd_sim.main(sscd_argv(tiny_dataset, synth, tmp_path / "model.pt", tmp_path / "sscd_m", *cache))


def test_an_unfinished_synthesize_output_is_refused(tmp_path, tiny_dataset, standin):
    """Without its manifest.json, a synthesize.py output was read as a plain ImageFolder of the images made so far."""
    real = load_dataset("demo", tiny_dataset, "train")
    synth = make_synthetic_dir(tmp_path / "synth", tiny_dataset, real.samples[0].path)
    (synth / "manifest.json").unlink()
    for name in ("manifest.jsonl", "classes.json"):  # as synthesize.py leaves it mid-run: run_config.json only
        (synth / name).unlink()
    (synth / "run_config.json").write_text(json.dumps({"config": {}, "config_hash": "0"}))
    out = tmp_path / "sscd"
    with pytest.raises(FileNotFoundError, match="unfinished synthesize.py output"):
        sscd_sim.main(sscd_argv(tiny_dataset, synth, standin, out, "--cache-dir", tmp_path / "cache"))
    assert not out.exists()


def test_the_cache_sits_beside_the_output_folder(tmp_path, tiny_dataset, standin, monkeypatch):
    """Run from another folder with --output-dir elsewhere, the cache landed in ./runs/<dataset>/sscd_cache."""
    real = load_dataset("demo", tiny_dataset, "train")
    synth = make_synthetic_dir(tmp_path / "synth", tiny_dataset, real.samples[0].path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    sscd_sim.main(sscd_argv(tiny_dataset, synth, standin, tmp_path / "x" / "out_sscd"))
    assert list((tmp_path / "x" / "sscd_cache").glob("*/chunk_*.npz"))
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_bad_inputs_fail_before_the_run_dir(tmp_path, tiny_dataset, standin):
    """A wrong --model or --data-root fails with the fix and leaves no run config behind, so the corrected command
    runs in the same output dir (a left config would be a mismatch needing --overwrite)."""
    real = load_dataset("demo", tiny_dataset, "train")
    synth = make_synthetic_dir(tmp_path / "synth", tiny_dataset, real.samples[0].path)
    out = tmp_path / "sscd"

    def argv(model, data_root):
        return [
            *"--dataset demo --num-workers 0".split(),
            "--data-root",
            str(data_root),
            "--synthetic-dir",
            str(synth),
            "--model",
            str(model),
            "--output-dir",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]

    with pytest.raises(FileNotFoundError, match="trusted"):
        sscd_sim.main(argv(tmp_path / "missing.pt", tiny_dataset))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sscd_sim.main(argv(standin, tmp_path / "no_data"))
    assert not out.exists()
    sscd_sim.main(argv(standin, tiny_dataset))  # the corrected command, same output dir: no config mismatch
    assert (out / "manifest.json").is_file()


def test_a_run_moved_aside_while_searching_writes_nothing_into_its_successor(
    tmp_path, tiny_dataset, standin, monkeypatch
):
    real = load_dataset("demo", tiny_dataset, "train")
    synth = make_synthetic_dir(tmp_path / "synth", tiny_dataset, real.samples[5].path)
    out = tmp_path / "sscd"
    moved_aside_before(monkeypatch, sscd_sim, "topk_search", out)
    with pytest.raises(common.RunMovedError):
        sscd_sim.main(sscd_argv(tiny_dataset, synth, standin, out, "--cache-dir", tmp_path / "cache"))
    assert {p.name for p in out.iterdir()} <= {"run_config.json", "log.txt", ".writer-0of1.lock"}  # the new run's


def test_the_standin_is_the_same_file_every_time_it_is_made(tmp_path):
    """make demo makes the stand-in before every sscd_sim run, and the model file's hash is the run's identity: its
    bytes differed each time (the TorchScript archive is named after the temp file), so a second make demo (an
    interrupted one going on, say) stopped at sscd_sim with 'changed: model_fingerprint'."""
    first = sscd_sim.save_standin(tmp_path / "standin.pt")
    made = common.fingerprint(first)
    assert common.fingerprint(sscd_sim.save_standin(tmp_path / "standin.pt")) == made
    assert common.fingerprint(sscd_sim.save_standin(tmp_path / "elsewhere" / "standin.pt")) == made
    assert common.fingerprint(sscd_sim.save_standin(tmp_path / "other.pt", seed=1)) != made


def test_a_set_or_model_moved_or_spelled_otherwise_is_the_same_run(tmp_path, tiny_dataset, standin, monkeypatch):
    """The set's and the model's files are the identity (sets, model_fingerprint), not their paths: a runs folder moved
    or a relative path for an absolute one was a config mismatch naming 'synthetic_dir' or 'model'. A run made while
    the paths were hashed is adopted."""
    copied = load_dataset("demo", tiny_dataset, "train").samples[5].path
    synth = make_synthetic_dir(tmp_path / "runs" / "synth", tiny_dataset, copied)
    shutil.copy(standin, tmp_path / "runs" / "model.pt")
    out, cache = tmp_path / "sscd", ("--cache-dir", tmp_path / "cache")
    first = sscd_sim.main(sscd_argv(tiny_dataset, synth, tmp_path / "runs" / "model.pt", out, *cache))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert sscd_sim.main(sscd_argv(tiny_dataset, "moved/synth", "moved/model.pt", out, *cache)) == first
    as_made_before(out, synthetic_dir=str(synth), model=str(tmp_path / "runs" / "model.pt"))
    assert sscd_sim.main(sscd_argv(tiny_dataset, "moved/synth", "moved/model.pt", out, *cache)) == first
