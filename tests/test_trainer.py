"""The draft training loop on a tiny random LLaVA target (CPU): exact resume, learning on a
toy task, 2-rank DDP against one rank, the curriculum's multimodal share, bad data, and the
``msd features`` / ``msd train`` commands."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from msd.cli import main
from msd.draft_checkpoint import load_draft, read_state_dict
from msd.train.curriculum import multimodal_probability
from msd.train.trainer import METRICS_FILE, TrainConfig, last_checkpoint, train

from tiny_models import tiny_llava, tiny_processor

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["what is this ?", "and this ?", "what is a dog ?", "is this a cat ?"]
ANSWERS = ["a cat .", "a dog .", "a very long dog .", "a cat and a dog ."]


def conversation(i: int, image: bool = False) -> list[dict]:
    question = ("<image>\n" if image else "") + QUESTIONS[i % 4]
    return [{"from": "human", "value": question}, {"from": "gpt", "value": ANSWERS[(i + 1) % 4]},
            {"from": "human", "value": QUESTIONS[(i + 2) % 4]}, {"from": "gpt", "value": ANSWERS[i % 4]}]


def write_json(path: Path, records: list) -> str:
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny target with its processor, 4 ShareGPT and 4 LLaVA records (3 with an image)."""
    root = tmp_path_factory.mktemp("world")
    tiny_llava(root / "target", seed=3)
    tiny_processor().save_pretrained(root / "target")
    generator = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = torch.randint(0, 256, (20 + 4 * i, 24, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"image{i}.png")
    text = write_json(root / "sharegpt.json", [{"id": f"t{i}", "conversations": conversation(i)} for i in range(4)])
    records = [{"id": f"m{i}", "image": f"image{i}.png", "conversations": conversation(i, image=True)}
               for i in range(3)] + [{"id": "m3", "conversations": conversation(3)}]
    multimodal = write_json(root / "llava.json", records)
    return {"root": root, "target": str(root / "target"), "text": text, "multimodal": multimodal}


def config(world, output_dir, **overrides) -> TrainConfig:
    """Small, fast settings on the CPU (no warm-up, a large learning rate)."""
    settings = {"target": world["target"], "output_dir": str(output_dir), "text_data": world["text"],
                "multimodal_data": world["multimodal"], "image_folder": str(world["root"]), "epochs": 2,
                "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "max_length": 128, "samples_per_epoch": 8,
                "device": "cpu", "progress": False}
    return TrainConfig(**(settings | overrides))


def weights(folder) -> dict[str, torch.Tensor]:
    return read_state_dict(Path(folder))


def metrics(output_dir) -> list[dict]:
    with open(Path(output_dir) / METRICS_FILE, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("stop", [3, 4])  # mid-epoch, and at the end of epoch 1 (4 steps per epoch)
def test_resume_is_bitwise(world, tmp_path, stop):
    whole = train(config(world, tmp_path / "whole"))
    assert whole.name == "epoch-02" and last_checkpoint(tmp_path / "whole") == whole
    stopped = train(config(world, tmp_path / "split", max_steps=stop, save_every=2))
    assert stopped.name == f"step-{stop:06d}"
    resumed = train(config(world, tmp_path / "split", resume=True, save_every=2))
    assert resumed.name == "epoch-02"
    expected, actual = weights(whole), weights(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # The metrics of the two halves are those of the uninterrupted run, each step once.
    columns = ("step", "loss", "accuracy", "multimodal_samples")
    assert ([[row[c] for c in columns] for row in metrics(tmp_path / "split")]
            == [[row[c] for c in columns] for row in metrics(tmp_path / "whole")])
    assert [int(row["step"]) for row in metrics(tmp_path / "whole")] == list(range(1, 9))


def test_the_draft_learns_a_toy_task(world, tmp_path):
    """The random target's features of 4 repeated conversations are learnable: the draft's
    top-1 agreement with the target rises clearly and the loss falls."""
    final = train(config(world, tmp_path, multimodal_data=None, epochs=1, batch_size=4, samples_per_epoch=400,
                         lr=3e-3))
    rows = metrics(tmp_path)
    assert len(rows) == 100
    first, last = rows[:10], rows[-10:]

    def mean(key, part):
        return sum(float(row[key]) for row in part) / len(part)

    assert mean("accuracy", last) > mean("accuracy", first) + 0.3, (mean("accuracy", first), mean("accuracy", last))
    assert mean("loss", last) < 0.75 * mean("loss", first)
    assert all(int(row["multimodal_samples"]) == 0 for row in rows)  # text-only: no curriculum
    # the released layout, loadable against the target
    load_draft(final, LlavaForConditionalGeneration.from_pretrained(world["target"]))


def test_curriculum_share_follows_r(world, tmp_path):
    epochs = 4
    train(config(world, tmp_path, epochs=epochs, batch_size=4, samples_per_epoch=64))
    for epoch in range(1, epochs + 1):
        rows = [row for row in metrics(tmp_path) if int(row["epoch"]) == epoch]
        share = sum(int(r["multimodal_samples"]) for r in rows) / sum(int(r["samples"]) for r in rows)
        r = multimodal_probability(epoch, epochs)  # 0, 0, 0.5, 1
        # Exact at 0 and 1; at 0.5 a binomial share of 64 draws (standard deviation 0.0625).
        assert abs(share - r) <= (0.2 if 0 < r < 1 else 0), (epoch, share, r)


def test_bad_records_are_skipped_and_counted(world, tmp_path, caplog):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = json.loads(Path(world["multimodal"]).read_text())
    records += [{"id": "absent", "image": "absent.png", "conversations": conversation(0, image=True)},
                {"id": "broken", "image": str(tmp_path / "broken.png"), "conversations": conversation(1, image=True)}]
    data = write_json(tmp_path / "bad.json", records)
    # Batches of one, two per step: some steps mix the unreadable record with a good one,
    # some may hold only it (no update), none may crash. (Also runs gradient checkpointing.)
    with caplog.at_level(logging.WARNING, logger="msd.train"):
        final = train(config(world, tmp_path / "out", text_data=None, multimodal_data=data, epochs=1, batch_size=1,
                             grad_accum=2, samples_per_epoch=20, gradient_checkpointing=True))
    assert final.name == "epoch-01"
    assert any("missing image file" in message for message in caplog.messages)
    summary = [m for m in caplog.messages if m.startswith("skipped records in all")]
    assert summary and "'missing image file': 1" in summary[0] and "unreadable image" in summary[0]
    assert sum(int(row["samples"]) for row in metrics(tmp_path / "out")) < 20  # the unreadable draws dropped


def test_two_rank_ddp_matches_one_rank(world, tmp_path):
    """torchrun, 2 gloo ranks x batch 2 against 1 rank x batch 4 (same samples per step, no
    noise). Not bitwise: the ranks' gradients are summed in another order and each rank
    pads its batch to its own longest sample (other matmul shapes)."""
    common = {"epochs": 1, "samples_per_epoch": 16, "noise_scale": 0.0, "max_steps": 3}
    single = train(config(world, tmp_path / "single", batch_size=4, **common))
    args = ["--target", world["target"], "--output-dir", str(tmp_path / "ddp"), "--text-data", world["text"],
            "--multimodal-data", world["multimodal"], "--image-folder", str(world["root"]), "--epochs", "1",
            "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--max-length", "128",
            "--samples-per-epoch", "16", "--noise-scale", "0", "--max-steps", "3", "--device", "cpu",
            "--no-progress"]
    env = os.environ | {"PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "msd.train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = last_checkpoint(tmp_path / "ddp")
    assert parallel.name == single.name == "step-000003"
    expected, actual = weights(single), weights(parallel)
    for key in expected:
        difference = (expected[key] - actual[key]).abs().max().item()
        assert difference < 1e-5, (key, difference)
    assert [r["samples"] for r in metrics(tmp_path / "ddp")] == [r["samples"] for r in metrics(tmp_path / "single")]


def test_help_of_the_commands(capsys):
    for command in ("train", "features"):
        with pytest.raises(SystemExit) as exit_code:
            main([command, "--help"])
        assert exit_code.value.code == 0
    out = capsys.readouterr().out
    for option in ("--features-dir", "--grad-accum", "--resume", "--shard-size", "--multimodal-data"):
        assert option in out


def test_features_then_train_equals_online_training(world, tmp_path, capsys):
    features = tmp_path / "features"
    data = ["--target", world["target"], "--text-data", world["text"], "--multimodal-data", world["multimodal"],
            "--image-folder", str(world["root"]), "--max-length", "128", "--device", "cpu"]
    assert main(["features", *data, "--output-dir", str(features), "--shard-size", "3"]) == 0
    assert "text: 4 samples" in capsys.readouterr().out
    options = ["--epochs", "2", "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "0", "--samples-per-epoch",
               "6", "--noise-scale", "0", "--device", "cpu", "--no-progress"]
    assert main(["train", "--target", world["target"], "--features-dir", str(features),
                 "--output-dir", str(tmp_path / "offline"), *options]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "offline" / "epoch-02")
    # Batches of one sample: the online run sees the same unpadded sequences.
    assert main(["train", *data, "--output-dir", str(tmp_path / "online"), *options]) == 0
    offline, online = weights(tmp_path / "offline" / "epoch-02"), weights(tmp_path / "online" / "epoch-02")
    for key in online:
        torch.testing.assert_close(offline[key], online[key], atol=1e-5, rtol=0)


def test_fused_ablation_draft_trains_and_keeps_its_flag(world, tmp_path):
    final = train(config(world, tmp_path / "fused", decouple_visual=False, max_steps=1))
    assert load_draft(final).decouple_visual is False
    with pytest.raises(ValueError, match="decouple_visual"):
        train(config(world, tmp_path / "mixed", init_draft=str(final), max_steps=1))
