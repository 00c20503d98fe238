"""``SpeculativeLLaVA``: MSD speculative decoding as a drop-in ``generate()``.

One step (MSD_SPEC.md 3): the draft grows a tree under the last emitted token, the target
scores the whole tree in one forward pass (msd's tree attention over a static cache),
the verifier keeps the longest agreeing path plus a bonus token, and both caches keep
only what was accepted. Greedy output equals ``target.generate(do_sample=False)``;
sampling draws from the same distribution as ``target.generate(do_sample=True)``.

The data path: the target adapter (:mod:`msd.targets`) builds the prompts' text-model inputs
with the target's own multimodal forward; the decoder (:mod:`msd.decoder`) runs the text
model; the drafter (:mod:`msd.tree_draft`) grows the tree; the verifier
(:mod:`msd.verifier`) accepts. After an eager prefill, decoding runs one fixed-shape device
step at a time (:mod:`msd.step`) over the batch; the host reads one small result per step (a
step behind on a GPU, so that the device never waits for it) to emit tokens and stop
sequences. Finished sequences are frozen; once the running ones fit in half the batch, they
are packed into the first rows of the same buffers and the step runs on that smaller batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedModel, StopStringCriteria

import msd_kernels
from msd.cache import StaticKVCache
from msd.draft_checkpoint import check_fits_target, load_draft
from msd.draft_kinds import DRAFT_KINDS, DraftModel
from msd.generation_options import resolve_generation_config
from msd.proposers import Proposer
from msd.step import DecodeStep, StepState
from msd.targets import adapter_for
from msd.tree_draft import TreeDrafter
from msd.verifier import Verifier

# Cache lengths are rounded up to this, so that calls of similar lengths reuse the buffers.
LENGTH_QUANTUM = 256


@dataclass
class GenerationStats:
    """Statistics of the last ``generate`` call."""

    new_tokens: int = 0  # over all sequences
    seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted, per step and running sequence
    sequences: int = 1
    steps: int = 0  # target verification forwards
    batch_per_step: list[int] = field(default_factory=list)  # the batch each step ran on

    @property
    def tau(self) -> float:
        """Mean tokens a sequence gains per verification forward (accepted + bonus), the
        prefill's token aside."""
        return (self.new_tokens - self.sequences) / len(self.accepted) if self.accepted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@dataclass
class _Buffers:
    """Everything a decoding step touches, allocated once per (batch, cache length)."""

    target_cache: StaticKVCache
    drafter: TreeDrafter
    state: StepState
    steps: dict = field(default_factory=dict)  # the step (eager, compiled or graphed) by generation options
    packed: dict = field(default_factory=dict)  # batch -> the _Buffers of the first `batch` sequences (views)


class _Sequence:
    """The host's view of one sequence: its tokens and why it stopped."""

    def __init__(self, prompt: list[int], max_new: int, eos: set[int], stop_strings, streamer):
        self.tokens, self.prompt_len = list(prompt), len(prompt)
        self.max_new, self.eos, self.stop_strings, self.streamer = max_new, eos, stop_strings, streamer
        self.done = False

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    def emit(self, tokens: list[int]) -> None:
        """Append tokens one by one until a stop condition (EOS, max_new_tokens, a stop string)."""
        for token in tokens:
            self.tokens.append(token)
            if self.streamer is not None:
                self.streamer.put(torch.tensor([token]))
            if token in self.eos or len(self.tokens) - self.prompt_len >= self.max_new or self._stop_string():
                self.done = True
                return

    def _stop_string(self) -> bool:
        return self.stop_strings is not None and bool(self.stop_strings(torch.tensor([self.tokens]), None)[0])


class SpeculativeLLaVA:
    """A vision-language target with an MSD draft head.

    msd runs the target's text model itself (:mod:`msd.decoder`, the target's own modules),
    after the target's own multimodal forward has built the prompt's text-model inputs
    (:mod:`msd.targets`). The path of one step: adapter -> decoder -> drafter -> verifier.

    Args:
        target: a model of a supported family (:data:`msd.targets.ADAPTERS`): LLaVA-1.5,
            LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL.
        draft: the MSD draft head, on the target's device.
        top_k: children per node and frontier width of the draft tree (default 10).
        depth: expansion steps (default 5; paths of up to ``depth + 1`` draft tokens).
        total_tokens: tree tokens verified per step, root included (default 60).
        proposer: what turns the draft's hidden states into the logits a tree grows from
            (default: the draft head's own; see :mod:`msd.proposers`).
        cuda_graph: on a GPU, capture the decoding step in a CUDA graph once per batch size,
            cache length and sampling options, and replay it (the prefill stays eager). The
            proposer must then run on the device alone (the default one does).
        compile_backend: ``torch.compile`` the decoding step with ``fullgraph=True`` and this
            backend (e.g. ``"inductor"``); None (the default) runs it eagerly.
    """

    def __init__(self, target: PreTrainedModel, draft: DraftModel, *, top_k: int = 10, depth: int = 5,
                 total_tokens: int = 60, proposer: Proposer | None = None, cuda_graph: bool = False,
                 compile_backend: str | None = None):
        if not 1 <= top_k <= msd_kernels.MAX_TOP_K:
            raise ValueError(f"top_k must be in [1, {msd_kernels.MAX_TOP_K}], got {top_k}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        pool = msd_kernels.pool_size(top_k, depth)
        if not 2 <= total_tokens <= min(pool + 1, msd_kernels.MAX_TREE_TOKENS):
            raise ValueError(f"total_tokens must be in [2, {min(pool + 1, msd_kernels.MAX_TREE_TOKENS)}] "
                             f"for top_k={top_k}, depth={depth}; got {total_tokens}")
        self.adapter = adapter_for(target)
        embeddings = self.adapter.embed_tokens.weight
        check_fits_target(draft.config, embeddings.shape[1], embeddings.shape[0])
        if cuda_graph and embeddings.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the target on a CUDA device, it is on {embeddings.device}")
        self.target, self.draft = target.eval(), draft.eval()
        if self.draft.lm_head is None:  # an MSD draft proposes with the target's own head
            self.draft.set_lm_head(self.adapter.lm_head)
        # Which target states make the draft's features (None: the last, post-norm).
        self.feature_layers = draft.feature_layers(len(self.adapter.decoder.layers))
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.proposer, self.cuda_graph, self.compile_backend = proposer, cuda_graph, compile_backend
        self._last_step = None  # the step of the last generate call (tests run it on its own)
        self.last_stats = GenerationStats()
        self._buffers: _Buffers | None = None

    @classmethod
    def from_pretrained(cls, target: str | Path | PreTrainedModel, draft: str | Path | DraftModel, *,
                        top_k: int = 10, depth: int = 5, total_tokens: int = 60, cuda_graph: bool = False,
                        device: str | torch.device | None = None, **target_kwargs):
        """Load the target (path or Hub id, ``from_pretrained`` keyword arguments such as
        ``dtype`` or ``device_map`` pass through) and the draft checkpoint (onto the target's
        device). ``device`` moves the target there after loading, which, unlike
        ``device_map``, needs no ``accelerate``."""
        if not isinstance(target, PreTrainedModel):
            target = AutoModelForImageTextToText.from_pretrained(target, **target_kwargs)
        if device is not None:
            target = target.to(device)
        if not isinstance(draft, DRAFT_KINDS):
            draft = load_draft(draft, target=target)
        return cls(target, draft, top_k=top_k, depth=depth, total_tokens=total_tokens, cuda_graph=cuda_graph)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        tokenizer=None,
        **kwargs,
    ) -> torch.Tensor:
        """Same inputs and output as the target's ``generate``: ``[B, prompt + new]``.

        ``input_ids`` ``[B, L]``: one prompt per row, left-padded (``attention_mask``) as
        processors pad for generation. Keyword arguments are the target's multimodal inputs
        (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ...: whatever its forward takes)
        and generation options (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``eos_token_id``, ``pad_token_id``, ``stop_strings``, ...), merged with
        ``generation_config`` and the target's own as ``generate`` merges them; an unknown one
        is a ``TypeError``. ``stop_strings`` needs ``tokenizer``; a streamer needs batch 1.
        Every row stops on its own; rows that stop early are padded with ``pad_token_id``, as
        ``generate`` pads them. Statistics land in :attr:`last_stats`.
        """
        started = time.perf_counter()
        model_inputs = {name: kwargs.pop(name) for name in self.adapter.input_names if name in kwargs}
        config = resolve_generation_config(self.target.generation_config, generation_config, kwargs)
        lengths = self._check_inputs(input_ids, attention_mask, model_inputs, streamer)
        batch, padded_len = input_ids.shape
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - padded_len
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        self.adapter.check_length(max(lengths), max_new)
        eos = _token_set(config.eos_token_id)
        if config.stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= (as in target.generate)")
        stop_strings = StopStringCriteria(tokenizer, config.stop_strings) if config.stop_strings else None
        pad = config.pad_token_id if config.pad_token_id is not None else next(iter(sorted(eos)), None)
        verifier = Verifier(config)

        buffers = self._buffers_for(batch, max(lengths) + max_new)
        sequences = [_Sequence(input_ids[row, padded_len - length:].tolist(), max_new, eos, stop_strings, streamer)
                     for row, length in enumerate(lengths)]
        if streamer is not None:
            streamer.put(input_ids.cpu())
        self._prefill(buffers, verifier, input_ids, attention_mask, model_inputs, sequences)
        stats = GenerationStats(sequences=batch)
        self._decode(buffers, verifier, config, sequences, stats)
        if streamer is not None:
            streamer.end()

        width = max(len(sequence.new_tokens) for sequence in sequences)
        if pad is None and any(len(sequence.new_tokens) < width for sequence in sequences):
            raise ValueError("rows stopped at different lengths but there is no pad_token_id (nor eos_token_id) "
                             "to pad them with: pass pad_token_id")
        output = input_ids.new_full((batch, padded_len + width), pad if pad is not None else 0)
        output[:, :padded_len] = input_ids
        for row, sequence in enumerate(sequences):
            output[row, padded_len:padded_len + len(sequence.new_tokens)] = torch.tensor(sequence.new_tokens)
        stats.new_tokens = sum(len(sequence.new_tokens) for sequence in sequences)
        stats.seconds = time.perf_counter() - started
        self.last_stats = stats
        return output

    # ------------------------------------------------------------------ inputs and buffers
    def _check_inputs(self, input_ids, attention_mask, model_inputs: dict, streamer) -> list[int]:
        """Validate the inputs; returns each prompt's length without its padding."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids must be a [batch, length] tensor")
        batch, length = input_ids.shape
        if streamer is not None and batch > 1:
            raise ValueError(f"a streamer takes one sequence; input_ids has a batch of {batch}")
        device = self.adapter.device
        for name, tensor in {"input_ids": input_ids, "attention_mask": attention_mask, **model_inputs}.items():
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but the target is on {device}: "
                                 "move the inputs there first (e.g. inputs.to(target.device))")
        self.adapter.check_visual_inputs(input_ids, model_inputs)
        if attention_mask is None:
            return [length] * batch
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        # Left padding: each row's real tokens are its last ones.
        expected = torch.arange(length, device=mask.device) >= (length - lengths).unsqueeze(1)
        if not torch.equal(mask, expected):
            raise ValueError("attention_mask: prompts must be left-padded (tokenizer padding_side='left'), "
                             "as for generation")
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask: every prompt needs at least one token")
        return lengths.tolist()

    def _buffers_for(self, batch: int, sequence_len: int) -> _Buffers:
        """The step's buffers for ``batch`` sequences of up to ``sequence_len`` tokens: the
        previous call's when they fit (same batch, long enough), else new ones."""
        width = self.depth + 2
        # A step past a sequence's end can add `width` rows before the host freezes it (one more
        # with the GPU's look-ahead), and a verification writes the tree after the prefix.
        needed = sequence_len + 2 * width + self.total_tokens
        buffers = self._buffers
        if buffers is not None and buffers.state.root.shape[0] == batch and buffers.target_cache.max_len >= needed:
            return buffers
        max_len = -(-needed // LENGTH_QUANTUM) * LENGTH_QUANTUM
        target_cache = self.adapter.new_cache(batch, max_len)
        draft_cache = StaticKVCache(1, batch, self.draft.config.num_key_value_heads,
                                    max_len + self.depth * self.top_k, self.draft.head_dim, self.draft.fc.weight.dtype,
                                    self.adapter.device)
        drafter = TreeDrafter(self.draft, draft_cache, self.top_k, self.depth, self.total_tokens - 1, self.proposer)
        state = StepState.empty(batch, width, self.draft.feature_size, self.adapter.dtype, self.adapter.device,
                                self.adapter.rope_axes)
        self._buffers = _Buffers(target_cache, drafter, state)
        return self._buffers

    # ------------------------------------------------------------------ prefill and decoding
    def _prefill(self, buffers: _Buffers, verifier: Verifier, input_ids, attention_mask, model_inputs,
                 sequences: list[_Sequence]) -> None:
        """The prompts through the target (each without its padding) and the draft; the first
        new token of each."""
        adapter, state, drafter = self.adapter, buffers.state, buffers.drafter
        buffers.target_cache.reset()
        drafter.cache.reset()
        rows = adapter.prompt_rows(input_ids, attention_mask, **model_inputs)
        first_tokens = []
        for row, (prompt, sequence) in enumerate(zip(rows, sequences)):
            cache = buffers.target_cache.row(row)
            hidden, features = adapter.decoder.run(prompt.embeds, prompt.position_ids, cache,
                                                   capture=self.feature_layers)
            cache.advance(prompt.embeds.shape[1])
            first = verifier.first_token(adapter.lm_head(hidden[:, -1]))  # [1]
            prompt_ids = input_ids[row:row + 1, input_ids.shape[1] - len(sequence.tokens):]
            drafter.commit_prompt(row, prompt_ids, first, features, prompt.embeds, adapter.visual_mask(prompt_ids))
            state.rope_delta[..., row] = prompt.rope_delta[..., 0]
            first_tokens.append(first)
        state.root.copy_(torch.cat(first_tokens))
        state.commit_count.zero_()
        state.active.fill_(True)
        state.rng_state.copy_(torch.tensor([int(torch.randint(0, 2**62, ())), 0]))
        for sequence, token in zip(sequences, state.root.tolist()):
            sequence.emit([token])

    def _decode(self, buffers: _Buffers, verifier: Verifier, config: GenerationConfig,
                sequences: list[_Sequence], stats: GenerationStats) -> None:
        """Steps until every sequence has stopped. On a GPU the next step is queued before the
        host reads the last one's result, so the device never waits for the host; a sequence
        that stopped is then frozen from the step after. Once the running sequences fit in half
        the step's batch, they are packed to the front and the step runs on them alone: at most
        log2(batch) repacks and step shapes (compilations, CUDA graphs) per call."""
        look_ahead = self.adapter.device.type == "cuda"
        rows = list(range(len(sequences)))  # the sequence in each row of the step's batch
        current = buffers
        buffers.drafter.proposer.select_rows(rows)
        step = self._step(current, verifier, config)
        self._freeze_stopped(current.state, [sequences[row] for row in rows])

        def launch() -> tuple[torch.Tensor, torch.cuda.Event | None]:
            """Queue a step and the copy of its result to the host."""
            tokens, count = step()
            stats.steps += 1
            stats.batch_per_step.append(len(rows))
            result = torch.cat([count.unsqueeze(1), tokens], 1).to("cpu", non_blocking=look_ahead)
            if not look_ahead:
                return result, None
            copied = torch.cuda.Event()
            copied.record()
            return result, copied

        def take(launched: tuple[torch.Tensor, torch.cuda.Event | None]) -> list[int]:
            """Emit a step's tokens; the rows whose sequences still run."""
            result, copied = launched
            if copied is not None:
                copied.synchronize()
            for row, (count, *tokens) in zip(rows, result.tolist()):
                if not sequences[row].done and count:
                    stats.accepted.append(count - 1)
                    sequences[row].emit(tokens[:count])
            return [index for index, row in enumerate(rows) if not sequences[row].done]

        pending = launch() if not all(sequence.done for sequence in sequences) else None
        while pending is not None:
            queued = launch() if look_ahead else None
            live = take(pending)
            if live and len(live) <= len(rows) // 2:
                if queued is not None:  # it ran on the old batch: its tokens first
                    live, queued = take(queued), None
                if live:
                    current = self._repack(buffers, len(rows), live)
                    rows = [rows[index] for index in live]
                    buffers.drafter.proposer.select_rows(rows)
                    step = self._step(current, verifier, config)
            if not live:
                break
            self._freeze_stopped(current.state, [sequences[row] for row in rows])
            pending = queued if queued is not None else launch()

    def _repack(self, buffers: _Buffers, batch: int, keep: list[int]) -> _Buffers:
        """Move the sequences in rows ``keep`` (ascending) of the first ``batch`` to the front;
        the buffers of those ``len(keep)`` sequences (views of ``buffers``', made once)."""
        buffers.target_cache.repack(batch, keep)
        buffers.drafter.repack(batch, keep)
        buffers.state.repack(keep)
        rows = len(keep)
        if rows not in buffers.packed:
            buffers.packed[rows] = _Buffers(buffers.target_cache.packed(rows), buffers.drafter.packed(rows),
                                            buffers.state.packed(rows))
        return buffers.packed[rows]

    @staticmethod
    def _freeze_stopped(state: StepState, sequences: list[_Sequence]) -> None:
        state.active.copy_(torch.tensor([not sequence.done for sequence in sequences]), non_blocking=True)

    def _step(self, buffers: _Buffers, verifier: Verifier, config: GenerationConfig):
        """The decoding step over ``buffers`` under the options the step's kernels bake in: eager,
        compiled (``compile_backend``) or a captured CUDA graph (``cuda_graph``); made once per
        set of options and kept with the buffers."""
        key = (config.do_sample, config.temperature, config.top_k, config.top_p)
        if key not in buffers.steps:
            step = DecodeStep(self.adapter, buffers.drafter, buffers.target_cache, buffers.state, verifier,
                              self.feature_layers)
            if self.compile_backend is not None:
                step = torch.compile(step, fullgraph=True, dynamic=False, backend=self.compile_backend)
            if self.cuda_graph:
                step = _GraphedStep(step)
            buffers.steps[key] = step
        self._last_step = buffers.steps[key]
        return self._last_step


class _GraphedStep:
    """A decoding step captured in a CUDA graph after a few eager (real) steps, then replayed.

    The eager warm-up steps run on a side stream, as graph capture asks; the capture itself
    runs nothing, so the step that follows it is a replay. All the step reads and writes are
    the buffers it was captured with, reused by every later call of the same shape."""

    WARMUP_STEPS = 2

    def __init__(self, step):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None
        self.warmed = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is None and self.warmed < self.WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.warmed += 1
            return outputs
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step()
        self.graph.replay()
        return self.outputs


def _token_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        return set(eos_token_id.flatten().tolist())
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(eos_token_id)
