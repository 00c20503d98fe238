"""Batches and the fixed-shape step: every row of a batch decodes as its prompt alone does in the
target's own generate; rows stop on their own and are padded as generate pads them; the step
compiles with torch.compile(fullgraph=True) (no host sync, no data-dependent shape); buffers are
reused across calls; on a GPU, the step runs under CUDA's sync-debug mode and as a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from test_engine import make_prompt, word_tokenizer
from transformers import GenerationConfig

import msd
from msd.sampling import logits_warpers

from oracle import assert_matches_distribution, assert_same_greedy, exact_two_token_distribution
from tiny_models import OracleProposals, qwen_inputs, random_draft, tiny_llava, tiny_llava_next, tiny_qwen2_vl

MAX_NEW = 16
PAD = 0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def saved_targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-targets")
    return {
        "llava": tiny_llava(root / "llava", seed=1),
        "llava-next": tiny_llava_next(root / "llava-next", seed=3, hidden=128, heads=2, kv_heads=1),
        "qwen2-vl": tiny_qwen2_vl(root / "qwen2-vl", seed=4),
    }


def row_prompts(target, count: int, seed: int = 0) -> list[dict]:
    """``count`` prompts of different lengths with 0, 1 or 2 images each (different grids for Qwen)."""
    prompts = []
    for row in range(count):
        images, words = row % 3, 2 + 3 * row
        if "Qwen" in type(target).__name__:
            grids = [(4, 6), (2, 4)][:images]
            text = [[1] + list(range(5, 5 + words)), [7, 8], [9]]
            prompts.append(qwen_inputs(target, text, grids, seed=seed + row))
        else:
            prompt = make_prompt(target, images, seed=seed + row)
            extra = torch.arange(3, 3 + words, device=target.device)[None]
            prompt["input_ids"] = torch.cat([prompt["input_ids"], extra], 1)
            prompts.append(prompt)
    return prompts


def left_padded(rows: list[dict]) -> dict:
    """The rows as one batch, left-padded as processors pad for generation: per-token inputs
    padded, pixel inputs of every row's images concatenated in row order."""
    length = max(row["input_ids"].shape[1] for row in rows)
    device = rows[0]["input_ids"].device
    batch = {"input_ids": torch.full((len(rows), length), PAD, device=device),
             "attention_mask": torch.zeros(len(rows), length, dtype=torch.long, device=device)}
    if "mm_token_type_ids" in rows[0]:
        batch["mm_token_type_ids"] = torch.zeros(len(rows), length, dtype=rows[0]["mm_token_type_ids"].dtype,
                                                 device=device)
    for index, row in enumerate(rows):
        n = row["input_ids"].shape[1]
        batch["input_ids"][index, length - n:] = row["input_ids"][0]
        batch["attention_mask"][index, length - n:] = 1
        if "mm_token_type_ids" in row:
            batch["mm_token_type_ids"][index, length - n:] = row["mm_token_type_ids"][0]
    for key in ("pixel_values", "image_sizes", "image_grid_thw"):
        pieces = [row[key] for row in rows if key in row]
        if pieces:
            batch[key] = torch.cat(pieces)
    return batch


def expected_batch(rows: list[dict], alone: list[torch.Tensor], batch: dict, pad: int) -> torch.Tensor:
    """The padded batch output built from each row's own generate: the padded prompts, then each
    row's new tokens, ``pad`` after a row's end, as wide as the longest continuation."""
    new = [output[0, row["input_ids"].shape[1]:] for row, output in zip(rows, alone)]
    width = max(len(tokens) for tokens in new)
    out = torch.full((len(rows), batch["input_ids"].shape[1] + width), pad, device=batch["input_ids"].device)
    out[:, :batch["input_ids"].shape[1]] = batch["input_ids"]
    for index, tokens in enumerate(new):
        out[index, batch["input_ids"].shape[1]:batch["input_ids"].shape[1] + len(tokens)] = tokens
    return out


def engine_for(target, proposer=None, **options) -> msd.SpeculativeLLaVA:
    return msd.SpeculativeLLaVA(target, random_draft(target), top_k=4, depth=3, total_tokens=12, proposer=proposer,
                                **options)


def assert_batch_matches(target, rows, got, alone, batch, hf_batch, pad):
    """Each row equals its prompt alone; shape and padding are those of generate on the batch
    (``hf_batch``; None where generate on the batch is not the reference, see the stop strings)."""
    for index, (row, output) in enumerate(zip(rows, alone)):
        length = row["input_ids"].shape[1]
        new = got[index, batch["input_ids"].shape[1]:]
        new = new[:output.shape[1] - length]
        assert_same_greedy(torch.cat([row["input_ids"], new[None]], 1), output, target, row)
    expected = expected_batch(rows, alone, batch, pad)
    if target.device.type == "cpu" and target.dtype == torch.float32:
        assert torch.equal(got, expected)
    if hf_batch is not None:
        assert got.shape == hf_batch.shape
        assert torch.equal(got == pad, hf_batch == pad)


@pytest.mark.parametrize("family,size", [("llava", 2), ("llava", 5), ("llava-next", 3), ("qwen2-vl", 2),
                                         ("qwen2-vl", 4)])
@pytest.mark.parametrize("draft", ["random", 0.3])
def test_batch_rows_equal_their_prompts_alone(targets, family, size, draft):
    """Greedy rows of different lengths and images, each stopping on its own: one row at an
    EOS inside an accepted path, the others at max_new_tokens."""
    target = targets[family]
    rows = row_prompts(target, size)
    free_run = target.generate(**rows[0], do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=None)
    eos = int(free_run[0, rows[0]["input_ids"].shape[1] + 4])
    alone = [target.generate(**row, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
             for row in rows]
    batch = left_padded(rows)
    hf_batch = target.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    proposer = None if draft == "random" else OracleProposals([output[0].tolist() for output in alone], draft)
    got = engine_for(target, proposer).generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    assert_batch_matches(target, rows, got, alone, batch, hf_batch, PAD)


def test_a_stop_string_in_one_row_only(targets):
    target = targets["llava"]
    tokenizer = word_tokenizer()
    rows = row_prompts(target, 3, seed=7)
    free_run = target.generate(**rows[1], do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=None)
    stop = f"w{int(free_run[0, rows[1]['input_ids'].shape[1] + 3])}"
    options = dict(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD,
                   stop_strings=[stop], tokenizer=tokenizer)
    alone = [target.generate(**row, **options) for row in rows]
    assert len({output.shape[1] - row["input_ids"].shape[1] for row, output in zip(rows, alone)}) > 1
    batch = left_padded(rows)
    proposer = OracleProposals([output[0].tolist() for output in alone], 0.0)
    got = engine_for(target, proposer).generate(**batch, **{k: v for k, v in options.items() if k != "do_sample"})
    # generate on the batch is no reference here: there (transformers 4.56 and 5.24 alike) the stop
    # string stops no row, where each prompt alone stops at it.
    assert_batch_matches(target, rows, got, alone, batch, None, PAD)


def test_batch_sampling_matches_each_rows_distribution(targets):
    """Sampling a batch of two: each row's first two tokens follow its own target distribution."""
    target = targets["llava"]
    rows = row_prompts(target, 2, seed=3)
    options = dict(temperature=0.9, top_k=4)
    warpers = logits_warpers(GenerationConfig(do_sample=True, **options))
    exact = [exact_two_token_distribution(target, row, warpers) for row in rows]
    greedy = [target.generate(**row, do_sample=False, max_new_tokens=4)[0].tolist() for row in rows]
    engine = engine_for(target, OracleProposals(greedy, corruption=0.3))
    batch = left_padded(rows)
    torch.manual_seed(0)
    samples = [engine.generate(**batch, do_sample=True, max_new_tokens=2, eos_token_id=None, pad_token_id=PAD,
                               **options)[:, batch["input_ids"].shape[1]:].tolist() for _ in range(600)]
    for index in range(2):
        assert_matches_distribution([tuple(sample[index]) for sample in samples], exact[index])


def test_repack_moves_the_kept_sequences_to_the_front_in_place():
    """Packing the running sequences of a cache (two repacks, 5 -> 3 -> 2) gives the rows an
    index_select over the batch gives, in a view of the same storage."""
    torch.manual_seed(0)
    cache = msd.cache.StaticKVCache(2, 5, 2, 8, 3, torch.float32, "cpu")
    cache.kv.copy_(torch.randn_like(cache.kv))
    cache.prefix_len.copy_(torch.tensor([3, 1, 4, 1, 5], dtype=torch.int32))
    original, lengths = cache.kv.clone(), cache.prefix_len.clone()
    three = cache.repack(5, [1, 3, 4])
    assert three.kv.is_contiguous() and three.kv.data_ptr() == cache.kv.data_ptr()
    assert torch.equal(three.kv, original[:, [1, 3, 4]]) and torch.equal(three.prefix_len, lengths[[1, 3, 4]])
    two = cache.repack(3, [0, 2])
    assert torch.equal(two.kv, original[:, [1, 4]]) and torch.equal(two.prefix_len, lengths[[1, 4]])
    assert cache.packed(2).kv.data_ptr() == two.kv.data_ptr()
    with pytest.raises(ValueError, match="keep"):
        cache.repack(2, [1, 0])


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_finished_rows_leave_the_batch(targets, family):
    """Once most rows have stopped, the step runs on the others alone (packed to the front of
    the same buffers), and every row still equals its prompt alone."""
    target = targets[family]
    rows = row_prompts(target, 4, seed=11)
    free = [target.generate(**row, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=None)[0]
            [row["input_ids"].shape[1]:] for row in rows]

    def stops(eos: int) -> list[int]:
        return [next((index + 1 for index, token in enumerate(run.tolist()) if token == eos), MAX_NEW) for run in free]

    # An EOS that ends at least half the rows early and some row late.
    eos = next(token for token in free[0].tolist()
               if sum(stop < max(stops(token)) - 2 for stop in stops(token)) >= 2)
    options = dict(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    alone = [target.generate(**row, do_sample=False, **options) for row in rows]
    batch = left_padded(rows)
    engine = engine_for(target, OracleProposals([output[0].tolist() for output in alone], 0.3))
    got = engine.generate(**batch, **options)
    assert_batch_matches(target, rows, got, alone, batch, None, PAD)
    sizes = engine.last_stats.batch_per_step
    assert sizes[0] == 4 and min(sizes) <= 2 and sizes == sorted(sizes, reverse=True), sizes


def test_buffers_are_reused_by_a_call_of_the_same_shape(targets):
    target = targets["llava"]
    batch = left_padded(row_prompts(target, 3))
    engine = engine_for(target)
    first = engine.generate(**batch, max_new_tokens=8, pad_token_id=PAD)
    cache, draft_cache, state = engine._buffers.target_cache.kv, engine._buffers.drafter.cache.kv, engine._buffers.state
    second = engine.generate(**batch, max_new_tokens=8, pad_token_id=PAD)
    assert engine._buffers.target_cache.kv is cache and engine._buffers.drafter.cache.kv is draft_cache
    assert engine._buffers.state is state
    assert torch.equal(first, second)


def test_the_step_compiles_without_graph_breaks_and_decodes_as_eager(targets):
    """torch.compile(fullgraph=True) of the whole step (draft commit, tree, verification,
    acceptance, compaction) fails on any host sync or data-dependent shape."""
    for family in ("llava", "qwen2-vl"):
        target = targets[family]
        batch = left_padded(row_prompts(target, 2, seed=5))
        options = dict(max_new_tokens=10, pad_token_id=PAD)
        eager = engine_for(target).generate(**batch, **options)
        compiled_engine = engine_for(target, compile_backend="aot_eager")
        assert torch.equal(compiled_engine.generate(**batch, **options), eager)


# ------------------------------------------------------------------------------ GPU only
@needs_cuda
def test_the_cuda_step_never_syncs_with_the_host(saved_targets):
    target = saved_targets["llava"].to("cuda")
    batch = left_padded(row_prompts(target, 2))
    engine = engine_for(target)
    engine.generate(**batch, max_new_tokens=4, pad_token_id=PAD)  # buffers and kernels warm
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine._last_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        saved_targets["llava"].to("cpu")


@needs_cuda
@pytest.mark.parametrize("size", [1, 4])
def test_cuda_graph_replay_decodes_as_eager(saved_targets, size):
    target = saved_targets["llava"].to("cuda")
    try:
        batch = left_padded(row_prompts(target, size))
        options = dict(max_new_tokens=24, pad_token_id=PAD)
        eager = engine_for(target).generate(**batch, **options)
        graphed = engine_for(target, cuda_graph=True)
        assert torch.equal(graphed.generate(**batch, **options), eager)
        assert torch.equal(graphed.generate(**batch, **options), eager)  # the captured graph, replayed again
    finally:
        saved_targets["llava"].to("cpu")
