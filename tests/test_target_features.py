"""Target features for draft training: the extractor against the target's own forward,
the training pairing against the engine's, and the feature shards' write / resume / read; Qwen2-VL
and Qwen2.5-VL features computed with their images."""

from __future__ import annotations

import pytest
import torch

import msd
from msd.train.data import collate
from msd.train.target_features import (
    FeatureShardDataset,
    TargetFeatureExtractor,
    TargetFeatures,
    collate_feature_samples,
    draft_training_inputs,
    write_feature_shards,
)

from tiny_models import (
    IMAGE_SIZE,
    IMAGE_TOKEN,
    QWEN_IMAGE,
    image_token_counts,
    qwen_inputs,
    random_draft,
    tiny_llava,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_llava(tmp_path_factory.mktemp("target") / "llava", seed=4)


def sample(target, seed: int, with_image: bool) -> dict:
    """One training sample: ``input_ids [L]``, ``loss_mask [L]`` (1 on the last 3 tokens)
    and, with an image, ``pixel_values [1, 3, S, S]``."""
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(3, IMAGE_TOKEN - 1, (n,), generator=gen).tolist()
    item: dict = {}
    ids = [1] + words(2 + seed % 3)
    if with_image:
        item["pixel_values"] = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        ids += [IMAGE_TOKEN] * image_token_counts(target, item["pixel_values"], None)[0]
    ids += words(5)
    item["input_ids"] = torch.tensor(ids)
    item["loss_mask"] = torch.zeros(len(ids), dtype=torch.long)
    item["loss_mask"][-3:] = 1
    return item


def fused(draft, inputs: dict) -> torch.Tensor:
    """The draft's inputs ``[B, N, H]`` for :func:`draft_training_inputs`' output."""
    with torch.no_grad():
        return draft.fuse_inputs(inputs["input_ids"], inputs["features"], inputs["visual_embeds"],
                                 inputs["visual_mask"])


def test_extractor_matches_the_target_forward(target):
    item = sample(target, 0, with_image=True)
    ids = item["input_ids"][None]
    features = TargetFeatureExtractor(target)(ids, pixel_values=item["pixel_values"])
    with torch.no_grad():
        logits = target(input_ids=ids, pixel_values=item["pixel_values"]).logits
        projected = target.model.get_image_features(pixel_values=item["pixel_values"])
    projected = torch.cat(list(getattr(projected, "pooler_output", projected)))
    assert features.hidden.shape == (1, ids.shape[1], target.config.text_config.hidden_size)
    torch.testing.assert_close(target.lm_head(features.hidden), logits, atol=ATOL, rtol=0)
    assert torch.equal(features.visual_mask, ids == IMAGE_TOKEN)
    torch.testing.assert_close(features.inputs_embeds[features.visual_mask], projected, atol=ATOL, rtol=0)
    text_embeds = target.get_input_embeddings()(ids)[~features.visual_mask]
    assert torch.equal(features.inputs_embeds[~features.visual_mask], text_embeds)
    assert not features.hidden.requires_grad
    assert not any(p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_one_sample_at_a_time(target, side):
    items = [sample(target, 1, with_image=False), sample(target, 2, with_image=False)]
    extractor = TargetFeatureExtractor(target)
    length = max(len(i["input_ids"]) for i in items)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.bool)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        real = slice(0, n) if side == "right" else slice(length - n, length)
        ids[b, real], mask[b, real] = item["input_ids"], True
    batched = extractor(ids, attention_mask=mask)
    for b, item in enumerate(items):
        alone = extractor(item["input_ids"][None])
        torch.testing.assert_close(batched.hidden[b][mask[b]], alone.hidden[0], atol=ATOL, rtol=0)


def test_training_inputs_worked_example():
    """L = 4 (plus one padding column): draft position j = (x_{j+1}, f_j) -> f_{j+1}, mask m_j."""
    hidden = torch.arange(5.0).view(1, 5, 1).expand(1, 5, 2)  # f_i = (i, i)
    embeds = -hidden
    features = TargetFeatures(
        input_ids=torch.tensor([[10, 11, IMAGE_TOKEN, 13, 0]]), inputs_embeds=embeds, hidden=hidden,
        visual_mask=torch.tensor([[False, False, True, False, False]]),
        attention_mask=torch.tensor([[True, True, True, True, False]]))
    inputs = draft_training_inputs(features, torch.tensor([[1, 0, 1, 1, 1]]))
    assert inputs["input_ids"].tolist() == [[11, IMAGE_TOKEN, 13, 0]]
    assert inputs["visual_mask"].tolist() == [[False, True, False, False]]
    assert inputs["visual_embeds"][0, :, 0].tolist() == [-1, -2, -3, -4]
    assert inputs["features"][0, :, 0].tolist() == [0, 1, 2, 3]
    assert inputs["target"][0, :, 0].tolist() == [1, 2, 3, 4]
    assert inputs["loss_mask"].tolist() == [[1, 0, 1, 0]]  # m_0..m_3, the padding zeroed
    assert inputs["attention_mask"].tolist() == [[True, True, True, False]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3]]


def test_training_pairs_like_the_engine(target):
    """The draft's fused inputs and positions at training equal those the engine commits
    after the prefill (which has one more position: the first generated token)."""
    item = sample(target, 3, with_image=True)
    ids = item["input_ids"][None]
    draft = random_draft(target)
    seen = []
    hook = draft.register_forward_pre_hook(lambda module, args: seen.append(args))
    try:
        msd.SpeculativeLLaVA(target, draft, top_k=2, depth=1, total_tokens=3).generate(
            ids, pixel_values=item["pixel_values"], max_new_tokens=1)
    finally:
        hook.remove()
    engine_inputs, engine_positions = seen[0]  # the prefill's commit
    inputs = draft_training_inputs(TargetFeatureExtractor(target)(ids, pixel_values=item["pixel_values"]),
                                   item["loss_mask"][None])
    training_inputs = fused(draft, inputs)
    length = ids.shape[1]
    assert engine_inputs.shape[1] == length and training_inputs.shape[1] == length - 1
    assert inputs["visual_mask"].any()
    torch.testing.assert_close(training_inputs, engine_inputs[:, :-1], atol=ATOL, rtol=0)
    assert torch.equal(inputs["position_ids"], engine_positions[:, :-1])


class CountingExtractor(TargetFeatureExtractor):
    def __init__(self, target):
        super().__init__(target)
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


def test_shards_write_resume_read(target, tmp_path):
    items = [sample(target, seed, with_image=seed % 2 == 0) for seed in range(5)]
    extractor = CountingExtractor(target)
    assert write_feature_shards(items, extractor, tmp_path, shard_size=2) == 5
    shards = sorted(p.name for p in tmp_path.glob("shard-*.safetensors"))
    assert shards == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    first = [FeatureShardDataset(tmp_path)[i] for i in range(5)]

    (tmp_path / "shard-00001.safetensors").unlink()  # interrupted: shards 1 and 2 redone
    extractor.calls = 0
    assert write_feature_shards(items, extractor, tmp_path, shard_size=2) == 5
    assert extractor.calls == 3

    dataset = FeatureShardDataset(tmp_path)
    assert len(dataset) == 5
    for i, item in enumerate(items):
        expected = extractor(item["input_ids"][None], pixel_values=item.get("pixel_values"))
        got = dataset[i]
        assert torch.equal(got["input_ids"], item["input_ids"])
        assert torch.equal(got["loss_mask"].long(), item["loss_mask"])
        assert got["hidden"].dtype == target.dtype
        assert torch.equal(got["hidden"], expected.hidden[0])
        assert torch.equal(got["visual_mask"], expected.visual_mask[0])
        visual = expected.visual_mask[0]
        assert torch.equal(got["inputs_embeds"][visual], expected.inputs_embeds[0, visual])
        assert not got["inputs_embeds"][~visual].any()
        assert all(torch.equal(got[key], first[i][key]) for key in got)
    with pytest.raises(IndexError):
        dataset[5]


def test_shard_batches_train_like_online_features(target, tmp_path):
    items = [sample(target, seed, with_image=True) for seed in (5, 6)]
    write_feature_shards(items, TargetFeatureExtractor(target), tmp_path, shard_size=4)
    dataset = FeatureShardDataset(tmp_path)
    features, loss_mask = collate_feature_samples([dataset[0], dataset[1]])
    batched = draft_training_inputs(features, loss_mask)
    draft = random_draft(target)
    for b, item in enumerate(items):
        online = draft_training_inputs(
            TargetFeatureExtractor(target)(item["input_ids"][None], pixel_values=item["pixel_values"]),
            item["loss_mask"][None])
        n = online["input_ids"].shape[1]
        assert batched["attention_mask"][b].sum() == n
        torch.testing.assert_close(fused(draft, batched)[b, :n], fused(draft, online)[0], atol=ATOL, rtol=0)
        for key in ("target", "loss_mask", "position_ids"):
            assert torch.equal(batched[key][b, :n], online[key][0].to(batched[key].dtype))


def test_shard_settings_are_checked(target, tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        write_feature_shards([], TargetFeatureExtractor(target), tmp_path, shard_size=0)
    write_feature_shards([sample(target, 0, False)], TargetFeatureExtractor(target), tmp_path, shard_size=2)
    with pytest.raises(ValueError, match="holds shards of 2"):
        write_feature_shards([], TargetFeatureExtractor(target), tmp_path, shard_size=3)
    with pytest.raises(FileNotFoundError):
        FeatureShardDataset(tmp_path / "missing")


# ---------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_TEXT = [[1, 5, 6], [7, 8, 9, 10]]  # ids before and after the image


@pytest.fixture(scope="module")
def qwen_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {"qwen2-vl": tiny_qwen2_vl(root / "qwen2-vl", seed=4),
            "qwen2.5-vl": tiny_qwen2_5_vl(root / "qwen2.5-vl", seed=5)}


def qwen_item(target, grid: tuple[int, int] | None, seed: int) -> dict:
    """A dataset-like item (``[L]`` per token, per-image tensors as they are) of a Qwen prompt
    with one image of ``grid`` patches, or none; 1 in the loss mask on the last 3 tokens."""
    inputs = qwen_inputs(target, QWEN_TEXT, [grid] if grid else [], seed=seed)
    item = {key: value[0] if value.shape == inputs["input_ids"].shape else value for key, value in inputs.items()}
    item["loss_mask"] = torch.zeros_like(item["input_ids"])
    item["loss_mask"][-3:] = 1
    return item | {"source": f"sample {seed}"}


def features_alone(extractor: TargetFeatureExtractor, item: dict) -> TargetFeatures:
    """The features of one ``qwen_item`` run as a batch of one."""
    inputs = {name: value[None] if value.dim() == 1 else value for name, value in item.items()
              if name in extractor.input_names}
    return extractor(item["input_ids"][None], **inputs)


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_features_are_computed_with_the_images(qwen_targets, name):
    """The features are the target's own forward with its image inputs (M-RoPE positions from
    the grid), not the ids-only forward of the released Qwen2-VL data script: the same before
    the image, different at and after it."""
    target = qwen_targets[name]
    inputs = qwen_inputs(target, QWEN_TEXT, [(4, 6)])
    ids = inputs["input_ids"]
    extractor = TargetFeatureExtractor(target)
    features = extractor(ids, **{key: value for key, value in inputs.items() if key != "input_ids"})
    with torch.no_grad():
        logits = target(**inputs).logits
        ids_only = target.model(input_ids=ids).last_hidden_state
        image_features = target.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    torch.testing.assert_close(target.lm_head(features.hidden), logits, atol=ATOL, rtol=0)
    assert torch.equal(features.visual_mask, ids == QWEN_IMAGE)
    image_features = torch.cat(list(getattr(image_features, "pooler_output", image_features)))
    torch.testing.assert_close(features.inputs_embeds[features.visual_mask], image_features, atol=ATOL, rtol=0)
    first = int(features.visual_mask[0].nonzero()[0])
    torch.testing.assert_close(features.hidden[:, :first], ids_only[:, :first], atol=ATOL, rtol=0)
    assert (features.hidden[0, first:] - ids_only[0, first:]).abs().amax(-1).min() > 1e-3
    with pytest.raises(TypeError, match="takes no image_sizes"):
        extractor(ids, image_sizes=torch.tensor([[4, 6]]))


def test_qwen_padded_batch_equals_one_sample_at_a_time(qwen_targets):
    """collate's right-padded batch of two images of different grids and a text-only sample:
    each row's features are its own forward's."""
    target = qwen_targets["qwen2-vl"]
    items = [qwen_item(target, (4, 6), seed=1), qwen_item(target, None, seed=2), qwen_item(target, (2, 2), seed=3)]
    batch = collate(items)
    extractor = TargetFeatureExtractor(target)
    inputs = {name: batch[name] for name in extractor.input_names if name in batch}
    batched = extractor(batch["input_ids"], batch["attention_mask"], **inputs)
    for row, item in enumerate(items):
        alone = features_alone(extractor, item)
        n = item["input_ids"].numel()
        torch.testing.assert_close(batched.hidden[row, :n], alone.hidden[0], atol=ATOL, rtol=0)
        assert torch.equal(batched.visual_mask[row, :n], alone.visual_mask[0])
    left = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="padding must be on the right"):
        extractor(batch["input_ids"], left, **inputs)


def test_qwen_shards_hold_the_features_with_images(qwen_targets, tmp_path):
    target = qwen_targets["qwen2.5-vl"]
    items = [qwen_item(target, (4, 6), seed=1), qwen_item(target, None, seed=2)]
    extractor = TargetFeatureExtractor(target)
    assert write_feature_shards(items, extractor, tmp_path, shard_size=4) == 2
    dataset = FeatureShardDataset(tmp_path)
    for i, item in enumerate(items):
        expected = features_alone(extractor, item)
        got = dataset[i]
        assert torch.equal(got["hidden"], expected.hidden[0])
        assert torch.equal(got["visual_mask"], expected.visual_mask[0])
        assert torch.equal(got["inputs_embeds"][got["visual_mask"]], expected.inputs_embeds[0, expected.visual_mask[0]])
    assert dataset[0]["visual_mask"].sum() == 6 and not dataset[1]["visual_mask"].any()
