"""End-to-end decoding speed: SpeculativeLLaVA vs ``target.generate`` vs Hugging Face
assisted generation, on the same target, the same prompts, in one run.

Two modes:

* ``compare`` (default): for each prompt, greedy ``target.generate`` (the baseline),
  ``SpeculativeLLaVA.generate`` (its output must equal the baseline token for token; a
  mismatch is reported, never hidden, and makes the exit status 1) and
  ``target.generate(assistant_model=...)`` with a smaller LLaVA sharing the vocabulary.
* ``controlled``: the draft's proposals are the target's own greedy continuation,
  corrupted at a rate chosen for each requested acceptance length tau
  (``msd.testing.ControlledProposals``), so speedup against tau shows what the engine
  costs apart from draft quality. The draft head still runs; the controlled proposer's own
  (host-side) time is measured and also reported subtracted.

Models are built from configs with random weights (``--preset``), so no download is
needed; ``--draft`` loads a trained draft head instead of a random one. Results go to
``--out`` (JSON) and next to it as a markdown table, which is also printed.

    python benchmarks/e2e.py --preset tiny --device cpu --out /tmp/e2e.json
    python benchmarks/e2e.py --preset llava-1.5-7b --dtype bfloat16 --device cuda --mode controlled
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import msd
from msd.testing import ControlledProposals, random_draft

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Shape:
    """A LLaVA-1.5 target: Llama text model + CLIP vision tower + 2-layer MLP projector."""

    hidden: int
    heads: int
    layers: int
    intermediate: int
    vocab: int
    image_token: int
    vision_hidden: int
    vision_heads: int
    vision_layers: int
    vision_intermediate: int
    image_size: int
    patch: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


# CLIP ViT-L/14-336: 576 visual tokens. The vocabulary is llava-hf's (32000 Llama ids plus
# <image> = 32000 and padding to 32064): Hugging Face's LLaVA needs the image id in it.
_CLIP_L_336 = {"vision_hidden": 1024, "vision_heads": 16, "vision_layers": 24, "vision_intermediate": 4096,
               "image_size": 336, "patch": 14}
PRESETS = {
    "tiny": Shape(hidden=128, heads=4, layers=2, intermediate=256, vocab=512, image_token=511, vision_hidden=32,
                  vision_heads=2, vision_layers=2, vision_intermediate=64, image_size=16, patch=4),
    "llava-1.5-7b": Shape(hidden=4096, heads=32, layers=32, intermediate=11008, vocab=32064, image_token=32000,
                          **_CLIP_L_336),
    "llava-1.5-13b": Shape(hidden=5120, heads=40, layers=40, intermediate=13824, vocab=32064, image_token=32000,
                           **_CLIP_L_336),
}
BASELINE = "target.generate"
TREES = {"default": (10, 5, 60), "small": (4, 3, 12), "chain": (1, 4, 6)}  # (top_k, depth, total_tokens)


# ----------------------------------------------------------------------------- models
def llava_config(shape: Shape) -> LlavaConfig:
    """A LLaVA-1.5 config (projector, feature layer and selection as llava-hf's) of ``shape``."""
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=4096, rms_norm_eps=1e-5,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch, hidden_act="quick_gelu",
    )
    return LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=shape.image_token,
        image_seq_length=shape.image_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def assistant_shape(target: Shape, layers: int, hidden: int | None) -> Shape:
    """A smaller text model (same head size and MLP ratio, same vocabulary and vision tower)."""
    hidden = hidden or target.hidden
    head_dim = target.hidden // target.heads
    if hidden % head_dim:
        raise ValueError(f"--assistant-hidden must be a multiple of the head size {head_dim}, got {hidden}")
    return dataclasses.replace(target, hidden=hidden, heads=hidden // head_dim, layers=layers,
                               intermediate=target.intermediate * hidden // target.hidden)


def random_llava(shape: Shape, dtype: torch.dtype, device: str, seed: int) -> LlavaForConditionalGeneration:
    """Random weights, initialised directly on ``device`` in ``dtype`` (a 7B model never sits
    in float32 on the host)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_config(shape), dtype=dtype)
    # Random models have no end of sequence: every method generates exactly max_new_tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def synthetic_prompts(shape: Shape, count: int, text_tokens: int, dtype: torch.dtype, device: str,
                      seed: int) -> list[dict]:
    """``count`` prompts: BOS, text, one image, text (random ids that are not the image id)."""
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(3, shape.image_token, (n,), generator=gen).tolist()
    prompts = []
    for _ in range(count):
        before, after = words(text_tokens // 2), words(text_tokens - text_tokens // 2)
        ids = [1] + before + [shape.image_token] * shape.image_tokens + after
        pixels = torch.randn(1, 3, shape.image_size, shape.image_size, generator=gen)
        prompts.append({"input_ids": torch.tensor([ids], device=device),
                        "pixel_values": pixels.to(device=device, dtype=dtype)})
    return prompts


# ----------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Run:
    """One timed generation."""

    tokens: list[int]
    seconds: float
    new_tokens: int
    tau: float
    peak_mib: float | None  # CUDA only: peak allocated during the call (weights included)
    peak_over_start_mib: float | None  # the same minus what was allocated when the call began


def timed(generate: Callable[[], torch.Tensor], device: torch.device, prompt_len: int,
          tau: Callable[[int], float]) -> Run:
    """Run ``generate`` once between device synchronizations; ``tau(new_tokens)`` after it."""
    start_mib = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_mib = torch.cuda.memory_allocated(device) / MIB
    synchronize(device)
    started = time.perf_counter()
    output = generate()
    synchronize(device)
    seconds = time.perf_counter() - started
    new_tokens = output.shape[1] - prompt_len
    peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    return Run(output[0].tolist(), seconds, new_tokens, tau(new_tokens), peak,
               None if peak is None else peak - start_mib)


@contextlib.contextmanager
def counting_forwards(model: torch.nn.Module):
    """Count ``model``'s forward calls (target forwards per generated token: HF's tau)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def hf_generate(target, prompt: dict, device: torch.device, max_new: int, **extra) -> Run:
    """Greedy ``target.generate``; tau = new tokens per target forward."""
    with counting_forwards(target) as calls:
        return timed(lambda: target.generate(**prompt, do_sample=False, max_new_tokens=max_new, **extra),
                     device, prompt["input_ids"].shape[1], lambda new: new / calls[0])


def engine_generate(engine: msd.SpeculativeLLaVA, prompt: dict, device: torch.device, max_new: int) -> Run:
    """``SpeculativeLLaVA.generate``; tau from its statistics (prefill token excluded)."""
    return timed(lambda: engine.generate(**prompt, do_sample=False, max_new_tokens=max_new), device,
                 prompt["input_ids"].shape[1], lambda _: engine.last_stats.tau)


def expected_tau(corruption: float, max_path: int) -> float:
    """Mean tokens per step when each of up to ``max_path`` draft tokens survives with
    probability ``1 - corruption`` given its parent did, plus the bonus token."""
    keep = 1.0 - corruption
    return 1.0 + sum(keep**d for d in range(1, max_path + 1))


def corruption_for_tau(tau: float, max_path: int) -> float:
    """Invert :func:`expected_tau` by bisection (it decreases with the corruption)."""
    if not 1.0 <= tau <= max_path + 1:
        raise ValueError(f"tau {tau} is out of reach: a tree of depth {max_path - 1} gives 1 to {max_path + 1}")
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tau(mid, max_path) >= tau else (low, mid)
    return high


def run_record(run: Run, baseline: Run) -> dict:
    """A run's figures for the JSON, and where its tokens first differ from the baseline's
    (``first_mismatch``: a position in prompt + new tokens; None when they are equal)."""
    mismatch = None
    if run.tokens != baseline.tokens:
        pairs = enumerate(zip(run.tokens, baseline.tokens))
        mismatch = next((i for i, (a, b) in pairs if a != b), min(len(run.tokens), len(baseline.tokens)))
    record = {k: v for k, v in dataclasses.asdict(run).items() if k != "tokens"}
    return {**record, "first_mismatch": mismatch, "matches_target": mismatch is None}


# ----------------------------------------------------------------------------- modes
def summarize(runs: dict[str, list[Run]], details: list[dict]) -> list[dict]:
    """One row per method, aggregated over prompts: tokens/s over all tokens, tau averaged
    over prompts, speedup against ``target.generate``'s total time, peak memory's maximum."""
    baseline_seconds = sum(r.seconds for r in runs[BASELINE])
    summary = []
    for name, method_runs in runs.items():
        seconds, tokens = sum(r.seconds for r in method_runs), sum(r.new_tokens for r in method_runs)
        peaks = [r.peak_mib for r in method_runs if r.peak_mib is not None]
        overs = [r.peak_over_start_mib for r in method_runs if r.peak_over_start_mib is not None]
        summary.append({
            "method": name, "new_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "tau": sum(r.tau for r in method_runs) / len(method_runs), "speedup": baseline_seconds / seconds,
            "peak_memory_mib": max(peaks) if peaks else None, "peak_over_start_mib": max(overs) if overs else None,
            "matches_target": all(d["methods"][name]["matches_target"] for d in details),
        })
    return summary


def run_compare(args, target, draft, assistant, prompts, device) -> tuple[list[dict], list[dict]]:
    """Baseline, engine and (with an assistant) HF assisted generation on every prompt."""
    engine = msd.SpeculativeLLaVA(target, draft, top_k=args.top_k, depth=args.depth, total_tokens=args.total_tokens)
    methods = {
        BASELINE: lambda p: hf_generate(target, p, device, args.max_new_tokens),
        "SpeculativeLLaVA": lambda p: engine_generate(engine, p, device, args.max_new_tokens),
    }
    if assistant is not None:
        methods["HF assisted"] = lambda p: hf_generate(target, p, device, args.max_new_tokens,
                                                       assistant_model=assistant)
    for _ in range(args.warmup):
        for method in methods.values():
            method(prompts[0])
    runs: dict[str, list[Run]] = {name: [] for name in methods}
    details = []
    for index, prompt in enumerate(prompts):
        # Methods take turns on each prompt, so that drifting machine load biases none.
        row = {"prompt": index, "prompt_tokens": prompt["input_ids"].shape[1], "methods": {}}
        for name, method in methods.items():
            runs[name].append(method(prompt))
            row["methods"][name] = run_record(runs[name][-1], runs[BASELINE][-1])
        details.append(row)
    return summarize(runs, details), details


def run_controlled(args, target, draft, prompts, device) -> tuple[list[dict], list[dict]]:
    """Baseline, then the engine with controlled proposals at each ``--taus`` value, on every prompt."""
    levels = {f"SpeculativeLLaVA tau~{tau:g}": (tau, corruption_for_tau(tau, args.depth + 1)) for tau in args.taus}

    def controlled(prompt: dict, reference: Run, corruption: float, seed: int) -> tuple[Run, float]:
        proposer = ControlledProposals(reference.tokens, corruption, seed)
        engine = msd.SpeculativeLLaVA(target, draft, top_k=args.top_k, depth=args.depth,
                                      total_tokens=args.total_tokens, proposer=proposer)
        return engine_generate(engine, prompt, device, args.max_new_tokens), proposer.seconds

    for _ in range(args.warmup):
        controlled(prompts[0], hf_generate(target, prompts[0], device, args.max_new_tokens), 0.0, 0)
    runs: dict[str, list[Run]] = {BASELINE: [], **{name: [] for name in levels}}
    hook_seconds = dict.fromkeys(runs, 0.0)
    details = []
    for index, prompt in enumerate(prompts):
        reference = hf_generate(target, prompt, device, args.max_new_tokens)
        runs[BASELINE].append(reference)
        row = {"prompt": index, "prompt_tokens": prompt["input_ids"].shape[1],
               "methods": {BASELINE: run_record(reference, reference)}}
        for name, (_, corruption) in levels.items():
            run, seconds = controlled(prompt, reference, corruption, index)
            runs[name].append(run)
            hook_seconds[name] += seconds
            row["methods"][name] = {**run_record(run, reference), "corruption": corruption, "hook_seconds": seconds}
        details.append(row)
    summary = summarize(runs, details)
    baseline_seconds = summary[0]["seconds"]
    for entry in summary:
        target_tau, corruption = levels.get(entry["method"], (1.0, None))
        hook = hook_seconds[entry["method"]]
        entry.update(target_tau=target_tau, corruption=corruption, hook_seconds=hook,
                     speedup_without_hook=baseline_seconds / (entry["seconds"] - hook))
    return summary, details


# ----------------------------------------------------------------------------- reporting
def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (Linux) / architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu " + line.split(":", 1)[1].strip()
    return "cpu " + platform.machine()


def machine_info(device: torch.device) -> dict:
    return {
        "device": device_name(device), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
    }


def default_out(device: torch.device, mode: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    return RESULTS_DIR / f"{datetime.date.today().isoformat()}-{slug}-{git_commit() or 'nocommit'}-{mode}.json"


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The summary as a markdown table, with the run's context above it."""
    machine, settings = result["machine"], result["settings"]
    lines = [
        f"### e2e {settings['mode']}: {settings['preset']} ({settings['dtype']}) on {machine['device']}",
        "",
        (f"commit {result['commit']}, {result['date']}, torch {machine['torch']}, transformers "
         f"{machine['transformers']}; {settings['prompts']} prompts x {settings['max_new_tokens']} new tokens, "
         f"tree top_k={settings['top_k']} depth={settings['depth']} total_tokens={settings['total_tokens']}"),
        "",
    ]
    controlled = settings["mode"] == "controlled"
    header = ["method", "tau", "tokens/s", "speedup", "peak MiB", "peak over start MiB", "lossless"]
    if controlled:
        header[1:1] = ["target tau", "corruption"]
        header[-1:-1] = ["hook s", "speedup w/o hook"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["summary"]:
        cells = [row["method"], f"{row['tau']:.2f}", f"{row['tokens_per_second']:.1f}", f"{row['speedup']:.2f}x",
                 _fmt(row["peak_memory_mib"], ".0f"), _fmt(row["peak_over_start_mib"], ".0f"),
                 "yes" if row["matches_target"] else "**NO: MISMATCH**"]
        if controlled:
            cells[1:1] = [f"{row['target_tau']:g}", _fmt(row["corruption"], ".3f")]
            cells[-1:-1] = [f"{row['hook_seconds']:.3f}", f"{row['speedup_without_hook']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    ("tau: SpeculativeLLaVA's tokens per verification forward (accepted + bonus, the prefill's token aside); "
     "for Hugging Face methods, new tokens per target forward."),
    "speedup: baseline (greedy target.generate) seconds over the method's, same prompts, same run.",
    ("lossless: the method's tokens equal target.generate's, token for token, on every prompt (a "
     "SpeculativeLLaVA mismatch also makes the script exit with status 1)."),
]
CPU_MEMORY_NOTE = ("peak memory is only measured on CUDA (torch.cuda.max_memory_allocated, all resident models "
                   "included); on CPU, process_max_rss_mib is the whole process's lifetime high-water mark.")
RANDOM_NOTE = ("random weights (target, draft, assistant): the timings are what models of these shapes cost; "
               "a random draft's acceptance says nothing about a trained one's.")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--mode", choices=["compare", "controlled"], default="compare")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="target shape (random weights)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--draft", type=Path, help="trained MSD draft checkpoint (none: a random draft head)")
    parser.add_argument("--assistant-layers", type=int, default=2,
                        help="HF assisted generation: the assistant LLaVA's text layers (0: skip that method)")
    parser.add_argument("--assistant-hidden", type=int, help="the assistant's width (none: the target's)")
    parser.add_argument("--tree", choices=sorted(TREES), default="default", help="draft tree (top_k, depth, tokens)")
    parser.add_argument("--prompts", type=int, default=4, help="synthetic prompts, one image each")
    parser.add_argument("--text-tokens", type=int, default=32, help="text tokens per prompt around the image")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each method on the first prompt")
    parser.add_argument("--taus", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6],
                        help="controlled mode: acceptance lengths to aim for (sets the corruption rates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path; the .md goes next to it "
                        "(none: benchmarks/results/<date>-<device>-<commit>-<mode>.json)")
    args = parser.parse_args(argv)
    args.top_k, args.depth, args.total_tokens = TREES[args.tree]
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, write ``--out`` (.json and .md), print the table; returns the result."""
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = PRESETS[args.preset]
    target = random_llava(shape, dtype, args.device, args.seed)
    draft = msd.load_draft(args.draft, target=target) if args.draft else random_draft(target, args.seed)
    prompts = synthetic_prompts(shape, args.prompts, args.text_tokens, dtype, args.device, args.seed)
    if args.mode == "compare":
        assistant = (random_llava(assistant_shape(shape, args.assistant_layers, args.assistant_hidden), dtype,
                                  args.device, args.seed + 1) if args.assistant_layers else None)
        summary, details = run_compare(args, target, draft, assistant, prompts, device)
    else:
        summary, details = run_controlled(args, target, draft, prompts, device)

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    notes = NOTES + ([] if device.type == "cuda" else [CPU_MEMORY_NOTE]) + ([] if args.draft else [RANDOM_NOTE])
    result = {
        "benchmark": "e2e", "date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": machine_info(device), "settings": settings,
        "lossless": all(r["matches_target"] for r in summary if r["method"].startswith("SpeculativeLLaVA")),
        "summary": summary, "prompts": details, "notes": notes,
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
    }
    out = args.out or default_out(device, args.mode)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if not result["lossless"]:
        print("MISMATCH: SpeculativeLLaVA's greedy output differs from target.generate (see 'first_mismatch')",
              file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["lossless"] else 1)
