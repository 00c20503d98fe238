"""The settings of a draft training run (:class:`TrainConfig`, one ``msd train`` option per
field), their checks, and the device and dtype they select."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


def _option(default, help: str):
    """A dataclass field with its ``msd train --help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Settings of one draft training run; each field is the ``msd train`` option of the same
    name (``--grad-accum`` for ``grad_accum``), documented by its help text."""

    target: str = field(metadata={"help": "target checkpoint folder (LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL / "
                                          "Qwen2.5-VL), kept frozen"})
    output_dir: str = field(metadata={"help": "folder for the checkpoints, metrics.csv and the final draft"})
    text_data: str | None = _option(None, "stage-1 ShareGPT JSON (text-only conversations)")
    multimodal_data: str | None = _option(None, "stage-2 LLaVA instruction JSON (records with an 'image' path)")
    image_folder: str | None = _option(None, "folder the multimodal records' image paths are relative to")
    features_dir: str | None = _option(None, "pre-computed target features (`msd features` output) used instead "
                                              "of running the target online; replaces the data options")
    processor: str | None = _option(None, "processor / tokenizer folder (default: the target's)")
    init_draft: str | None = _option(None, "start from this draft checkpoint (default: a fresh draft, fc and "
                                            "layer random, embeddings copied from the target)")
    draft_kind: str = _option("msd", "msd: MSD's EAGLE-2-style draft (the last target state, the target's "
                                     "lm_head); eagle3: an EAGLE-3-style draft (three target states fused by fc, "
                                     "its own lm_head, trained with training-time test)")
    draft_vocab_size: int | None = _option(None, "eagle3: the draft's vocabulary, the most frequent answer tokens of "
                                                 "the training data (default: the target's whole vocabulary)")
    feature_layers: str | None = _option(None, "eagle3: the target hidden states fc fuses, as comma-separated "
                                               "output_hidden_states indices (default: 2, N//2, N-3 of N layers)")
    ttt_steps: int = _option(7, "eagle3: training-time-test steps (the draft unrolled on its own predictions)")
    epochs: int = _option(10, "epochs E; the multimodal share of epoch e is r(e) (MSD_SPEC.md 4)")
    batch_size: int = _option(4, "samples per micro-batch and rank")
    grad_accum: int = _option(1, "micro-batches per optimiser step")
    lr: float = _option(5e-5, "peak learning rate (AdamW, betas 0.9/0.95, no weight decay)")
    warmup_steps: int = _option(2000, "linear warm-up steps, then linear decay to 0 (capped at the total steps)")
    max_length: int = _option(2048, "longest sample in tokens (image tokens included); longer ones are skipped")
    samples_per_epoch: int | None = _option(None, "curriculum draws per epoch over all ranks "
                                                  "(default: text + multimodal record counts)")
    noise_scale: float = _option(0.2, "uniform feature noise amplitude (x 512 / sequence length); 0 disables it")
    v_weight: float = _option(1.0, "weight of the feature regression loss (SmoothL1)")
    p_weight: float = _option(0.1, "weight of the token distribution loss (cross-entropy)")
    grad_clip: float = _option(0.5, "max global gradient norm")
    save_every: int = _option(0, "write a step-XXXXXX checkpoint every this many steps (0: only at epoch ends)")
    log_every: int = _option(10, "steps between progress-bar / log updates (metrics.csv gets every step)")
    decouple_visual: bool = _option(True, "MSD's decoupled draft inputs (visual positions take the raw visual "
                                          "embedding); --no-decouple-visual fuses them like text (ablation)")
    seed: int = _option(0, "seed of the fresh draft, the curriculum stream and the feature noise")
    device: str | None = _option(None, "device (default: cuda when available, else cpu; "
                                       "under torchrun each rank takes cuda:LOCAL_RANK)")
    bf16: bool | None = _option(None, "bf16 target and autocast (default: on for CUDA, off for CPU)")
    gradient_checkpointing: bool = _option(False, "recompute the draft layer in the backward pass (less memory)")
    fsdp: bool = _option(False, "shard the draft with FullyShardedDataParallel instead of DDP (under torchrun)")
    resume: bool = _option(False, "continue from the checkpoint named in OUTPUT_DIR/last")
    progress: bool = _option(True, "show tqdm progress bars")
    max_steps: int | None = _option(None, "stop (with a checkpoint) after this many optimiser steps in all; "
                                          "the schedule still spans every epoch")
    num_workers: int = _option(0, "DataLoader worker processes per rank")
    tensorboard: bool = _option(False, "also log the metrics to OUTPUT_DIR/tensorboard (needs tensorboard)")
    eval_data: str | None = _option(None, "held-out ShareGPT / LLaVA JSON: the greedy tau of the engine with the "
                                          "current draft on its records' first user turns is logged (the 'tau' "
                                          "column, eval/tau) at each epoch end, at the last step and every "
                                          "eval_every steps; rank 0 evaluates while the others wait")
    eval_image_folder: str | None = _option(None, "folder the eval_data image paths are relative to "
                                                  "(default: image_folder)")
    eval_every: int = _option(0, "also evaluate tau every this many steps (0: only at epoch ends); needs eval_data")
    eval_samples: int = _option(16, "eval_data records evaluated (the first ones that are usable)")
    eval_max_new_tokens: int = _option(64, "tokens generated per evaluation prompt")
    eval_top_k: int = _option(10, "draft tree top_k of the evaluation engine")
    eval_depth: int = _option(5, "draft tree depth of the evaluation engine")
    eval_total_tokens: int = _option(60, "tree tokens verified per step by the evaluation engine")


DRAFT_KINDS = ("msd", "eagle3")


def parse_feature_layers(text: str | None) -> tuple[int, ...] | None:
    """``"2,16,29"`` -> ``(2, 16, 29)``; None stays None."""
    if text is None:
        return None
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"feature_layers must be comma-separated integers, got {text!r}") from None
    if len(layers) != 3:
        raise ValueError(f"feature_layers: fc fuses three target states, got {len(layers)} in {text!r}")
    return layers


def check_options(config: TrainConfig) -> None:
    """Reject bad settings before anything slow is loaded; the message names the option."""
    for name in ("epochs", "batch_size", "grad_accum", "eval_samples", "eval_max_new_tokens", "ttt_steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.draft_kind not in DRAFT_KINDS:
        raise ValueError(f"draft_kind must be one of {', '.join(DRAFT_KINDS)}, got {config.draft_kind!r}")
    if config.draft_kind != "eagle3" and (config.draft_vocab_size is not None or config.feature_layers is not None):
        raise ValueError("draft_vocab_size and feature_layers are options of draft_kind=eagle3")
    parse_feature_layers(config.feature_layers)
    if config.draft_vocab_size is not None and config.draft_vocab_size < 1:
        raise ValueError(f"draft_vocab_size must be >= 1, got {config.draft_vocab_size}")
    if config.eval_every < 0:
        raise ValueError(f"eval_every must be >= 0, got {config.eval_every}")
    if config.eval_data is None:
        if config.eval_every:
            raise ValueError(f"eval_every={config.eval_every} needs eval_data (the held-out prompts)")
        return
    if not Path(config.eval_data).is_file():
        raise FileNotFoundError(f"eval_data {config.eval_data} does not exist")
    if config.eval_image_folder is not None and not Path(config.eval_image_folder).is_dir():
        raise FileNotFoundError(f"eval_image_folder {config.eval_image_folder} is not a folder")


def device_and_dtype(device: str | None, bf16: bool | None) -> tuple[torch.device, torch.dtype]:
    """The device (default cuda when available) and the target's dtype (bf16 by default on CUDA)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = bf16 if bf16 is not None else device.type == "cuda"
    return device, torch.bfloat16 if bf16 else torch.float32
