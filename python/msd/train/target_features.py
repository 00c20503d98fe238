"""Target features for draft training: computed online by the frozen target, or written to
and read back from safetensors shards (``msd features``).

Pairing (MSD_SPEC.md 2 and 4, identical to inference). For a sequence
``x_0 .. x_{L-1}`` with target features ``f_0 .. f_{L-1}`` (post-norm last hidden states),
the draft runs over ``N = L - 1`` shifted positions; draft position ``j`` reads the target
feature ``f_j`` (``hidden[:-1]``) together with the NEXT input ``x_{j+1}`` (``ids[1:]``,
``embeds[1:]``) and its output is regressed onto ``f_{j+1}`` (``hidden[1:]``, the spec's
"target features are hidden[1:]"). Example, ``L = 4``::

    draft position j     0          1          2
    token / embed        x_1        x_2        x_3       ids[1:], embeds[1:]
    input feature        f_0        f_1        f_2       hidden[:-1]
    regression target    f_1        f_2        f_3       hidden[1:]
    loss mask            m_0        m_1        m_2       loss_mask[:-1]

At inference ``SpeculativeLLaVA`` commits ``(ids[1:] + [first generated], hidden)`` after
the prefill: the same pairs, plus one more whose target only the next step knows. The loss
mask keeps the spec's / released code's indexing (``m_t`` at draft position ``t``).

The target runs WITH its multimodal inputs (``pixel_values``, and ``image_sizes``,
``image_grid_thw`` or ``mm_token_type_ids`` as its family takes them): the features of the
positions after an image depend on it (the released Qwen2-VL data script feeds ``input_ids``
only, so its image positions see pad embeddings: MSD_SPEC.md 6). Positions: LLaVA targets get
the plain token index (counting real tokens only, so any padding works); Qwen2-VL / Qwen2.5-VL
targets compute their M-RoPE positions themselves from the image grids, as in their own
forward and generate (their text-only batches count from the left, so padding goes on the
right there, as :func:`msd.train.data.collate` does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from msd.targets import Qwen2VLAdapter, adapter_for


@contextmanager
def capture_inputs_embeds(target) -> Iterator[dict]:
    """While active, ``captured["embeds"]`` holds the ``inputs_embeds`` ``[B, L, H]`` the
    target's text model last received: token embeddings with the projected image features
    spliced in at the visual positions."""
    captured: dict = {}
    hook = target.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        yield captured
    finally:
        hook.remove()


@dataclass
class TargetFeatures:
    """What the target provides per batch (positions as in the input, not yet shifted).

    ``inputs_embeds`` is only meaningful at visual positions in features read from shards
    (zeros elsewhere): the draft embeds text tokens itself.
    """

    input_ids: torch.Tensor  # [B, L] int64
    inputs_embeds: torch.Tensor  # [B, L, H] target dtype, visual features spliced in
    hidden: torch.Tensor  # [B, L, H] target dtype, post-final-norm = lm_head input
    visual_mask: torch.Tensor  # [B, L] bool, input id is a visual placeholder (image or video)
    attention_mask: torch.Tensor  # [B, L] bool, False on padding
    # [B, L, k*H] target dtype: for EAGLE-3-style drafts, the hidden states entering the captured
    # layers (Hugging Face's output_hidden_states indices), concatenated; None for MSD drafts.
    aux: torch.Tensor | None = None


class TargetFeatureExtractor:
    """Runs the frozen target (eval mode, no gradient) to get :class:`TargetFeatures`.

    :attr:`input_names` are the multimodal inputs the target takes (its adapter's); the
    visual placeholder ids (images and videos) are the adapter's too.
    """

    def __init__(self, target, feature_layers: tuple[int, ...] | None = None):
        self.target = target.eval().requires_grad_(False)
        self.feature_layers = feature_layers  # the hidden states an EAGLE-3-style draft fuses (aux)
        self.adapter = adapter_for(target)
        self.input_names = self.adapter.input_names
        self.visual_token_ids = sorted(self.adapter.visual_inputs)
        # M-RoPE families place visual tokens on their grids: the model computes the positions.
        self.model_positions = isinstance(self.adapter, Qwen2VLAdapter)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **model_inputs: torch.Tensor | None) -> TargetFeatures:
        """Features of ``input_ids`` ``[B, L]`` (visual tokens already expanded, as the HF
        processor does) with optional padding ``attention_mask`` ``[B, L]`` and the target's
        multimodal ``model_inputs`` (``pixel_values``, ``image_grid_thw``, ...; None ones are
        left out). A name the target does not take is a ``TypeError``."""
        unknown = set(model_inputs) - set(self.input_names)
        if unknown:
            raise TypeError(f"{type(self.target).__name__} takes no {', '.join(sorted(unknown))} "
                            f"(its multimodal inputs: {', '.join(self.input_names)})")
        model_inputs = {name: value for name, value in model_inputs.items() if value is not None}
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        if self.model_positions:
            if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                raise ValueError("attention_mask: padding must be on the right for "
                                 f"{type(self.target).__name__} (M-RoPE positions count from the left)")
        else:  # positions count real tokens only, so left or right padding both work
            model_inputs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        if self.feature_layers is not None:
            model_inputs["output_hidden_states"] = True
        with capture_inputs_embeds(self.target) as captured:
            out = self.target.model(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False,
                                    **model_inputs)
        aux = None if self.feature_layers is None else torch.cat(
            [out.hidden_states[layer] for layer in self.feature_layers], dim=-1)
        return TargetFeatures(input_ids, captured["embeds"], out.last_hidden_state,
                              self.adapter.visual_mask(input_ids), attention_mask, aux)


def draft_training_inputs(features: TargetFeatures, loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The shifted tensors the draft trains on (pairing in the module docstring), ``N = L - 1``.

    Args:
        features: unshifted target features of length ``L``; padding on the right.
        loss_mask: ``[B, L]`` 0/1, 1 on answer tokens.

    Returns:
        ``input_ids`` ``[B, N]`` (``x_{j+1}``), ``visual_embeds`` ``[B, N, H]`` and
        ``visual_mask`` ``[B, N]`` (for ``MSDDraftModel.fuse_inputs``), ``features``
        ``[B, N, H]`` (``f_j``, to be noised; ``[B, N, k*H]``, the captured states, when
        ``features.aux`` is given), ``target`` ``[B, N, H]`` (``f_{j+1}``, post-norm),
        ``loss_mask`` ``[B, N]`` (zero on padding), ``attention_mask`` ``[B, N]`` bool
        (real draft positions) and ``position_ids`` ``[B, N]`` (``0..N-1``).
    """
    attention_mask = features.attention_mask[:, 1:]
    batch, length = attention_mask.shape
    return {
        "input_ids": features.input_ids[:, 1:],
        "visual_embeds": features.inputs_embeds[:, 1:],
        "visual_mask": features.visual_mask[:, 1:],
        "features": (features.hidden if features.aux is None else features.aux)[:, :-1],
        "target": features.hidden[:, 1:],
        "loss_mask": loss_mask[:, :-1] * attention_mask,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(length, device=attention_mask.device).expand(batch, length),
    }


# ---------------------------------------------------------------------------- shards
INDEX = "index.json"


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _write_atomically(path: Path, write) -> None:
    """``write(temporary path)``, then rename: a crash never leaves a half-written file."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def write_feature_shards(dataset_iter: Iterable[dict], extractor: TargetFeatureExtractor, out_dir: str | Path,
                         shard_size: int) -> int:
    """Extract and store the target features of every sample, ``shard_size`` per shard.

    Samples are dicts with ``input_ids`` ``[L]``, ``loss_mask`` ``[L]`` and, for images, the
    target's multimodal inputs for one sample as the training datasets make them (per image:
    ``pixel_values``, ``image_sizes``, ``image_grid_thw``; per token, one-dimensional:
    ``mm_token_type_ids``); other keys are ignored. Sample ``i`` is stored in its shard under
    ``"{i}.input_ids"``, ``"{i}.loss_mask"``, ``"{i}.hidden"`` (``[L, H]``) and ``"{i}.visual_embeds"``
    (``[num visual tokens, H]``: only the visual rows of the input embeddings, the text rows
    being the target's token embeddings), in the target's dtype.

    ``index.json`` lists the completed shards and their samples. Running again on the same
    ``out_dir`` with the same (deterministic) ``dataset_iter`` resumes after the last
    complete shard whose file exists. Returns the number of samples stored in all.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    layers = list(extractor.feature_layers) if extractor.feature_layers is not None else None
    index = _read_index(out_dir) or {"shard_size": shard_size, "visual_token_ids": extractor.visual_token_ids,
                                     "feature_layers": layers, "shards": []}
    if index["shard_size"] != shard_size:
        raise ValueError(f"{out_dir} holds shards of {index['shard_size']} samples, asked for {shard_size}")
    if index.get("feature_layers") != layers:
        raise ValueError(f"{out_dir} holds the features of layers {index.get('feature_layers')}, asked for {layers}")
    # Resume after the complete shards that are still there.
    done = next((i for i, shard in enumerate(index["shards"]) if not (out_dir / shard["file"]).exists()),
                len(index["shards"]))
    index["shards"] = index["shards"][:done]
    sample = done * shard_size
    tensors: dict[str, torch.Tensor] = {}
    for item in islice(dataset_iter, sample, None):
        tensors.update(_sample_tensors(sample, item, extractor))
        sample += 1
        if sample % shard_size == 0:
            _flush_shard(out_dir, index, tensors, sample)
            tensors = {}
    if tensors:
        _flush_shard(out_dir, index, tensors, sample)
    return sample


def _sample_tensors(sample: int, item: dict, extractor: TargetFeatureExtractor) -> dict[str, torch.Tensor]:
    # A batch of one: per-token inputs [L] -> [1, L], per-image ones as they are.
    inputs = {name: value.unsqueeze(0) if value.dim() == 1 else value
              for name, value in item.items() if name in extractor.input_names}
    features = extractor(item["input_ids"].unsqueeze(0), **inputs)
    tensors = {
        f"{sample}.input_ids": item["input_ids"].long(),
        f"{sample}.loss_mask": item["loss_mask"].to(torch.uint8),
        f"{sample}.hidden": features.hidden[0],
        f"{sample}.visual_embeds": features.inputs_embeds[0, features.visual_mask[0]],
    }
    if features.aux is not None:
        tensors[f"{sample}.aux"] = features.aux[0]
    return tensors


def _flush_shard(out_dir: Path, index: dict, tensors: dict[str, torch.Tensor], end: int) -> None:
    """Write the shard holding the samples before ``end``, then record it in the index."""
    shard = len(index["shards"])
    name = _shard_name(shard)
    cpu = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    _write_atomically(out_dir / name, lambda path: save_file(cpu, str(path)))
    index["shards"].append({"file": name, "samples": [shard * index["shard_size"], end]})
    _write_atomically(out_dir / INDEX, lambda path: path.write_text(json.dumps(index, indent=1)))


def _read_index(out_dir: Path) -> dict | None:
    path = out_dir / INDEX
    return json.loads(path.read_text()) if path.exists() else None


class FeatureShardDataset(Dataset):
    """The samples of :func:`write_feature_shards`, as dicts of ``input_ids`` ``[L]``,
    ``loss_mask`` ``[L]``, ``hidden`` ``[L, H]``, ``visual_mask`` ``[L]`` and
    ``inputs_embeds`` ``[L, H]`` (the visual features at visual positions, zeros at text
    positions); :func:`collate_feature_samples` batches them into :class:`TargetFeatures`."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        index = _read_index(self.out_dir)
        if index is None:
            raise FileNotFoundError(f"no {INDEX} in {self.out_dir}: run `msd features` first")
        # Shards written before msd trained Qwen targets name the image token only.
        self.visual_token_ids = torch.tensor(index.get("visual_token_ids") or [index["image_token_id"]])
        self.files = [shard["file"] for shard in index["shards"]]
        self.shard_size = index["shard_size"]
        self.length = index["shards"][-1]["samples"][1] if index["shards"] else 0
        layers = index.get("feature_layers")  # the captured states stored (EAGLE-3-style drafts), or None
        self.feature_layers = tuple(layers) if layers is not None else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, sample: int) -> dict[str, torch.Tensor]:
        if not 0 <= sample < self.length:
            raise IndexError(f"sample {sample} out of range [0, {self.length})")
        with safe_open(self.out_dir / self.files[sample // self.shard_size], framework="pt") as shard:
            item = {key: shard.get_tensor(f"{sample}.{key}")
                    for key in ("input_ids", "loss_mask", "hidden", "visual_embeds", "aux")
                    if f"{sample}.{key}" in shard.keys()}
        visual_mask = torch.isin(item["input_ids"], self.visual_token_ids)
        inputs_embeds = item["hidden"].new_zeros(item["hidden"].shape)
        inputs_embeds[visual_mask] = item.pop("visual_embeds")
        return {**item, "visual_mask": visual_mask, "inputs_embeds": inputs_embeds}


def collate_feature_samples(samples: list[dict]) -> tuple[TargetFeatures, torch.Tensor]:
    """Right-pad :class:`FeatureShardDataset` samples into ``(TargetFeatures, loss_mask [B, L])``."""
    def pad(key):
        return torch.nn.utils.rnn.pad_sequence([s[key] for s in samples], batch_first=True)

    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    attention_mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    features = TargetFeatures(pad("input_ids"), pad("inputs_embeds"), pad("hidden"), pad("visual_mask"),
                              attention_mask, pad("aux") if "aux" in samples[0] else None)
    return features, pad("loss_mask")
