"""msd's decoder forward against Hugging Face's forward of the same text model, same run.

For a LLaVA-1.5-7B-shaped (Llama) and a Qwen2-VL-7B-shaped (Qwen2, M-RoPE) target with a few
layers of full width and random weights, after a prefix of ``--prefix`` tokens in the cache:

* decode, Q = 1: one token. Hugging Face: its text model on its own ``DynamicCache``.
* verify, Q = 60: msd scores a 60-token draft tree (the default top_k 10 / depth 5 tree) under
  its tree mask; Hugging Face scores a 60-token chunk causally (what it would run to check 60
  tokens, e.g. in assisted generation, which cannot take a tree).

Both exclude the vision tower and the lm_head (the same modules on both sides). The goal is a
ratio msd / Hugging Face <= 1.0. Results: ``--out`` (JSON) and a markdown table beside it.

    PYTHONPATH=.:python python benchmarks/decoder.py --layers 2 --repeats 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import transformers
from e2e import RESULTS_DIR, git_commit, machine_info
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import msd_kernels
from msd.targets import Qwen2VLAdapter, adapter_for

TREE = (10, 5, 60)  # top_k, depth, tree tokens (root included)


def llava_7b_shaped(layers: int) -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=1000))


def qwen2_vl_7b_shaped(layers: int) -> Qwen2VLForConditionalGeneration:
    text = dict(vocab_size=1024, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(depth=1, embed_dim=32, hidden_size=3584, num_heads=2, patch_size=4, spatial_merge_size=2)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=1000,
                                                         video_token_id=1001, vision_start_token_id=1002))


SHAPES = {"llava-1.5-7b": llava_7b_shaped, "qwen2-vl-7b": qwen2_vl_7b_shaped}


def timed_ms(run, reset=None) -> float:
    """Wall time of ``run()`` in ms; ``reset()`` (untimed) after it."""
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    if reset is not None:
        reset()
    return elapsed * 1e3


def paired_median_ms(ours, theirs, repeats: int, reset_theirs=None) -> tuple[float, float]:
    """Median wall times of ``ours()`` and ``theirs()`` in ms over ``repeats`` calls each after
    one warm-up of each, interleaved and alternating which goes first, so that a drift of the
    machine's speed during the run falls on both alike."""
    times = ([], [])
    for attempt in range(repeats + 1):
        pair = ((0, ours, None), (1, theirs, reset_theirs))
        for side, run, reset in pair if attempt % 2 else reversed(pair):
            elapsed = timed_ms(run, reset)
            if attempt:
                times[side].append(elapsed)
    return statistics.median(times[0]), statistics.median(times[1])


def random_tree(batch: int, vocab: int, generator: torch.Generator) -> dict:
    """A default-sized draft tree (tokens, depth, packed mask) from random draft logits."""
    top_k, depth, tokens = TREE
    pool = msd_kernels.new_tree_pool(batch, top_k, depth, "cpu")
    frontier = msd_kernels.tree_expand(torch.randn(batch, 1, vocab, generator=generator), torch.zeros(batch, 1),
                                       torch.full((batch, 1), -1), *pool, 0, top_k)
    for step in range(depth):
        logits = torch.randn(batch, top_k, vocab, generator=generator)
        frontier = msd_kernels.tree_expand(logits, frontier[1], frontier[2], *pool, msd_kernels.pool_size(top_k, step),
                                           top_k)
    tree = msd_kernels.tree_assemble(*pool, torch.zeros(batch, dtype=torch.long), tokens - 1)
    return {"tokens": tree[0], "depth": tree[1], "mask": tree[3]}


@torch.no_grad()
def measure(name: str, layers: int, prefix: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    target = SHAPES[name](layers).eval()
    adapter = adapter_for(target)
    text_model, hidden = adapter.text_model, adapter.text_config.hidden_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, prefix, hidden, generator=generator)
    plain = torch.arange(prefix)[None]
    # No visual tokens in the prefix: M-RoPE continues with zero offsets on its three axes.
    delta = torch.zeros(3, 1, dtype=torch.long) if isinstance(adapter, Qwen2VLAdapter) else torch.zeros(1).long()

    def positions(rows: torch.Tensor) -> torch.Tensor:
        return adapter.positions(rows, delta)

    # msd: the prefix committed to a static cache; each timed call writes the same rows after it.
    cache = adapter.new_cache(1, prefix + TREE[2])
    adapter.decoder(prompt, positions(plain), cache)
    cache.advance(prefix)
    # Hugging Face: its own cache from its forward over the prefix (output field 1 in every release;
    # the cache is the 4th positional argument in every release, whatever its keyword is called).
    hf_cache = text_model(None, None, positions(plain), None, prompt, use_cache=True)[1]

    tree = random_tree(1, 1024, generator)
    rows = []
    for mode, count in (("decode", 1), ("verify", TREE[2])):
        embeds = torch.randn(1, count, hidden, generator=generator)
        # msd: a token at the prefix's end, or the tree under its tree mask.
        depth, mask = (torch.zeros(1, 1, dtype=torch.long), None) if mode == "decode" else (tree["depth"], tree["mask"])
        ours, theirs = positions(prefix + depth), positions(prefix + torch.arange(count)[None])
        # crop(-n) drops the n rows a call appended (a negative count means the same in every release).
        msd_ms, hf_ms = paired_median_ms(partial(adapter.decoder, embeds, ours, cache, mask),
                                         partial(text_model, None, None, theirs, hf_cache, embeds, use_cache=True),
                                         repeats, reset_theirs=partial(hf_cache.crop, -count))
        rows.append({"shape": name, "layers": layers, "prefix": prefix, "mode": mode, "tokens": count,
                     "msd_ms": msd_ms, "hf_ms": hf_ms, "ratio": msd_ms / hf_ms})
        print(f"{name} {mode:6s} Q={count:2d}: msd {msd_ms:8.2f} ms | HF {hf_ms:8.2f} ms | ratio {msd_ms / hf_ms:.3f}",
              flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"msd decoder vs Hugging Face forward ({result['device']}, torch {result['torch']}, transformers "
             f"{result['transformers']}, commit {result['commit']}, {result['date']}; median of {result['repeats']} "
             f"interleaved calls, {result['threads']} threads, float32)", "",
             "| shape | layers | prefix | step | tokens | msd (ms) | HF (ms) | msd / HF |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['shape']} | {row['layers']} | {row['prefix']} | {row['mode']} | {row['tokens']} | "
                     f"{row['msd_ms']:.2f} | {row['hf_ms']:.2f} | {row['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of each shape (default 2)")
    parser.add_argument("--prefix", type=int, default=640, help="tokens already in the cache (default 640)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per figure (default 10)")
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--out", type=Path,
                        help="JSON path (default: benchmarks/results/<date>-cpu-<commit>-decoder.json)")
    args = parser.parse_args(argv)
    rows = [row for name in args.shapes for row in measure(name, args.layers, args.prefix, args.repeats)]
    date = datetime.date.today().isoformat()
    result = {"device": "cpu", "date": date, "commit": git_commit(), "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "machine": machine_info(torch.device("cpu")), "rows": rows}
    out = args.out or RESULTS_DIR / f"{date}-cpu-{result['commit']}-decoder.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
