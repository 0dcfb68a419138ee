"""caption.py on a tiny Blip2ForConditionalGeneration built from config and saved in the transformers layout."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSES, make_imagefolder

import caption
import common


def tiny_blip2(out: Path) -> Path:
    """A random tiny BLIP-2 (ViT + Q-Former + OPT) with an offline-trained byte-level BPE tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["a photo of a red circle", "a green square on a table", "a blue triangle"],
        vocab_size=300,
        min_frequency=1,
        special_tokens=["<pad>", "</s>", "<unk>"],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok, num_query_tokens=4
    )
    vocab = len(tok)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
            vocab_size=vocab,
        ),
        text_config=OPTConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ).to_dict(),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config)
    # A random model tends to emit special tokens (skipped when decoding): forbid them so captions are non-empty.
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = [tok.pad_token_id, tok.unk_token_id, config.image_token_index]
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return out / "model"


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    return tiny_blip2(tmp_path_factory.mktemp("blip2"))


def run(tiny_dataset, blip2, out, *extra):
    return caption.main(
        [
            "--dataset",
            "demo",
            "--data-root",
            str(tiny_dataset),
            "--model",
            str(blip2),
            "--output-dir",
            str(out),
            *"--batch-size 5 --num-workers 0".split(),
            *extra,
        ]
    )


def direct_captions(blip2, index):
    """Independent computation: the model's own processor and generate, image by image."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(blip2)
    model = Blip2ForConditionalGeneration.from_pretrained(blip2).eval()
    result = {}
    for i, s in enumerate(index.samples):
        inputs = processor(images=common.load_image(index.abspath(i)), return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        result[s.path] = processor.decode(ids[0], skip_special_tokens=True).strip()
    return result


def test_captions_cover_dataset_and_match_direct_generation(tiny_dataset, blip2, tmp_path):
    metrics = run(tiny_dataset, blip2, tmp_path / "cap")
    index = common.load_dataset("demo", tiny_dataset, "train")
    rows = common.read_jsonl(tmp_path / "cap" / "captions.jsonl")
    assert [r["path"] for r in rows] == [s.path for s in index.samples]  # dataset order, nothing lost or duplicated
    assert metrics["images"] == len(index) == 12
    expected = direct_captions(blip2, index)
    assert {r["path"]: r["caption"] for r in rows} == expected
    assert sum(bool(r["caption"]) for r in rows) >= 3  # real text came out (a random model also emits spaces)
    # the consumer side reads it back
    assert common.captions_for(index, common.load_captions(tmp_path / "cap" / "captions.jsonl")) == [
        expected[s.path] for s in index.samples
    ]
    # a complete run is a no-op: the file is not rewritten
    mtime = (tmp_path / "cap" / "captions.jsonl").stat().st_mtime_ns
    assert run(tiny_dataset, blip2, tmp_path / "cap") == common.read_json(tmp_path / "cap" / "manifest.json")["metrics"]
    assert (tmp_path / "cap" / "captions.jsonl").stat().st_mtime_ns == mtime


def test_resume_skips_done_images_and_repairs_truncated_part(tiny_dataset, blip2, tmp_path):
    index = common.load_dataset("demo", tiny_dataset, "train")
    out = tmp_path / "cap"
    parts = out / "parts"
    parts.mkdir(parents=True)
    done = {index.samples[0].path: "kept one", index.samples[5].path: "kept two"}
    lines = "".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in done.items())
    # an interrupted run: a part file of this process with a truncated last line
    (parts / "part-0of1-0of1.jsonl").write_text(lines + '{"path": "red_ci')
    metrics = run(tiny_dataset, blip2, out)
    assert metrics["captioned_now"] == len(index) - 2
    rows = common.read_jsonl(out / "captions.jsonl")
    assert len(rows) == len({r["path"] for r in rows}) == len(index)
    got = {r["path"]: r["caption"] for r in rows}
    assert all(got[p] == c for p, c in done.items())  # resumed, not recomputed
    for part in parts.glob("*.jsonl"):
        common.read_jsonl(part)  # every part file is valid JSONL again (no corrupt line in the middle)


def test_job_shards_merge_only_when_complete(tiny_dataset, blip2, tmp_path):
    out = tmp_path / "cap"
    first = run(tiny_dataset, blip2, out, "--shard", "0/2")
    assert first["missing"] == 6 and not (out / "captions.jsonl").exists() and not (out / "manifest.json").exists()
    second = run(tiny_dataset, blip2, out, "--shard", "1/2")
    assert second["captioned_now"] == 6
    rows = common.read_jsonl(out / "captions.jsonl")
    index = common.load_dataset("demo", tiny_dataset, "train")
    assert [r["path"] for r in rows] == [s.path for s in index.samples]
    assert len(list((out / "parts").glob("*.jsonl"))) == 2


def test_a_changed_split_captions_only_its_new_images(blip2, tmp_path):
    """A finished run used to say "already finished" after images were added, while synthesize.py stopped on their
    missing captions and sent the user back here: a loop only --overwrite (every image again) broke."""
    train = make_imagefolder(tmp_path / "data" / "train", TINY_CLASSES, 2)
    out = tmp_path / "cap"
    run(train.parent, blip2, out)
    first = {r["path"]: r["caption"] for r in common.read_jsonl(out / "captions.jsonl")}
    shutil.copy(train / "red_circle" / "red_circle_000.png", train / "red_circle" / "red_circle_new.png")
    metrics = run(train.parent, blip2, out)
    assert metrics["captioned_now"] == 1 and metrics["images"] == 7
    got = {r["path"]: r["caption"] for r in common.read_jsonl(out / "captions.jsonl")}
    assert got == {**first, "red_circle/red_circle_new.png": first["red_circle/red_circle_000.png"]}  # same pixels
    index = common.load_dataset("demo", train.parent, "train")
    common.captions_for(index, common.load_captions(out / "captions.jsonl"))  # what synthesize.py reads: complete
    assert common.read_json(out / "manifest.json")["metrics"] == metrics
    # an image removed from the split leaves captions.jsonl too, with nothing captioned again
    (train / "green_square" / "green_square_000.png").unlink()
    assert run(train.parent, blip2, out)["captioned_now"] == 0
    index = common.load_dataset("demo", train.parent, "train")
    assert [r["path"] for r in common.read_jsonl(out / "captions.jsonl")] == [s.path for s in index.samples]
    (out / "captions.jsonl").unlink()  # and a lost captions.jsonl is merged again from the part files
    assert run(train.parent, blip2, out)["captioned_now"] == 0 and (out / "captions.jsonl").is_file()


def test_a_bad_image_stops_the_stage_before_it_starts_unless_skip_bad(blip2, tmp_path):
    """Found at its batch, a bad image stopped the run there (hours in) and left the rest of its batch uncaptioned."""
    train = make_imagefolder(tmp_path / "data" / "train", TINY_CLASSES, 2)
    bad = train / "green_square" / "green_square_001.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:40])  # truncated
    out = tmp_path / "cap"
    with pytest.raises(common.ImageReadError, match=r"(?s)1 unreadable .*green_square_001\.png.*--skip-bad"):
        run(train.parent, blip2, out)
    assert not out.exists()
    assert run(train.parent, blip2, out, "--skip-bad")["images"] == 5
    assert "green_square/green_square_001.png" not in {r["path"] for r in common.read_jsonl(out / "captions.jsonl")}
    assert list(common.read_json(out / "manifest.json")["inputs"]["skipped_bad"]) == [
        "green_square/green_square_001.png"
    ]
    bad.write_bytes(good)  # repaired: captioned on the next run, as an added image
    assert run(train.parent, blip2, out, "--skip-bad")["captioned_now"] == 1
    assert common.read_json(out / "manifest.json")["inputs"]["skipped_bad"] == {}
    (train / "red_circle" / "new.png").write_bytes(b"garbage")  # a new bad file: nothing to caption, but named
    assert run(train.parent, blip2, out, "--skip-bad")["captioned_now"] == 0
    assert list(common.read_json(out / "manifest.json")["inputs"]["skipped_bad"]) == ["red_circle/new.png"]
    assert run(train.parent, blip2, out, "--skip-bad")["captioned_now"] == 0  # and then it is finished
    shutil.rmtree(out / "parts")  # cleaned up after the run: a reopened run captions nothing twice
    (train / "red_circle" / "new.png").unlink()
    assert run(train.parent, blip2, out)["captioned_now"] == 0


def test_bad_model_path_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(OSError, match="cannot load BLIP-2"):
        run(tiny_dataset, tmp_path / "nope", tmp_path / "cap")
    assert not (tmp_path / "cap").exists()  # checked before the run dir: the corrected command starts clean
