"""The draft training loop on a tiny random LLaVA target (CPU): exact resume, learning on a
toy task, 2-rank DDP against one rank, the curriculum's multimodal share, bad data, and the
``msd features`` / ``msd train`` commands; the commands and the evaluation prompts on a tiny
Qwen2-VL target."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLConfig

from msd.cli import main
from msd.draft_checkpoint import load_draft, read_state_dict
from msd.draft_eagle3 import Eagle3DraftModel
from msd.engine import SpeculativeLLaVA
from msd.prompts import encode_prompt
from msd.train.capture import load_target
from msd.train.checkpointing import last_checkpoint
from msd.train.config import TrainConfig
from msd.train.curriculum import multimodal_probability
from msd.train.datasets import build_datasets
from msd.train.evaluation import first_turn_prompts
from msd.train.metrics import METRICS_FILE
from msd.train.target_data import prompt_template
from msd.train.trainer import train
from msd.train.vocabulary import count_answer_tokens

from tiny_models import tiny_llava, tiny_processor, tiny_qwen2_vl, tiny_qwen_processor

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


# Both runs see the same 4 samples per step (2 ranks x batch 2, or 1 x batch 4), no noise.
PARALLEL = {"epochs": 1, "samples_per_epoch": 16, "noise_scale": 0.0, "max_steps": 3}


def two_ranks(world, output_dir: Path, *options: str) -> None:
    """``torchrun --nproc_per_node 2 -m msd.train`` on 2 gloo ranks, batch 2 each, PARALLEL."""
    args = ["--target", world["target"], "--output-dir", str(output_dir), "--text-data", world["text"],
            "--multimodal-data", world["multimodal"], "--image-folder", str(world["root"]), "--epochs", "1",
            "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--max-length", "128",
            "--samples-per-epoch", "16", "--noise-scale", "0", "--max-steps", "3", "--device", "cpu",
            "--no-progress", *options]
    env = os.environ | {"PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "msd.train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_weights_close(expected_folder: Path, actual_folder: Path, tolerance: float) -> None:
    expected, actual = weights(expected_folder), weights(actual_folder)
    assert expected.keys() == actual.keys()
    for key in expected:
        if not expected[key].is_floating_point():  # vocabulary maps: exactly the same
            assert torch.equal(expected[key], actual[key]), key
            continue
        difference = (expected[key] - actual[key]).abs().max().item()
        assert difference < tolerance, (key, difference)


def test_two_rank_ddp_matches_one_rank(world, tmp_path):
    """torchrun, 2 gloo ranks x batch 2 against 1 rank x batch 4. Not bitwise: the ranks'
    gradients are summed in another order and each rank pads its batch to its own longest
    sample (other matmul shapes)."""
    single = train(config(world, tmp_path / "single", batch_size=4, **PARALLEL))
    two_ranks(world, tmp_path / "ddp")
    parallel = last_checkpoint(tmp_path / "ddp")
    assert parallel.name == single.name == "step-000003"
    assert_weights_close(single, parallel, 1e-5)
    assert [r["samples"] for r in metrics(tmp_path / "ddp")] == [r["samples"] for r in metrics(tmp_path / "single")]


def test_two_rank_fsdp_on_cpu_resumes_and_matches_one_rank(world, tmp_path):
    """FSDP over 2 gloo ranks, stopped after step 2 and resumed for step 3 (the sharded
    optimiser state goes through the checkpoint), against 1 rank: same tolerance as DDP (a
    lost optimiser state would move the weights by ~lr = 1e-3). Evaluation under FSDP: rank 0
    evaluates the gathered weights while rank 1 waits."""
    evaluation = eval_options(world, eval_every=2)
    single = train(config(world, tmp_path / "single", batch_size=4, **PARALLEL, **evaluation))
    options = ["--fsdp", *(f"--{key.replace('_', '-')}={value}" for key, value in evaluation.items())]
    two_ranks(world, tmp_path / "fsdp", *options, "--max-steps", "2", "--save-every", "2")
    assert last_checkpoint(tmp_path / "fsdp").name == "step-000002"
    two_ranks(world, tmp_path / "fsdp", *options, "--resume")
    parallel = last_checkpoint(tmp_path / "fsdp")
    assert parallel.name == single.name == "step-000003"
    assert_weights_close(single, parallel, 1e-5)
    columns = ("step", "samples", "tau")
    assert ([[row[c] for c in columns] for row in metrics(tmp_path / "fsdp")]
            == [[row[c] for c in columns] for row in metrics(tmp_path / "single")])


def test_help_of_the_commands(capsys):
    for command in ("train", "features"):
        with pytest.raises(SystemExit) as exit_code:
            main([command, "--help"])
        assert exit_code.value.code == 0
    out = capsys.readouterr().out
    for option in ("--features-dir", "--grad-accum", "--resume", "--shard-size", "--multimodal-data", "--eval-every"):
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


# ---------------------------------------------------------------------- periodic tau evaluation
EVAL_TREE = {"top_k": 4, "depth": 3, "total_tokens": 12}
EVAL_NEW_TOKENS = 16


def eval_options(world, **overrides) -> dict:
    """Evaluation on the 4 LLaVA records (3 with an image, then a text-only one)."""
    options = {"eval_data": world["multimodal"], "eval_samples": 4, "eval_max_new_tokens": EVAL_NEW_TOKENS,
               **{f"eval_{key}": value for key, value in EVAL_TREE.items()}}
    return options | overrides


def standalone_tau(world, checkpoint: Path) -> float:
    """tau as a user measures it: the engine loaded from the checkpoint folder, prompts made by
    ``msd generate``'s encode_prompt from the records' first questions, pooled by hand."""
    engine = SpeculativeLLaVA.from_pretrained(world["target"], checkpoint, **EVAL_TREE)
    processor = AutoProcessor.from_pretrained(world["target"])
    produced = forwards = 0
    for record in json.loads(Path(world["multimodal"]).read_text()):
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        images = [Image.open(world["root"] / record["image"]).convert("RGB")] if "image" in record else []
        engine.generate(**encode_prompt(processor, question, images), do_sample=False,
                        max_new_tokens=EVAL_NEW_TOKENS)
        produced += engine.last_stats.new_tokens - 1
        forwards += engine.last_stats.steps
    return produced / forwards


class ScalarRecorder:
    """Stands in for TensorBoard's SummaryWriter (not installed here): keeps the scalars."""

    scalars: list[tuple[str, float, int]] = []

    def __init__(self, log_dir: str):
        ScalarRecorder.scalars = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        pass


def test_evaluation_logs_the_engines_tau_and_leaves_training_alone(world, tmp_path, monkeypatch):
    """tau at step 3 (eval_every) and 4 (the epoch's end) equals an evaluation of the saved
    checkpoints of those steps; the weights and losses are those of a run without evaluation.
    (A large learning rate, so that tau moves from one evaluation to the next.)"""
    options = {"epochs": 1, "save_every": 3, "lr": 5e-2}
    plain = train(config(world, tmp_path / "plain", **options))
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = ScalarRecorder
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    evaluated = train(config(world, tmp_path / "eval", tensorboard=True, **options,
                             **eval_options(world, eval_every=3)))
    rows = metrics(tmp_path / "eval")
    taus = {int(row["step"]): float(row["tau"]) for row in rows if row["tau"]}
    assert sorted(taus) == [3, 4]
    assert [(step, value) for tag, value, step in ScalarRecorder.scalars if tag == "eval/tau"] == sorted(taus.items())
    assert taus[3] != taus[4]  # so that evaluating stale weights would show
    assert all(row["tau"] == "" for row in metrics(tmp_path / "plain"))
    for step, folder in ((3, "step-000003"), (4, "epoch-01")):
        assert taus[step] == pytest.approx(standalone_tau(world, tmp_path / "eval" / folder), abs=1e-12), step
    expected, actual = weights(plain), weights(evaluated)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert [row["loss"] for row in rows] == [row["loss"] for row in metrics(tmp_path / "plain")]


@pytest.mark.parametrize(("overrides", "error"), [
    ({"eval_every": 2}, "eval_every=2 needs eval_data"),
    ({"eval_data": "absent.json"}, "eval_data absent.json does not exist"),
    ({"eval_samples": 0}, "eval_samples must be >= 1"),
    ({"eval_every": -1}, "eval_every must be >= 0"),
    ({"eval_image_folder": "absent"}, "eval_image_folder absent is not a folder"),
    ({"eval_total_tokens": 1}, "eval_top_k / eval_depth / eval_total_tokens: total_tokens must be in"),
    ({"eval_max_new_tokens": 500}, "eval_max_new_tokens=500 after a"),
])
def test_bad_evaluation_options_are_named(world, tmp_path, overrides, error):
    options = overrides if "eval_every" in overrides and "eval_data" not in overrides else {
        "eval_data": world["multimodal"]} | overrides
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(error)):
        train(config(world, tmp_path, max_steps=1, **options))


def test_bf16_on_cpu_trains(world, tmp_path):
    """bf16 target features and CPU autocast: finite, falling losses; the first step's loss is
    near the float32 run's but not equal to it (the bf16 path really ran); and the evaluation
    engine runs a bf16 copy of the draft."""
    options = {"multimodal_data": None, "epochs": 1, "batch_size": 4, "samples_per_epoch": 24, "lr": 3e-3}
    train(config(world, tmp_path / "bf16", bf16=True, **options, **eval_options(world)))
    train(config(world, tmp_path / "fp32", bf16=False, max_steps=1, **options))
    losses = [float(row["loss"]) for row in metrics(tmp_path / "bf16")]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-2:]) < 0.95 * sum(losses[:2]), losses
    reference = float(metrics(tmp_path / "fp32")[0]["loss"])
    assert losses[0] != reference and losses[0] == pytest.approx(reference, rel=0.05)
    assert float(metrics(tmp_path / "bf16")[-1]["tau"]) >= 1.0


# ---------------------------------------------------------------------- Qwen2-VL targets
@pytest.fixture(scope="module")
def qwen_world(tmp_path_factory):
    """A saved tiny Qwen2-VL target with its processor (chat template), 3 ShareGPT and 3 LLaVA
    records (2 with images of different sizes) in the tiny Qwen vocabulary."""
    root = tmp_path_factory.mktemp("qwen-world")
    tiny_qwen2_vl(root / "target", seed=3)
    tiny_qwen_processor().save_pretrained(root / "target")
    generator = torch.Generator().manual_seed(0)
    for i, (height, width) in enumerate([(16, 24), (32, 8)]):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"image{i}.png")

    def qwen_conversation(i: int, image: bool = False) -> list[dict]:
        words = ["what is this ?", "a cat .", "and this ?", "a red dog .", "is it red ?", "no ."]
        question = ("<image>\n" if image else "") + words[2 * (i % 3)]
        return [{"from": "human", "value": question}, {"from": "gpt", "value": words[2 * (i % 3) + 1]},
                {"from": "human", "value": words[2 * ((i + 1) % 3)]}, {"from": "gpt", "value": words[2 * (i % 3) + 1]}]

    text = write_json(root / "sharegpt.json",
                      [{"id": f"t{i}", "conversations": qwen_conversation(i)} for i in range(3)])
    records = [{"id": f"m{i}", "image": f"image{i}.png", "conversations": qwen_conversation(i, image=True)}
               for i in range(2)] + [{"id": "m2", "conversations": qwen_conversation(2)}]
    multimodal = write_json(root / "llava.json", records)
    return {"root": root, "target": str(root / "target"), "text": text, "multimodal": multimodal}


def test_qwen_features_then_train_equals_online_training(qwen_world, tmp_path, capsys):
    """msd features / msd train on a Qwen2-VL target: shards computed with the images train the
    same draft as the target run online, through both stages of the curriculum."""
    features = tmp_path / "features"
    data = ["--target", qwen_world["target"], "--text-data", qwen_world["text"], "--multimodal-data",
            qwen_world["multimodal"], "--image-folder", str(qwen_world["root"]), "--max-length", "256",
            "--device", "cpu"]
    assert main(["features", *data, "--output-dir", str(features), "--shard-size", "2"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["text: 3 samples", "multimodal: 3 samples"]
    options = ["--epochs", "2", "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "0", "--samples-per-epoch",
               "4", "--noise-scale", "0", "--device", "cpu", "--no-progress"]
    assert main(["train", "--target", qwen_world["target"], "--features-dir", str(features),
                 "--output-dir", str(tmp_path / "offline"), *options]) == 0
    assert main(["train", *data, "--output-dir", str(tmp_path / "online"), *options]) == 0
    assert [int(row["multimodal_samples"]) for row in metrics(tmp_path / "online")] == [0] * 4 + [1] * 4
    offline, online = weights(tmp_path / "offline" / "epoch-02"), weights(tmp_path / "online" / "epoch-02")
    assert set(online) >= {"layers.0.self_attn.q_proj.bias", "fc.bias"}  # a Qwen2 draft layer
    for key in online:
        torch.testing.assert_close(offline[key], online[key], atol=1e-5, rtol=0)


def test_qwen_eval_prompts_are_the_prompts_msd_generate_makes(qwen_world):
    """The training-time evaluation asks the first questions in the chat template, exactly as
    ``msd generate`` (encode_prompt) does, images included."""
    processor = AutoProcessor.from_pretrained(qwen_world["target"])
    render = prompt_template(Qwen2VLConfig.from_pretrained(qwen_world["target"]), processor)
    prompts = first_turn_prompts(qwen_world["multimodal"], qwen_world["root"], processor, 3, render)
    records = json.loads(Path(qwen_world["multimodal"]).read_text())
    assert len(prompts) == len(records) == 3
    for prompt, record in zip(prompts, records):
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        images = [Image.open(qwen_world["root"] / record["image"]).convert("RGB")] if "image" in record else []
        expected = encode_prompt(processor, question, images)
        assert set(prompt) == set(expected)
        for key in expected:
            assert torch.equal(prompt[key], expected[key]), key
    assert "image_grid_thw" in prompts[0] and "image_grid_thw" not in prompts[2]


# ---------------------------------------------------------------------- EAGLE-3-style drafts
# The world's target has 2 layers: fc fuses the embeddings and the states entering layers 1 and 1.
EAGLE3 = {"draft_kind": "eagle3", "draft_vocab_size": 64, "feature_layers": "0,1,1", "ttt_steps": 3}
EAGLE3_OPTIONS = ("--draft-kind", "eagle3", "--draft-vocab-size", "64", "--feature-layers", "0,1,1",
                  "--ttt-steps", "3")


def test_eagle3_resume_is_bitwise_and_keeps_its_vocabulary(world, tmp_path):
    whole = train(config(world, tmp_path / "whole", **EAGLE3))
    stopped = train(config(world, tmp_path / "split", max_steps=3, save_every=2, **EAGLE3))
    assert stopped.name == "step-000003"
    resumed = train(config(world, tmp_path / "split", resume=True, save_every=2, **EAGLE3))
    expected, actual = weights(whole), weights(resumed)
    assert {"midlayer.hidden_norm.weight", "lm_head.weight", "d2t", "t2d"} <= expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert expected["lm_head.weight"].shape[0] == 64
    # The vocabulary: the 64 most frequent answer tokens of the world's records (ties: lower ids).
    draft = load_draft(resumed)
    assert isinstance(draft, Eagle3DraftModel) and draft.feature_layers(2) == (0, 1, 1)
    kept = set(draft.to_target(torch.arange(64)).tolist())
    processor = AutoProcessor.from_pretrained(world["target"])
    answers = Counter()
    for dataset in build_datasets(world["text"], world["multimodal"], str(world["root"]), processor, 128,
                                  load_target(world["target"], torch.float32).config).values():
        answers.update(count_answer_tokens(dataset[i] for i in range(len(dataset))))
    assert set(sorted(answers, key=lambda token: (-answers[token], token))[:64]) <= kept
    columns = ("step", "loss", "accuracy")
    assert ([[row[c] for c in columns] for row in metrics(tmp_path / "split")]
            == [[row[c] for c in columns] for row in metrics(tmp_path / "whole")])


def test_eagle3_two_rank_ddp_matches_one_rank(world, tmp_path):
    single = train(config(world, tmp_path / "single", batch_size=4, **PARALLEL, **EAGLE3))
    two_ranks(world, tmp_path / "ddp", *EAGLE3_OPTIONS)
    assert_weights_close(single, last_checkpoint(tmp_path / "ddp"), 1e-5)


def test_eagle3_features_then_train_equals_online_training(world, tmp_path, capsys):
    features = tmp_path / "features"
    data = ["--target", world["target"], "--text-data", world["text"], "--multimodal-data", world["multimodal"],
            "--image-folder", str(world["root"]), "--max-length", "128", "--device", "cpu"]
    kind = ["--draft-kind", "eagle3", "--feature-layers", "0,1,1"]
    assert main(["features", *data, *kind, "--output-dir", str(features), "--shard-size", "3"]) == 0
    options = ["--epochs", "1", "--batch-size", "1", "--lr", "1e-3", "--warmup-steps", "0", "--samples-per-epoch",
               "6", "--device", "cpu", "--no-progress", *kind, "--ttt-steps", "2"]
    assert main(["train", "--target", world["target"], "--features-dir", str(features),
                 "--output-dir", str(tmp_path / "offline"), *options]) == 0
    assert main(["train", *data, "--output-dir", str(tmp_path / "online"), *options]) == 0
    offline, online = weights(tmp_path / "offline" / "epoch-01"), weights(tmp_path / "online" / "epoch-01")
    for key in online:
        torch.testing.assert_close(offline[key], online[key], atol=1e-5, rtol=0)
    # Features of other layers than the draft reads are refused.
    with pytest.raises(ValueError, match="features_dir"):
        train(config(world, tmp_path / "other", features_dir=str(features), text_data=None, multimodal_data=None,
                     **{**EAGLE3, "feature_layers": "0,1,0"}))


def test_eagle3_options_are_checked(world, tmp_path):
    with pytest.raises(ValueError, match="feature_layers"):
        train(config(world, tmp_path / "a", draft_kind="eagle3", feature_layers="0,1"))
    with pytest.raises(ValueError, match="draft_vocab_size and feature_layers are options of draft_kind=eagle3"):
        train(config(world, tmp_path / "b", draft_vocab_size=32))
    with pytest.raises(ValueError, match="draft_kind"):
        train(config(world, tmp_path / "c", draft_kind="eagle4"))
    msd_draft = train(config(world, tmp_path / "msd", max_steps=1))
    with pytest.raises(ValueError, match="is a msd draft, this run trains draft_kind=eagle3"):
        train(config(world, tmp_path / "d", init_draft=str(msd_draft), max_steps=1, **EAGLE3))
