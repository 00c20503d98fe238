"""What a decoding step costs beyond its model forwards, and throughput against batch size.

* ``overhead``: after a prefill, the time of one whole step (draft commit, tree, verification,
  acceptance, compaction) divided by the time of the model forwards inside it, each measured
  alone in the same run on the same shapes: the target's verification forward (decoder +
  lm_head over the tree), the draft's commit forward, its ``depth`` tree-level forwards and its
  ``depth + 1`` logits. Goal: <= 1.10. Batch 1 and 4 by default.
* ``throughput``: tokens per second of SpeculativeLLaVA and of ``target.generate`` on the same
  batches (1, 2, 4, 8 prompts of different lengths, one image each), with the draft's proposals
  controlled for a given tau (``msd.testing.ControlledProposals``; the draft head still runs).

Models are random LLaVA-1.5-shaped targets built from configs (``--preset``, see e2e.py).

    PYTHONPATH=.:python python benchmarks/step.py --preset cpu-small
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from e2e import PRESETS, RESULTS_DIR, Shape, corruption_for_tau, git_commit, machine_info, random_llava, synchronize

import msd
import msd_kernels
from msd.testing import ControlledProposals, random_draft

# The CPU shape of the issue that asked for this benchmark: 12 layers of width 1024.
PRESETS = {**PRESETS, "cpu-small": Shape(hidden=1024, heads=16, layers=12, intermediate=2816, vocab=32064,
                                         image_token=32000, vision_hidden=64, vision_heads=2, vision_layers=1,
                                         vision_intermediate=128, image_size=56, patch=14)}


def prompts(shape: Shape, batch: int, device: str, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """``batch`` prompts of different lengths (BOS, words, one image, words)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for row in range(batch):
        words = torch.randint(3, shape.image_token, (8 + 5 * row,), generator=gen).tolist()
        ids = [1] + words[:4] + [shape.image_token] * shape.image_tokens + words[4:]
        pixels = torch.randn(1, 3, shape.image_size, shape.image_size, generator=gen)
        out.append({"input_ids": torch.tensor([ids], device=device), "pixel_values": pixels.to(device, dtype)})
    return out


def left_padded(rows: list[dict], pad: int = 0) -> dict:
    length = max(row["input_ids"].shape[1] for row in rows)
    device = rows[0]["input_ids"].device
    ids = torch.full((len(rows), length), pad, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        n = row["input_ids"].shape[1]
        ids[index, length - n:], mask[index, length - n:] = row["input_ids"][0], 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat([row["pixel_values"] for row in rows])}


def median_seconds(run, repeats: int, before=None) -> float:
    """Median time of ``run()`` over ``repeats`` calls after one warm-up; ``before()`` untimed."""
    times = []
    for attempt in range(repeats + 1):
        if before is not None:
            before()
        synchronize(torch.device(DEVICE))
        started = time.perf_counter()
        run()
        synchronize(torch.device(DEVICE))
        if attempt:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


DEVICE = "cpu"


@torch.no_grad()
def overhead(target, draft, shape: Shape, batch: int, tree: tuple[int, int, int], repeats: int) -> dict:
    top_k, depth, total = tree
    engine = msd.SpeculativeLLaVA(target, draft, top_k=top_k, depth=depth, total_tokens=total)
    inputs = left_padded(prompts(shape, batch, DEVICE, target.dtype))
    engine.generate(**inputs, max_new_tokens=2 * (depth + 2))  # buffers, prefill, a few steps
    # The step over the whole batch (its rows may have left it before the call ended).
    buffers = engine._buffers
    step = next(iter(buffers.steps.values()))
    state, drafter, cache = buffers.state, buffers.drafter, buffers.target_cache
    saved = [tensor.clone() for tensor in (cache.prefix_len, drafter.cache.prefix_len, state.root,
                                           state.commit_tokens, state.commit_features, state.commit_count,
                                           drafter.root_hidden)]
    state.active.fill_(True)
    state.commit_count.fill_(depth + 2)  # a full commit, as after a step that took a whole path

    def restore():
        for live, copy in zip((cache.prefix_len, drafter.cache.prefix_len, state.root, state.commit_tokens,
                               state.commit_features, state.commit_count, drafter.root_hidden), saved):
            live.copy_(copy)
        state.commit_count.fill_(depth + 2)

    step_seconds = median_seconds(step, repeats, restore)

    # The forwards inside a step, alone, on the step's shapes.
    restore()
    adapter, hidden = engine.adapter, target.config.text_config.hidden_size
    tree_tokens = torch.randint(3, shape.image_token, (batch, total), device=DEVICE)
    depths = torch.zeros(batch, total, dtype=torch.long, device=DEVICE)
    tree_out = drafter.build(state.root, cache.prefix_len.long())
    restore()
    embeds = adapter.embed_tokens(tree_tokens)
    positions = adapter.positions(cache.prefix_len.long()[:, None] + depths, state.rope_delta)
    verify = median_seconds(lambda: adapter.lm_head(adapter.decoder(embeds, positions, cache, tree_out.mask)),
                            repeats, restore)
    commit_inputs = torch.randn(batch, depth + 2, hidden, dtype=target.dtype, device=DEVICE)
    commit_positions = drafter.cache.prefix_len.long()[:, None] + torch.arange(depth + 2, device=DEVICE)
    commit = median_seconds(lambda: draft(commit_inputs, commit_positions, cache=drafter.cache), repeats, restore)
    level_inputs = torch.randn(batch, top_k, hidden, dtype=target.dtype, device=DEVICE)
    level_positions = drafter.cache.prefix_len.long()[:, None].expand(batch, top_k)
    # The deepest level: its nodes after all earlier levels' rows, each seeing its ancestors.
    tree_len = depth * top_k
    level_mask = msd_kernels.pack_mask(torch.ones(batch, top_k, tree_len, dtype=torch.bool))

    def deepest_level():
        drafter.cache.write_offset = tree_len - top_k
        draft(level_inputs, level_positions, cache=drafter.cache, tree_mask=level_mask, tree_len=tree_len)
        drafter.cache.write_offset = 0

    level = median_seconds(deepest_level, repeats, restore)
    logits = median_seconds(lambda: draft.compute_logits(level_inputs), repeats)
    forwards = verify + commit + depth * level + (depth + 1) * logits
    return {"batch": batch, "step_ms": 1e3 * step_seconds, "forwards_ms": 1e3 * forwards,
            "verify_ms": 1e3 * verify, "draft_commit_ms": 1e3 * commit, "draft_level_ms": 1e3 * level,
            "draft_logits_ms": 1e3 * logits, "ratio": step_seconds / forwards}


@torch.no_grad()
def throughput(target, draft, shape: Shape, batch: int, tree: tuple[int, int, int], tau: float,
               max_new: int) -> dict:
    top_k, depth, total = tree
    rows = prompts(shape, batch, DEVICE, target.dtype, seed=batch)
    inputs = left_padded(rows)
    synchronize(torch.device(DEVICE))
    started = time.perf_counter()
    baseline = target.generate(**inputs, do_sample=False, max_new_tokens=max_new)
    synchronize(torch.device(DEVICE))
    hf_seconds = time.perf_counter() - started
    references = [target.generate(**row, do_sample=False, max_new_tokens=max_new)[0].tolist() for row in rows]
    proposer = ControlledProposals(references, corruption_for_tau(tau, depth + 1))
    engine = msd.SpeculativeLLaVA(target, draft, top_k=top_k, depth=depth, total_tokens=total, proposer=proposer)
    engine.generate(**inputs, max_new_tokens=4)  # buffers and kernels warm
    proposer.seconds = 0.0
    synchronize(torch.device(DEVICE))
    started = time.perf_counter()
    output = engine.generate(**inputs, max_new_tokens=max_new)
    synchronize(torch.device(DEVICE))
    msd_seconds = time.perf_counter() - started
    new = (output.shape[1] - inputs["input_ids"].shape[1]) * batch
    return {"batch": batch, "tau": engine.last_stats.tau, "new_tokens": new, "hf_tokens_per_s": new / hf_seconds,
            "msd_tokens_per_s": new / msd_seconds, "speedup": hf_seconds / msd_seconds,
            "proposer_s": proposer.seconds, "same_shape_as_generate": tuple(output.shape) == tuple(baseline.shape)}


def markdown(result: dict) -> str:
    lines = [f"Decoding step ({result['device']}, {result['preset']}, tree {result['tree']}, torch {result['torch']}, "
             f"transformers {result['transformers']}, commit {result['commit']}, {result['date']})", ""]
    if result["overhead"]:
        lines += ["| batch | step (ms) | forwards inside (ms) | step / forwards | verify | draft commit | "
                  "draft level | draft logits |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['step_ms']:.1f} | {r['forwards_ms']:.1f} | {r['ratio']:.3f} | "
                  f"{r['verify_ms']:.1f} | {r['draft_commit_ms']:.1f} | {r['draft_level_ms']:.1f} | "
                  f"{r['draft_logits_ms']:.2f} |" for r in result["overhead"]]
        lines.append("")
    if result["throughput"]:
        lines += ["| batch | tau | target.generate (tok/s) | msd (tok/s) | speedup | proposer (s) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['batch']} | {r['tau']:.2f} | {r['hf_tokens_per_s']:.1f} | {r['msd_tokens_per_s']:.1f} | "
                  f"{r['speedup']:.2f}x | {r['proposer_s']:.2f} |" for r in result["throughput"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="cpu-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--overhead-batches", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--throughput-batches", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--tau", type=float, default=3.0, help="controlled tau of the throughput runs")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tree", type=int, nargs=3, default=[10, 5, 60], metavar=("TOP_K", "DEPTH", "TOKENS"),
                        help="the draft tree (default: msd's, 10 5 60)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    DEVICE = args.device
    shape, tree = PRESETS[args.preset], tuple(args.tree)
    target = random_llava(shape, getattr(torch, args.dtype), args.device, seed=0)
    draft = random_draft(target)
    result = {"device": machine_info(torch.device(args.device))["device"], "preset": args.preset, "tree": tree,
              "date": datetime.date.today().isoformat(), "commit": git_commit(), "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "overhead": [], "throughput": []}
    for batch in args.overhead_batches:
        result["overhead"].append(overhead(target, draft, shape, batch, tree, args.repeats))
        print(result["overhead"][-1], flush=True)
    for batch in args.throughput_batches:
        result["throughput"].append(throughput(target, draft, shape, batch, tree, args.tau, args.max_new_tokens))
        print(result["throughput"][-1], flush=True)
    slug = "cpu" if args.device == "cpu" else "gpu"
    out = args.out or RESULTS_DIR / f"{result['date']}-{slug}-{result['commit']}-step.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
