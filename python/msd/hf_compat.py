"""Everything msd must know about which transformers release it runs on, in one place.

msd supports the range declared in pyproject.toml (CI tests its oldest and its newest
release). The engine calls only public modules and methods; where those differ between
releases, the difference is handled here, one function per difference, each saying which
releases do what. Nothing else in msd looks at ``transformers.__version__``.
"""

from __future__ import annotations

from typing import Any


def rope_theta_and_scaling(config) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of a text config; ``rope_scaling`` is None for plain RoPE.

    transformers 5 keeps both in one ``config.rope_parameters`` dict (``rope_theta`` and
    ``rope_type`` inside, ``"default"`` meaning plain RoPE); 4.x has ``config.rope_theta`` and
    ``config.rope_scaling`` (None for plain RoPE).
    """
    parameters = getattr(config, "rope_parameters", None)
    if parameters is not None:  # transformers >= 5
        parameters = dict(parameters)
        theta = parameters.pop("rope_theta")
        return theta, (None if parameters.get("rope_type", "default") == "default" else parameters)
    return config.rope_theta, getattr(config, "rope_scaling", None)
