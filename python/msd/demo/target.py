"""The demo target: a tiny LLaVA-1.5 trained from scratch on the world.

Text model: a small Llama; vision tower: a small CLIP over the processor's 48-pixel input
(3 x 3 patches of 16 pixels, one per grid cell of a scene). It trains in two steps, as
LLaVA-1.5 is built on a CLIP tower that already sees and stays frozen:

1. the vision tower alone learns to see the world's images (:func:`pretrain_vision_tower`:
   a linear head on each cell's feature names the colour and the shape in that cell);
2. with the tower frozen, the projector and the text model train as one language model:
   cross-entropy on the answer tokens of the ``llava_v1`` prompts (the loss masks of
   :mod:`msd.train.data`), over the text and the image conversations.

Trained end to end from scratch instead, the target learnt where things are and how many,
but named shapes at chance and colours hardly better (demo v2: 4 epochs). The
learning rate matters too: on the pretrained tower, 3e-3 taught the text model colours but
not shapes; 1e-3 teaches both. Five epochs, not three: after three, the same recipe read 98%
of held-out things on transformers 5.24 but 76% on 4.56 (same seed; the two versions' runs
differ); after five, 100% on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from msd.demo.tokenizer import VISION_IMAGE_SIZE, VISION_PATCH
from msd.demo.world import (
    COLOURS,
    IMAGE_FOLDER,
    POSITIONS,
    SHAPES,
    TEXT_JSON,
    WORLD_JSON,
    Scene,
    load_scenes,
    scene_image,
)
from msd.train.data import MultimodalConversationDataset, TextConversationDataset, collate
from msd.train.optim import make_schedule

MAX_LENGTH = 256  # tokens per sample; the world's longest conversations take about 170
POSITION_STD = 0.5  # initial scale of the vision tower's position embeddings


@dataclass
class TargetRecipe:
    """Size of the target and how long it trains (``vision_*``: the tower's pretraining)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_steps: int = 200
    vision_lr: float = 3e-3
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50


def make_target(recipe: TargetRecipe, processor) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA-1.5-style target sized by ``recipe`` for ``processor``."""
    tokenizer = processor.tokenizer
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=3 * recipe.hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_hidden, intermediate_size=4 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers, num_attention_heads=4, image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH, projection_dim=recipe.vision_hidden,
    )
    config = LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(
            processor.image_token), image_seq_length=(VISION_IMAGE_SIZE // VISION_PATCH) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    # CLIP's default (std 0.02) makes a patch's position a whisper next to what is drawn in it,
    # and the target must tell the grid cells apart to say where things are: start the
    # positions as loud as a drawn patch.
    torch.nn.init.normal_(vision_position_embedding(model).weight, std=POSITION_STD)
    model.generation_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    return model


def vision_position_embedding(model: LlavaForConditionalGeneration) -> torch.nn.Embedding:
    """The vision tower's patch position embedding (CLIP's ``embeddings.position_embedding``,
    wherever this transformers release nests the embeddings module)."""
    return next(module.position_embedding for module in model.model.vision_tower.modules()
                if isinstance(getattr(module, "position_embedding", None), torch.nn.Embedding))


def load_samples(world: Path, processor) -> list[dict]:
    """Every conversation of the world (text and image) as a training item, tokenized once."""
    datasets = [TextConversationDataset(world / TEXT_JSON, processor.tokenizer, MAX_LENGTH),
                MultimodalConversationDataset(world / WORLD_JSON, world / IMAGE_FOLDER, processor, MAX_LENGTH)]
    items = [dataset[i] for dataset in datasets for i in range(len(dataset))]
    return [item for item in items if item is not None]


def cell_labels(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """What each grid cell of ``scene`` holds, in the vision tower's patch order (row by row):
    int64 ``[9]`` colour classes (0: empty, then ``COLOURS`` in order) and shape classes
    (0: empty, then ``SHAPES``)."""
    colours, shapes = torch.zeros(9, dtype=torch.int64), torch.zeros(9, dtype=torch.int64)
    for thing in scene.things:
        row, column = POSITIONS[thing.position]
        colours[3 * row + column] = 1 + list(COLOURS).index(thing.colour)
        shapes[3 * row + column] = 1 + SHAPES.index(thing.shape)
    return colours, shapes


def pretrain_vision_tower(model: LlavaForConditionalGeneration, world: Path, processor, recipe: TargetRecipe,
                          generator: torch.Generator, device, progress: bool = True) -> None:
    """Teach ``model``'s vision tower to see ``world``'s scenes, then freeze it.

    ``recipe.vision_steps`` AdamW steps of random scene batches: a linear head on the features
    LLaVA reads (the ``vision_feature_layer`` hidden state without the CLS token, one per
    cell) is trained with the tower to name each cell's colour and shape (cross-entropy); the
    head is then dropped. Naming both in every cell keeps shape as readable as colour, which
    the language model's loss alone never made it.
    """
    scenes = load_scenes(world)
    tower = model.model.vision_tower
    head = torch.nn.Linear(model.config.vision_config.hidden_size, 1 + len(COLOURS) + 1 + len(SHAPES)).to(device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=recipe.vision_lr)
    bar = tqdm(range(recipe.vision_steps), desc="target: vision tower", disable=not progress, unit="step")
    for _ in bar:
        batch = torch.randint(len(scenes), (recipe.batch_size,), generator=generator).tolist()
        images = []
        for index in batch:
            with Image.open(world / IMAGE_FOLDER / scene_image(index)) as image:
                images.append(image.convert("RGB"))
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[
            model.config.vision_feature_layer][:, 1:]
        colours, shapes = (torch.stack(labels).to(device) for labels in zip(*(cell_labels(scenes[i]) for i in batch)))
        logits = head(features)
        loss = (torch.nn.functional.cross_entropy(logits[..., :1 + len(COLOURS)].flatten(0, 1), colours.flatten())
                + torch.nn.functional.cross_entropy(logits[..., 1 + len(COLOURS):].flatten(0, 1), shapes.flatten()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.requires_grad_(False)


def train_target(world: Path, processor, folder: Path, recipe: TargetRecipe, seed: int = 0,
                 device: torch.device | str = "cpu", progress: bool = True) -> LlavaForConditionalGeneration:
    """Train a target on ``world`` (the tower first, then the rest with AdamW, linear warm-up
    and decay) and save it and ``processor`` to ``folder``."""
    torch.manual_seed(seed)
    samples = load_samples(world, processor)
    model = make_target(recipe, processor).to(device).train()
    generator = torch.Generator().manual_seed(seed)
    pretrain_vision_tower(model, world, processor, recipe, generator, device, progress)
    loader = DataLoader(samples, batch_size=recipe.batch_size, shuffle=True, generator=generator,
                        collate_fn=lambda items: collate(items, processor.tokenizer.pad_token_id))
    total = recipe.epochs * len(loader)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = make_schedule(optimizer, total_steps=total, warmup_steps=min(recipe.warmup_steps, total))
    bar = tqdm(total=total, desc="target: training", disable=not progress, unit="step")
    for _ in range(recipe.epochs):
        for batch in loader:
            loss = language_model_loss(model, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def language_model_loss(model: LlavaForConditionalGeneration, batch: dict, device) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (``loss_mask``) of a :func:`collate` batch."""
    labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
    extra = {"pixel_values": batch["pixel_values"].to(device)} if "pixel_values" in batch else {}
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                 labels=labels.to(device), **extra).loss

