"""``SpeculativeLLaVA``: MSD speculative decoding as a drop-in ``generate()``.

One step (MSD_SPEC.md 3): the draft grows a tree under the last emitted token, the target
scores the whole tree in one forward pass (msd's tree attention over a static cache),
the verifier keeps the longest agreeing path plus a bonus token, and both caches keep
only what was accepted. Greedy output equals ``target.generate(do_sample=False)``;
sampling draws from the same distribution as ``target.generate(do_sample=True)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedModel, StopStringCriteria

import msd_kernels
from msd.cache import StaticKVCache
from msd.draft import MSDDraftModel
from msd.draft_checkpoint import check_fits_target, load_draft
from msd.generation_options import resolve_generation_config
from msd.sampling import logits_warpers, sampling_probs
from msd.targets import PromptInputs, adapter_for
from msd.tree_draft import ProposalHook, TreeDrafter, gather_rows


@dataclass
class GenerationStats:
    """Statistics of the last ``generate`` call."""

    new_tokens: int = 0
    seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted at each step

    @property
    def steps(self) -> int:
        """Target verification forwards."""
        return len(self.accepted)

    @property
    def tau(self) -> float:
        """Mean tokens per verification forward (accepted + bonus); the prefill's token aside."""
        return (self.new_tokens - 1) / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


class SpeculativeLLaVA:
    """A vision-language target with an MSD draft head.

    msd runs the target's text model itself (:mod:`msd.decoder`, the target's own modules),
    after the target's own multimodal forward has built the prompt's text-model inputs
    (:mod:`msd.targets`). The path of one step: adapter -> decoder -> drafter -> verifier.

    Args:
        target: a model of a supported family (:data:`msd.targets.ADAPTERS`):
            ``LlavaForConditionalGeneration`` or ``LlavaNextForConditionalGeneration``.
        draft: the MSD draft head, on the target's device.
        top_k: children per node and frontier width of the draft tree (default 10).
        depth: expansion steps (default 5; paths of up to ``depth + 1`` draft tokens).
        total_tokens: tree tokens verified per step, root included (default 60).
        proposal_hook: test seam replacing the draft's logits (see ``msd.tree_draft``).
    """

    def __init__(self, target: PreTrainedModel, draft: MSDDraftModel, *, top_k: int = 10, depth: int = 5,
                 total_tokens: int = 60, proposal_hook: ProposalHook | None = None):
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
        self.target, self.draft = target.eval(), draft.eval()
        if self.draft.lm_head is None:
            self.draft.set_lm_head(self.adapter.lm_head)
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.proposal_hook = proposal_hook
        self.last_stats = GenerationStats()

    @classmethod
    def from_pretrained(cls, target: str | Path | PreTrainedModel, draft: str | Path | MSDDraftModel, *,
                        top_k: int = 10, depth: int = 5, total_tokens: int = 60,
                        device: str | torch.device | None = None, **target_kwargs):
        """Load the target (path or Hub id, ``from_pretrained`` keyword arguments such as
        ``dtype`` or ``device_map`` pass through) and the draft checkpoint (onto the target's
        device). ``device`` moves the target there after loading, which, unlike
        ``device_map``, needs no ``accelerate``."""
        if not isinstance(target, PreTrainedModel):
            target = AutoModelForImageTextToText.from_pretrained(target, **target_kwargs)
        if device is not None:
            target = target.to(device)
        if not isinstance(draft, MSDDraftModel):
            draft = load_draft(draft, target=target)
        return cls(target, draft, top_k=top_k, depth=depth, total_tokens=total_tokens)

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

        Keyword arguments are the target's multimodal inputs (``pixel_values``, and
        ``image_sizes`` for LLaVA-NeXT) and generation options (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
        ``stop_strings``, ...), merged with ``generation_config`` and the target's own as
        ``generate`` merges them; an unknown one is a ``TypeError``. ``stop_strings`` needs
        ``tokenizer``. Statistics land in :attr:`last_stats`.
        """
        started = time.perf_counter()
        model_inputs = {name: kwargs.pop(name) for name in self.adapter.input_names if name in kwargs}
        config = resolve_generation_config(self.target.generation_config, generation_config, kwargs)
        self._check_inputs(input_ids, attention_mask, model_inputs)
        prompt_len = input_ids.shape[1]
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        self.adapter.check_length(prompt_len, max_new)
        eos = _token_set(config.eos_token_id)
        if config.stop_strings and tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= (as in target.generate)")
        stop_strings = StopStringCriteria(tokenizer, config.stop_strings) if config.stop_strings else None
        warpers = logits_warpers(config)

        target_cache, drafter = self._new_state(input_ids, max_new)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        emitted = input_ids[0].tolist()
        stats = GenerationStats()

        prompt = self.adapter.prompt_inputs(input_ids, attention_mask, **model_inputs)
        hidden = self._prefill(prompt, target_cache)
        first = self._choose(config.do_sample, warpers, self.adapter.lm_head(hidden[:, -1:]))[:, 0]  # [B]
        drafter.commit_prompt(input_ids, first, hidden, prompt.embeds, self.adapter.visual_mask(input_ids))
        rng_state = torch.stack([torch.randint(0, 2**62, ()), torch.zeros((), dtype=torch.long)]).to(
            input_ids.device)

        root = first  # [B] the last emitted token, on the device
        done = self._emit([int(first[0])], emitted, eos, max_new, stop_strings, streamer, prompt_len)
        while not done:
            tree = drafter.build(root, torch.tensor([emitted], device=input_ids.device)
                                 if self.proposal_hook is not None else None)
            verify_hidden = self._verify(tree, target_cache, prompt.rope_delta)
            logits = self.adapter.lm_head(verify_hidden)
            if config.do_sample:
                accepted, num_accepted, bonus = msd_kernels.verify_sampling(
                    sampling_probs(warpers, logits), tree.tokens, tree.first_child, tree.next_sibling, rng_state)
            else:
                accepted, num_accepted, bonus = msd_kernels.verify_greedy(
                    logits, tree.tokens, tree.first_child, tree.next_sibling)
            target_cache.compact(accepted, num_accepted)

            # The one host sync of a step (stopping, streaming): count, bonus, path tokens.
            path_tokens = tree.tokens.gather(1, accepted.clamp(min=0))  # [B, T+1], root first
            host = torch.cat([num_accepted, bonus, path_tokens[0]]).tolist()
            count = host[0] + 1  # root + accepted nodes
            stats.accepted.append(count - 1)
            done = self._emit(host[3:2 + count] + [host[1]], emitted, eos, max_new, stop_strings, streamer,
                              prompt_len)
            if not done:
                path = accepted[:, :count]  # [B, a + 1] tree rows, root first
                step_tokens = torch.cat([path_tokens[:, 1:count], bonus[:, None]], 1)  # [B, a + 1]
                drafter.commit(step_tokens, gather_rows(verify_hidden, path))
                root = bonus

        if streamer is not None:
            streamer.end()
        stats.new_tokens = len(emitted) - prompt_len
        stats.seconds = time.perf_counter() - started
        self.last_stats = stats
        return torch.tensor([emitted], dtype=input_ids.dtype, device=input_ids.device)

    # ------------------------------------------------------------------ steps
    def _check_inputs(self, input_ids, attention_mask, model_inputs: dict) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, length] tensor")
        if input_ids.shape[0] != 1:
            raise NotImplementedError(
                f"SpeculativeLLaVA.generate runs one sequence at a time for now; got batch {input_ids.shape[0]}")
        device = self.adapter.device
        for name, tensor in {"input_ids": input_ids, "attention_mask": attention_mask, **model_inputs}.items():
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but the target is on {device}: "
                                 "move the inputs there first (e.g. inputs.to(target.device))")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("attention_mask with padding is not supported (batch size 1 needs none)")
        self.adapter.check_visual_inputs(input_ids, model_inputs)

    def _new_state(self, input_ids: torch.Tensor, max_new: int) -> tuple[StaticKVCache, TreeDrafter]:
        needed = input_ids.shape[1] + max_new + self.total_tokens
        target_cache = self.adapter.new_cache(1, needed)
        draft_config = self.draft.config
        draft_cache = StaticKVCache(1, 1, draft_config.num_key_value_heads, needed + self.depth * self.top_k,
                                    self.draft.layers[0].self_attn.head_dim, self.draft.fc.weight.dtype,
                                    input_ids.device)
        drafter = TreeDrafter(self.draft, draft_cache, self.top_k, self.depth, self.total_tokens - 1,
                              self.proposal_hook)
        return target_cache, drafter

    def _prefill(self, prompt: PromptInputs, cache: StaticKVCache) -> torch.Tensor:
        """The target's text model over the prompt; returns the post-norm hidden states
        ``[B, L, H]`` (the draft's features)."""
        hidden = self.adapter.decoder(prompt.embeds, prompt.position_ids, cache)
        cache.advance(prompt.embeds.shape[1])
        return hidden

    def _verify(self, tree, cache: StaticKVCache, rope_delta: torch.Tensor) -> torch.Tensor:
        """The target's text model over the tree tokens; post-norm hidden states ``[B, T+1, H]``."""
        embeds = self.adapter.embed_tokens(tree.tokens)
        positions = self.adapter.positions(cache.prefix_len.long().unsqueeze(1) + tree.depth, rope_delta)
        return self.adapter.decoder(embeds, positions, cache, tree.mask)

    @staticmethod
    def _choose(do_sample: bool, warpers, logits: torch.Tensor) -> torch.Tensor:
        """Next token ``[B, 1]`` from logits ``[B, 1, V]``: argmax, or a draw when sampling."""
        if not do_sample:
            return logits.argmax(-1)
        return torch.multinomial(sampling_probs(warpers, logits[:, 0]), 1)

    @staticmethod
    def _emit(tokens, emitted, eos, max_new, stop_strings, streamer, prompt_len) -> bool:
        """Append tokens one by one until a stop condition; returns whether to stop."""
        for token in tokens:
            emitted.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if token in eos or len(emitted) - prompt_len >= max_new:
                return True
            if stop_strings is not None and bool(stop_strings(torch.tensor([emitted]), None)[0]):
                return True
        return False


def _token_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        return set(eos_token_id.flatten().tolist())
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return set(eos_token_id)
