"""MSD's two design principles, measured on the demo world (MSD_SPEC.md section 1).

(a) decoupled vs fused visual inputs: the MSD draft (visual positions take the raw visual
    embedding) against the coupled EAGLE-style draft (``decouple_visual=False``: visual
    positions get ``fc(concat(visual embedding, feature))`` like text), both trained in
    two stages;
(b) two-stage training (text only, then more and more image conversations: the curriculum)
    against multimodal-only and text-only training of the decoupled draft, with the same
    number of training samples;
(c) the EAGLE-3-style draft (three target layers fused by ``fc``, training-time test, its own
    lm_head) against MSD's EAGLE-2-style draft, both two-stage and decoupled, same samples,
    with the target's whole vocabulary and with a reduced one (``--draft-vocab`` ids, the most
    frequent answer tokens);
(d) the draft's cost per tree level for a Qwen2-VL-7B-shaped draft (random weights, float32,
    CPU): the EAGLE-2-style draft (the target's 152064-row lm_head) against the EAGLE-3-style
    draft with the full and a 32000-id vocabulary. One tree of msd's default shape (top_k 10, depth 5) is drafted
    after a ``--cost-prefix``-token prompt; a level is one draft forward, its logits and the
    expansion (``msd_kernels.tree_expand``).

The world, tokenizer and target are the demo's own (:mod:`msd.demo.run`, the default
:class:`DemoRecipe`: a target that reads its images), cached in ``--root`` like the demo's
stages (``--root`` may be the demo's cache), and so is each trained draft. Every
variant trains with several seeds; tau (greedy, pooled over held-out multimodal prompts,
:mod:`msd.demo.evaluate`) is reported as mean +- std over the seeds, next to an untrained
draft's. Each MSD output is checked against the target's own greedy ``generate``.
Results: ``--out`` (JSON) and the same name with ``.md`` (a markdown table, also printed).

    PYTHONPATH=.:python python3 benchmarks/ablation.py --seeds 0 1 --out benchmarks/results/ablation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from step import median_seconds  # benchmarks/, on the path when this file runs as a script
from transformers import AutoProcessor, LlavaForConditionalGeneration, Qwen2VLConfig
from transformers.utils import logging as transformers_logging

from msd.cache import StaticKVCache
from msd.demo.evaluate import DescriptionScore, greedy_tau, held_out_prompts
from msd.demo.run import TREE, DemoRecipe, Stage, demo_stages, run_stages
from msd.demo.target import MAX_LENGTH
from msd.demo.world import IMAGE_FOLDER, TEXT_JSON, WORLD_JSON
from msd.draft import MSDDraftModel
from msd.draft_checkpoint import draft_config_for, load_draft
from msd.draft_eagle3 import Eagle3DraftModel
from msd.eagle3_checkpoint import eagle3_config_for
from msd.engine import SpeculativeLLaVA
from msd.testing import random_draft
from msd.train.config import TrainConfig
from msd.train.trainer import train
from msd.tree_draft import TreeDrafter

# The demo's recipe: a smaller target trained for fewer steps does not yet read shapes, and
# then the draft's visual inputs cannot matter.
RECIPE = DemoRecipe()


@dataclass(frozen=True)
class Variant:
    """How one draft variant trains: its data, its visual inputs and its kind."""

    text: bool  # stage-1 text conversations
    multimodal: bool  # image conversations
    decoupled: bool = True  # MSD's decoupled visual inputs
    kind: str = "msd"  # draft kind: msd (EAGLE-2-style) or eagle3
    reduced_vocab: bool = False  # eagle3: --draft-vocab ids instead of the target's vocabulary


VARIANTS = {
    "two-stage, decoupled (MSD)": Variant(True, True),
    "two-stage, fused": Variant(True, True, decoupled=False),
    "multimodal only, decoupled": Variant(False, True),
    "text only, decoupled": Variant(True, False),
    "EAGLE-3-style, two-stage, decoupled, full vocabulary": Variant(True, True, kind="eagle3"),
    "EAGLE-3-style, two-stage, decoupled, reduced vocabulary": Variant(True, True, kind="eagle3",
                                                                         reduced_vocab=True),
}
UNTRAINED = "untrained (random draft)"
COST_TREE = (10, 5, 60)  # top_k, depth, tree tokens: msd's default tree, for a 7B target
# Qwen2-VL-7B's text model, for the draft's cost per tree level.
QWEN2_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                        rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "msd" / "ablation",
                        help="cache of the world, target and drafts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="draft training seeds")
    parser.add_argument("--epochs", type=int, default=4, help="draft epochs (the curriculum spans them)")
    parser.add_argument("--samples-per-epoch", type=int, default=480, help="draft training samples per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=24, help="held-out multimodal prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft-vocab", type=int, default=64,
                        help="the reduced vocabulary of the EAGLE-3-style variant, in ids (the demo world's "
                             "answers use 116 distinct tokens; the 64 most frequent are 97%% of them)")
    parser.add_argument("--cost-prefix", type=int, default=1024, help="prompt tokens before the timed trees")
    parser.add_argument("--cost-repeats", type=int, default=5, help="timed trees per draft (median)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation.json"))
    return parser.parse_args()


def draft_stage(root: Path, args: argparse.Namespace, variant: str, seed: int) -> Stage:
    """The cached training of one variant with one seed; its marker names the final draft."""
    spec = VARIANTS[variant]
    world = root / "world"

    def build(folder: Path) -> dict:
        final = train(TrainConfig(
            target=str(root / "target"), output_dir=str(folder),
            text_data=str(world / TEXT_JSON) if spec.text else None,
            multimodal_data=str(world / WORLD_JSON) if spec.multimodal else None,
            image_folder=str(world / IMAGE_FOLDER), decouple_visual=spec.decoupled, draft_kind=spec.kind,
            draft_vocab_size=args.draft_vocab if spec.reduced_vocab else None, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, warmup_steps=20, max_length=MAX_LENGTH,
            samples_per_epoch=args.samples_per_epoch, seed=seed, device="cpu", progress=False))
        return {"draft": str(final)}

    slug = variant.split(" (")[0].replace(", ", "-").replace(" ", "-")
    if spec.reduced_vocab:
        slug += f"-{args.draft_vocab}"
    name = f"drafts-e{args.epochs}-n{args.samples_per_epoch}-b{args.batch_size}-lr{args.lr}/{slug}-seed{seed}"
    return Stage(name, build)


def tree_cost(draft, args: argparse.Namespace, generator: torch.Generator) -> dict:
    """ms per tree of ``COST_TREE`` and per level, and of the logits of one level, after a
    ``--cost-prefix``-token prompt of random pairs in ``draft``'s cache."""
    top_k, depth, total_tokens = COST_TREE
    length, hidden_size = args.cost_prefix, draft.config.hidden_size
    cache = StaticKVCache(1, 1, draft.config.num_key_value_heads, length + 2 * total_tokens, draft.head_dim,
                          torch.float32, "cpu")
    drafter = TreeDrafter(draft, cache, top_k, depth, total_tokens - 1)
    root = torch.tensor([7])
    drafter.commit_prompt(0, torch.randint(0, 1000, (1, length), generator=generator), root,
                          torch.randn(1, length, draft.feature_size, generator=generator),
                          torch.randn(1, length, hidden_size, generator=generator),
                          torch.zeros(1, length, dtype=torch.bool))
    start, hidden = torch.tensor([length]), torch.randn(1, top_k, hidden_size, generator=generator)
    tree_ms = 1e3 * median_seconds(lambda: drafter.build(root, start), args.cost_repeats)
    logits_ms = 1e3 * median_seconds(lambda: draft.compute_logits(hidden), args.cost_repeats)
    return {"lm_head_rows": draft.lm_head.weight.shape[0], "tree_ms": tree_ms, "level_ms": tree_ms / depth,
            "logits_ms_per_level": logits_ms}


def level_cost(args: argparse.Namespace) -> dict:
    """The cost of each draft kind for a Qwen2-VL-7B-shaped target (see (d) above)."""
    shaped = SimpleNamespace(config=Qwen2VLConfig(text_config=QWEN2_VL_7B_TEXT))  # the config is all they read
    text = shaped.config.get_text_config()
    drafts = {
        f"EAGLE-2-style MSD draft ({text.vocab_size} ids)":
            lambda: MSDDraftModel(draft_config_for(shaped),
                                  lm_head=torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False)),
        f"EAGLE-3-style draft, full vocabulary ({text.vocab_size} ids)":
            lambda: Eagle3DraftModel(eagle3_config_for(shaped)),
        "EAGLE-3-style draft, reduced vocabulary (32000 ids)":
            lambda: Eagle3DraftModel(eagle3_config_for(shaped, draft_vocab_size=32000)),
    }
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for name, make in drafts.items():
        with torch.no_grad():
            rows[name] = tree_cost(make().eval(), args, generator)
        print(f"{name}: {rows[name]['tree_ms']:.1f} ms per tree, {rows[name]['level_ms']:.1f} ms per level "
              f"(logits {rows[name]['logits_ms_per_level']:.1f} ms)", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    markers = run_stages(args.root, demo_stages(args.root, RECIPE, torch.device("cpu"), progress=False)[:3])
    held_out = DescriptionScore(**markers["target"]["held_out"])  # how well the target reads its images
    print(f"target: {held_out.summary()}", flush=True)
    processor = AutoProcessor.from_pretrained(args.root / "target")
    target = LlavaForConditionalGeneration.from_pretrained(args.root / "target").eval()
    prompts = held_out_prompts(args.root / "world", processor, args.prompts)
    options = {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    with torch.no_grad():
        reference = [target.generate(**inputs, **options) for inputs in prompts]

    def score(draft) -> float:
        tau, outputs = greedy_tau(SpeculativeLLaVA(target, draft, **TREE), prompts, args.max_new_tokens)
        if not all(torch.equal(a, b) for a, b in zip(outputs, reference)):
            raise SystemExit("MSD's output differs from the target's greedy generate")
        return tau

    taus = {UNTRAINED: [score(random_draft(target, seed)) for seed in args.seeds]}
    for variant in VARIANTS:
        taus[variant] = []
        for seed in args.seeds:
            marker = run_stages(args.root, [draft_stage(args.root, args, variant, seed)]).popitem()[1]
            taus[variant].append(score(load_draft(marker["draft"], target)))
            print(f"{variant}, seed {seed}: tau {taus[variant][-1]:.3f}", flush=True)
    cost = level_cost(args)

    rows = {name: {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                   "taus": values} for name, values in taus.items()}
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    result = {"settings": settings | {"tree": TREE, "recipe": repr(RECIPE)}, "target_held_out": held_out.to_json(),
              "tau": rows, "qwen2_vl_7b_draft_cost": cost, "threads": torch.get_num_threads(),
              "seconds": round(time.perf_counter() - started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = [f"| draft ({len(args.seeds)} seeds, {args.prompts} held-out image prompts) | tau mean +- std |",
             "|---|---|"]
    table += [f"| {name} | {row['mean']:.2f} +- {row['std']:.2f} |" for name, row in rows.items()]
    table += ["", f"| Qwen2-VL-7B-shaped draft, float32, CPU ({torch.get_num_threads()} threads), "
              f"{args.cost_prefix}-token prompt | ms per tree | ms per level | of which logits |", "|---|---|---|---|"]
    table += [f"| {name} | {row['tree_ms']:.1f} | {row['level_ms']:.1f} | {row['logits_ms_per_level']:.1f} |"
              for name, row in cost.items()]
    args.out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
