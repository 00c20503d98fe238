"""CUDA microbenchmarks of the msd kernels at LLaVA-1.5-7B shapes, against the issue's targets.

Figures (32 heads, head_dim 128, bf16; batch 1 and 8 unless said otherwise):

- tree attention (60-token draft tree over a 1024/2048/4096-token prefix) vs PyTorch SDPA with
  the equivalent dense boolean mask, and vs flash-attn's ``flash_attn_with_kvcache`` without
  the tree mask where flash_attn is installed; achieved bandwidth on the K/V bytes read, as a
  share of the device-to-device copy bandwidth measured in the same run.
  Targets at prefix 4096: >= 2x SDPA and >= 50% of the copy bandwidth.
- whole draft-tree construction (top_k 10, depth 5, T = 59, V = 32000): 1 + 5 tree_expand and
  1 tree_assemble, as eager op calls and as a CUDA-graph replay (target <= 30 us), vs the
  released code's approach (torch-op expansion + the per-node Python assembly loop of
  test_bench_tree_build.py, with its host syncs; target >= 50x).
- kv_compact of 32 layers (64 planes), B = 1, S_max 4096, prefix 1024, 6 accepted: <= 15 us.
- verify_greedy of 60 rows x 32000 vocab: <= 20 us.

Timing: CUDA events, warm-up, median of the repetitions. Before every repetition the L2 is
flushed (a write of twice its size) and the device synchronized, outside the timed region, so
an eager figure runs from an idle GPU and includes the host's launch overhead; the
CUDA-graph figure removes most of that overhead. Every timed implementation is first
checked once against the reference op (``backend="reference"``); a mismatch is reported
loudly and makes the exit status 1.

Run on a GPU:      PYTHONPATH=.:python python3 benchmarks/cuda_kernels.py --out cuda_kernels.json
Dry run on a CPU:  PYTHONPATH=.:python python3 benchmarks/cuda_kernels.py --device cpu --quick --out /tmp/x.json
(tiny sizes, host clock: checks the plumbing; CPU figures are not the issue's targets).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from test_bench_tree_build import eagle_style_assemble

import msd_kernels as mk

ROOT = Path(__file__).resolve().parent.parent
DTYPE = torch.bfloat16
ACCEPTED_PATH = (0, 2, 3, 5, 8, 9, 12)  # root + 6 accepted nodes; moves overlap their sources
ATTENTION_TOL = 2e-2  # bf16, as tests/test_cuda_tree_attention.py
QUERY_GAIN = 3.0  # as those tests: peaked softmax, O(1) outputs, so a wrong key shows
SCORE_TOL = 1e-5  # float32 log-probabilities, as tests/test_cuda_ops.py
TREE_OUTPUTS = ("tokens", "depth", "parent", "mask", "first_child", "next_sibling")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run."""

    heads: int
    head_dim: int
    prefixes: tuple[int, ...]
    batches: tuple[int, ...]
    top_k: int
    depth: int
    num_nodes: int  # T drafted tokens: trees have T + 1 rows (attention Q, verification rows)
    vocab: int
    planes: int  # kv_compact: K and V planes of every layer
    max_len: int  # kv_compact: S_max
    compact_prefix: int
    copy_bytes: int  # device-to-device copy of the bandwidth measurement


LLAVA_7B = Sizes(
    heads=32, head_dim=128, prefixes=(1024, 2048, 4096), batches=(1, 8), top_k=10, depth=5,
    num_nodes=59, vocab=32000, planes=64, max_len=4096, compact_prefix=1024, copy_bytes=1 << 30,
)
TINY = Sizes(
    heads=4, head_dim=64, prefixes=(64, 128), batches=(1, 2), top_k=4, depth=3,
    num_nodes=15, vocab=512, planes=4, max_len=256, compact_prefix=64, copy_bytes=1 << 24,
)


# --------------------------------------------------------------------------- timing
class Timer:
    """Median time of a callable in microseconds: CUDA events on a GPU, host clock on a CPU."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.cuda = device.type == "cuda"
        if self.cuda:
            l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
            self._flush = torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)

    def _prepare(self, setup) -> None:
        """Untimed: the caller's setup, then an L2 flush and an idle device."""
        if setup is not None:
            setup()
        if self.cuda:
            self._flush.fill_(1)
            torch.cuda.synchronize(self.device)

    def __call__(self, fn, setup=None) -> float:
        for _ in range(self.warmup):
            self._prepare(setup)
            fn()
        times = []
        for _ in range(self.reps):
            self._prepare(setup)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                times.append((start, end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e6)
        if self.cuda:
            torch.cuda.synchronize(self.device)
            times = [start.elapsed_time(end) * 1e3 for start, end in times]
        return statistics.median(times)

    def graph(self, fn, setup=None) -> float | None:
        """Median time of a CUDA-graph replay of ``fn`` (None on a CPU)."""
        if not self.cuda:
            return None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return self(graph.replay, setup)


# --------------------------------------------------------------------------- reporting
class Report:
    """Table rows, extra figures and correctness failures of one run."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu
        self.rows: list[dict] = []
        self.mismatches: list[str] = []

    def row(self, name: str, time_us: float | None, target: str = "-", met: bool | None = None,
            notes: str = "", **figures) -> None:
        if not self.on_gpu and met is not None:
            met = None  # CPU figures say nothing about the GPU targets
        self.rows.append({"name": name, "time_us": time_us, "target": target, "met": met,
                          "notes": notes, **figures})

    def check(self, name: str, assertion, *args) -> None:
        """Run ``assertion(*args)`` (raises AssertionError on a mismatch); record and shout failures."""
        try:
            assertion(*args)
        except AssertionError as error:
            message = f"{name}: {error}".replace("\n", " ")
            print(f"\n!!!!! MISMATCH vs reference: {message}\n", file=sys.stderr, flush=True)
            self.mismatches.append(message)

    def markdown(self) -> str:
        met_text = {True: "yes", False: "**NO**", None: "n/a" if self.on_gpu else "n/a (CPU)"}
        lines = ["| name | time us (median) | target | met? | notes |", "| --- | ---: | --- | --- | --- |"]
        for r in self.rows:
            time_text = "-" if r["time_us"] is None else f"{r['time_us']:.1f}"
            lines.append(f"| {r['name']} | {time_text} | {r['target']} | {met_text[r['met']]} | {r['notes']} |")
        return "\n".join(lines)


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def attention_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within the bf16 tolerance everywhere, and four times closer on average."""
    close(actual, expected, ATTENTION_TOL)
    mean_error = (actual.float() - expected.float()).abs().mean().item()
    assert mean_error < ATTENTION_TOL / 4, f"mean abs error {mean_error:.3g}"


def equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert torch.equal(actual.cpu(), expected.cpu()), f"{what} differs"


# --------------------------------------------------------------------------- draft trees
def step_logits(batch: int, sizes: Sizes, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Random bf16 draft logits of the root step and of the ``depth`` later steps."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [
        (3 * torch.randn(batch, 1 if step == 0 else sizes.top_k, sizes.vocab, generator=gen,
                         device=device)).to(DTYPE)
        for step in range(sizes.depth + 1)
    ]


def root_frontier(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and pool index of the root, the first step's frontier."""
    return (torch.zeros(batch, 1, device=device),
            torch.full((batch, 1), -1, dtype=torch.int64, device=device))


def expand_all(logits, frontier, pool, top_k: int, backend: str):
    """The 1 + depth expansion steps of one tree into ``pool`` (every slot rewritten)."""
    scores, index = frontier
    offset = 0
    for step in logits:
        _, scores, index = mk.tree_expand(step, scores, index, *pool, offset, top_k, backend=backend)
        offset += step.shape[1] * top_k
    return pool


def check_expansion(report: Report, name: str, logits, frontier, pool, top_k: int) -> None:
    """Each compiled step against the reference step on the same inputs (as the CUDA tests:
    exact tokens and parents, scores within float32 rounding; the next frontier by score)."""
    scores, index = frontier
    offset = 0
    for step in logits:
        expected_pool = [t.clone() for t in pool]
        expected = mk.tree_expand(step, scores, index, *expected_pool, offset, top_k, backend="reference")
        _, scores, index = mk.tree_expand(step, scores, index, *pool, offset, top_k, backend="compiled")
        report.check(f"{name} tree_expand pool tokens", equal, pool[0], expected_pool[0], "tokens")
        report.check(f"{name} tree_expand pool parents", equal, pool[2], expected_pool[2], "parents")
        report.check(f"{name} tree_expand pool scores", close, pool[1], expected_pool[1], SCORE_TOL)
        report.check(f"{name} tree_expand frontier scores", close, scores, expected[1], SCORE_TOL)
        offset += step.shape[1] * top_k


def reference_tree(batch: int, sizes: Sizes, device: torch.device):
    """A real assembled draft tree ``(tokens, depth, parent, mask, first_child, next_sibling)``."""
    pool = mk.new_tree_pool(batch, sizes.top_k, sizes.depth, device=device)
    expand_all(step_logits(batch, sizes, device, seed=batch), root_frontier(batch, device), pool,
               sizes.top_k, "reference")
    root = torch.zeros(batch, dtype=torch.int64, device=device)
    return mk.tree_assemble(*pool, root, sizes.num_nodes, backend="reference")


# --------------------------------------------------------------------------- figures
def copy_bandwidth(report: Report, timer: Timer, sizes: Sizes, device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s, bytes read plus bytes written."""
    source = torch.randn(sizes.copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    time_us = timer(lambda: target.copy_(source))
    bandwidth = 2 * sizes.copy_bytes / time_us / 1e3
    report.row(f"copy {sizes.copy_bytes >> 20} MiB (bandwidth ceiling)", time_us,
               notes=f"{bandwidth:.0f} GB/s read+written", bandwidth_GBps=bandwidth)
    return bandwidth


def flash_attn_call(q, k_cache, v_cache):
    """flash_attn_with_kvcache over every cache row (no tree mask), or None if not installed."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    # flash-attn wants [B, S, H, D]; the layout change is made once, outside the timing.
    q_bshd, k_bshd, v_bshd = (t.transpose(1, 2).contiguous() for t in (q, k_cache, v_cache))
    lengths = torch.full((q.shape[0],), k_cache.shape[2], dtype=torch.int32, device=q.device)
    return lambda: flash_attn_with_kvcache(q_bshd, k_bshd, v_bshd, cache_seqlens=lengths).transpose(1, 2)


def attention(report: Report, timer: Timer, sizes: Sizes, device: torch.device, copy_GBps: float) -> None:
    flash_installed = True
    for batch in sizes.batches:
        tree_mask = reference_tree(batch, sizes, device)[3]
        for prefix in sizes.prefixes:
            flash_installed = attention_case(report, timer, sizes, tree_mask, prefix, copy_GBps)
    if not flash_installed:
        report.row("  flash_attn_with_kvcache", None, notes="not installed")


def attention_case(report: Report, timer: Timer, sizes: Sizes, tree_mask: torch.Tensor, prefix: int,
                   copy_GBps: float) -> bool:
    """One batch size and prefix length; returns whether flash-attn was measured too."""
    batch, num_new, _ = tree_mask.shape
    device = tree_mask.device
    total = prefix + num_new  # the caches hold exactly the rows every method reads
    gen = torch.Generator(device=device).manual_seed(prefix + batch)
    q, k_cache, v_cache = (
        (gain * torch.randn(batch, sizes.heads, rows, sizes.head_dim, generator=gen, device=device)).to(DTYPE)
        for gain, rows in ((QUERY_GAIN, num_new), (1.0, total), (1.0, total))
    )
    prefix_len = torch.full((batch,), prefix, dtype=torch.int32, device=device)
    dense = torch.ones(batch, 1, num_new, total, dtype=torch.bool, device=device)
    dense[:, 0, :, prefix:] = mk.unpack_mask(tree_mask, num_new)
    dense = dense.expand(batch, sizes.heads, num_new, total)
    calls = {
        "msd tree_attention": lambda: mk.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask,
                                                        backend="compiled"),
        "SDPA dense bool mask": lambda: F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=dense),
    }
    label = f"B={batch} prefix={prefix}"
    expected = mk.tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, backend="reference")
    for name, call in calls.items():
        report.check(f"{name} {label}", attention_close, call(), expected)
    flash = flash_attn_call(q, k_cache, v_cache)
    if flash is not None:
        everything = mk.pack_mask(torch.ones(batch, num_new, num_new, dtype=torch.bool, device=device))
        unmasked = mk.tree_attention(q, k_cache, v_cache, prefix_len, everything, backend="reference")
        report.check(f"flash_attn_with_kvcache {label}", attention_close, flash(), unmasked)
        calls["flash_attn_with_kvcache, no tree mask"] = flash

    times = {name: timer(call) for name, call in calls.items()}
    ours, sdpa = times.pop("msd tree_attention"), times["SDPA dense bool mask"]
    kv_bytes = 2 * batch * sizes.heads * total * sizes.head_dim * DTYPE.itemsize
    bandwidth = kv_bytes / ours / 1e3
    share = 100 * bandwidth / copy_GBps
    speedup = sdpa / ours
    at_target = prefix == max(sizes.prefixes)
    report.row(
        f"tree_attention {label}", ours,
        target=">= 2x SDPA, >= 50% HBM" if at_target else "-",
        met=(speedup >= 2 and share >= 50) if at_target else None,
        notes=f"{speedup:.2f}x SDPA; K/V {bandwidth:.0f} GB/s = {share:.0f}% of copy",
        speedup_vs_sdpa=speedup, kv_GBps=bandwidth, kv_pct_of_copy=share,
    )
    for name, time_us in times.items():
        report.row(f"  {name} {label}", time_us)
    return flash is not None


def tree_build(report: Report, timer: Timer, sizes: Sizes, device: torch.device) -> None:
    for batch in sizes.batches:
        tree_build_case(report, timer, sizes, device, batch)


def tree_build_case(report: Report, timer: Timer, sizes: Sizes, device: torch.device, batch: int) -> None:
    k, depth, num_nodes = sizes.top_k, sizes.depth, sizes.num_nodes
    logits = step_logits(batch, sizes, device, seed=100 + batch)
    frontier = root_frontier(batch, device)
    pool = mk.new_tree_pool(batch, k, depth, device=device)
    root = torch.arange(batch, device=device)

    check_expansion(report, f"B={batch}", logits, frontier, pool, k)
    expected = mk.tree_assemble(*pool, root, num_nodes, backend="reference")
    got = mk.tree_assemble(*pool, root, num_nodes, backend="compiled")
    for name, actual, wanted in zip(TREE_OUTPUTS, got, expected):
        report.check(f"B={batch} tree_assemble {name}", equal, actual, wanted, name)
    # The baseline builds the same tree (tokens, depths, ancestor masks); torch.topk may
    # break a score tie at the cut differently from the reference.
    for b, (tokens, depths, dense, _) in enumerate(eagle_style_assemble(*pool, root, num_nodes)):
        baseline = f"B={batch} released-style assembly row {b}"
        report.check(f"{baseline} tokens", equal, tokens, expected[0][b], "tokens")
        report.check(f"{baseline} depth", equal, depths, expected[1][b], "depth")
        report.check(f"{baseline} mask", equal, dense.bool(), mk.unpack_mask(expected[3][b], num_nodes + 1), "mask")

    def build():
        expand_all(logits, frontier, pool, k, "compiled")
        return mk.tree_assemble(*pool, root, num_nodes, backend="compiled")

    def released_build():
        expand_all(logits, frontier, pool, k, "reference")
        return eagle_style_assemble(*pool, root, num_nodes)

    eager, graph = timer(build), timer.graph(build)
    released = timer(released_build)
    assemble = timer(lambda: mk.tree_assemble(*pool, root, num_nodes, backend="compiled"))
    released_assemble = timer(lambda: eagle_style_assemble(*pool, root, num_nodes))
    with_target = batch == 1
    tree_target = "<= 30 us" if with_target else "-"
    label = f"tree build B={batch} ({1 + depth} expand + assemble, k={k} depth={depth} T={num_nodes} V={sizes.vocab})"
    report.row(f"{label}, eager", eager, tree_target, eager <= 30 if with_target else None,
               notes=f"{released / eager:.1f}x the released approach", speedup_vs_released=released / eager)
    report.row(f"{label}, graph replay", graph, tree_target,
               graph <= 30 if with_target and graph is not None else None,
               notes="-" if graph is None else f"{released / graph:.1f}x the released approach")
    report.row(f"  released approach B={batch} (torch-op expansion + Python assembly loop)", released,
               ">= 50x slower" if with_target else "-",
               released / eager >= 50 if with_target else None, notes="baseline, with host syncs")
    report.row(f"  tree_assemble alone B={batch}", assemble,
               notes=f"Python assembly loop {released_assemble:.0f} us = {released_assemble / assemble:.1f}x",
               released_assemble_us=released_assemble)


def compaction(report: Report, timer: Timer, sizes: Sizes, device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(7)
    shape = (sizes.planes, 1, sizes.heads, sizes.max_len, sizes.head_dim)
    cache = torch.randn(shape, generator=gen, device=device).to(DTYPE)
    accepted = torch.full((1, sizes.num_nodes + 1), -1, dtype=torch.int64, device=device)
    accepted[0, : len(ACCEPTED_PATH)] = torch.tensor(ACCEPTED_PATH)
    num_accepted = torch.tensor([len(ACCEPTED_PATH) - 1], device=device)
    prefix_len = torch.empty(1, dtype=torch.int32, device=device)

    def reset():
        prefix_len.fill_(sizes.compact_prefix)

    expected_cache, expected_prefix = cache.clone(), prefix_len.clone().fill_(sizes.compact_prefix)
    mk.kv_compact(expected_cache, accepted, num_accepted, expected_prefix, backend="reference")
    reset()
    mk.kv_compact(cache, accepted, num_accepted, prefix_len, backend="compiled")
    report.check("kv_compact cache", equal, cache, expected_cache, "kv_cache")
    report.check("kv_compact prefix_len", equal, prefix_len, expected_prefix, "prefix_len")
    del expected_cache

    def compact():
        mk.kv_compact(cache, accepted, num_accepted, prefix_len, backend="compiled")

    moved = 2 * sizes.planes * sizes.heads * len(ACCEPTED_PATH) * sizes.head_dim * DTYPE.itemsize
    label = (f"kv_compact {sizes.planes} planes B=1 H={sizes.heads} S_max={sizes.max_len} "
             f"prefix={sizes.compact_prefix}, {len(ACCEPTED_PATH) - 1} accepted")
    eager, graph = timer(compact, reset), timer.graph(compact, reset)
    report.row(f"{label}, eager", eager, "<= 15 us", eager <= 15,
               notes=f"{moved / 1e6:.1f} MB read+written")
    report.row(f"{label}, graph replay", graph, "<= 15 us", None if graph is None else graph <= 15)


def verification(report: Report, timer: Timer, sizes: Sizes, device: torch.device) -> None:
    for batch in sizes.batches:
        verification_case(report, timer, sizes, device, batch)


def verification_case(report: Report, timer: Timer, sizes: Sizes, device: torch.device, batch: int) -> None:
    rows = sizes.num_nodes + 1
    tokens, _, _, _, first_child, next_sibling = reference_tree(batch, sizes, device)
    gen = torch.Generator(device=device).manual_seed(batch)
    logits = torch.randn(batch, rows, sizes.vocab, generator=gen, device=device)
    # The target agrees with the draft along each tree's first-child chain: a real walk.
    for b, (row_tokens, children) in enumerate(zip(tokens.tolist(), first_child.tolist())):
        node = 0
        while children[node] != -1:
            logits[b, node, row_tokens[children[node]]] = 30.0
            node = children[node]
    args = (logits.to(DTYPE), tokens, first_child, next_sibling)
    expected = mk.verify_greedy(*args, backend="reference")
    got = mk.verify_greedy(*args, backend="compiled")
    for name, actual, wanted in zip(("accepted_index", "num_accepted", "bonus_token"), got, expected):
        report.check(f"verify_greedy B={batch} {name}", equal, actual, wanted, name)

    def verify():
        mk.verify_greedy(*args, backend="compiled")

    with_target = batch == 1
    target = "<= 20 us" if with_target else "-"
    label = f"verify_greedy B={batch} {rows} x {sizes.vocab}"
    eager, graph = timer(verify), timer.graph(verify)
    report.row(f"{label}, eager", eager, target, eager <= 20 if with_target else None,
               notes=f"accepted {expected[1].tolist()}")
    report.row(f"{label}, graph replay", graph, target,
               graph <= 20 if with_target and graph is not None else None)


# --------------------------------------------------------------------------- main
def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results (a .md table is written beside it)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (10 instead of 100)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = LLAVA_7B if on_gpu else TINY
    timer = Timer(device, reps=10 if args.quick else 100, warmup=3 if args.quick else 10)
    report = Report(on_gpu)
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"msd_kernels loaded from {mk.load_library()}; device {device_name}, torch {torch.__version__}",
          flush=True)
    if not on_gpu:
        torch.set_num_threads(1)  # steadier plumbing figures on a shared machine
        print("CPU DRY RUN: tiny sizes and the host clock; these figures are NOT the issue's targets.", flush=True)

    copy_GBps = copy_bandwidth(report, timer, sizes, device)
    print("... tree attention", flush=True)
    attention(report, timer, sizes, device, copy_GBps)
    for section in (tree_build, compaction, verification):
        print(f"... {section.__name__}", flush=True)
        section(report, timer, sizes, device)

    results = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_dry_run": not on_gpu,
        "sizes": dataclasses.asdict(sizes),
        "reps": timer.reps,
        "copy_bandwidth_GBps": copy_GBps,
        "rows": report.rows,
        "mismatches": report.mismatches,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = report.markdown()
    header = f"{device_name}, torch {torch.__version__}, commit {results['commit']}, {results['date']}"
    if not on_gpu:
        header += " - CPU DRY RUN, tiny sizes: not the issue's targets"
    args.out.with_suffix(".md").write_text(f"{header}\n\n{table}\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}\n{header}\n\n{table}")
    if report.mismatches:
        print(f"\n!!!!! {len(report.mismatches)} MISMATCHES vs the reference (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
