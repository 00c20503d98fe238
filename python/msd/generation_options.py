"""Generation options: merged as ``target.generate`` merges them, checked against what msd does.

Precedence, as in Hugging Face's ``generate``: keyword options > the ``generation_config``
passed in > the target's own ``generation_config`` (from its ``generation_config.json``) >
the library defaults ``generate`` applies to options nobody set (:data:`LIBRARY_DEFAULTS`).
Only public ``GenerationConfig`` methods are used. An option ``GenerationConfig`` does not
know is an error naming it (``generate`` would pass it to the model, where msd has nowhere
to put it); an option msd cannot honour losslessly is ``NotImplementedError``.
"""

from __future__ import annotations

import copy

from transformers import GenerationConfig

# What generate uses for options left unset. transformers 4.x stores these as the
# GenerationConfig defaults; 5.x leaves them None and fills them in inside generate.
LIBRARY_DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "num_beams": 1,
    "num_return_sequences": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}

# Options msd does not implement, with the value that means "off".
UNSUPPORTED_OPTIONS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_new_tokens": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "penalty_alpha": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "renormalize_logits": False,
    "guidance_scale": None,
    "watermarking_config": None,
    "assistant_model": None,
    "prompt_lookup_num_tokens": None,
    "constraints": None,
    "force_words_ids": None,
    "diversity_penalty": 0.0,
    "exponential_decay_length_penalty": None,
    "low_memory": None,
    "num_beam_groups": 1,
    "dola_layers": None,
    "top_h": None,
    "max_time": None,
    "token_healing": False,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
}


def resolve_generation_config(model_config: GenerationConfig | None, generation_config: GenerationConfig | None,
                              options: dict) -> GenerationConfig:
    """The options ``generate`` would run with (see the module docstring)."""
    known = GenerationConfig()
    unknown = sorted(name for name in options if not hasattr(known, name))
    if unknown:
        raise TypeError(f"generate() got unknown generation option(s): {', '.join(unknown)}")
    merged = model_config.to_diff_dict() if model_config is not None else {}
    if generation_config is not None:
        merged |= generation_config.to_diff_dict()
    merged.pop("transformers_version", None)
    config = GenerationConfig(**copy.deepcopy(merged))
    config.update(**options)
    for name, value in LIBRARY_DEFAULTS.items():
        if getattr(config, name, None) is None:
            setattr(config, name, value)
    check_supported(config)
    return config


def check_supported(config: GenerationConfig) -> None:
    """Raise ``NotImplementedError`` naming any option msd cannot honour losslessly."""
    for name, off in UNSUPPORTED_OPTIONS.items():
        value = getattr(config, name, off)
        if value is not None and value != off:
            raise NotImplementedError(f"SpeculativeLLaVA.generate does not support {name}={value!r}")
    if (config.min_length or 0) > 0:
        raise NotImplementedError(f"SpeculativeLLaVA.generate does not support min_length={config.min_length}")
