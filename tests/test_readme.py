"""The README's examples run as written: each code block is taken from README.md and run with
local folders for the Hub ids (a tiny target with its processor, a draft saved by msd) and the
CPU in float32 for CUDA in bfloat16; its output equals the target's own generate."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor

from msd.draft_checkpoint import save_draft

from tiny_models import random_draft, tiny_llava, tiny_processor, tiny_qwen2_vl, tiny_qwen_processor

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The README's python code block holding ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(block for block in blocks if marker in block)


def test_the_qwen_example_runs_as_written(tmp_path):
    code = readme_block("Qwen/Qwen2-VL-7B-Instruct")
    target = tiny_qwen2_vl(tmp_path / "target", seed=4)
    tiny_qwen_processor().save_pretrained(tmp_path / "target")
    save_draft(random_draft(target), tmp_path / "draft")
    code = (code.replace('"Qwen/Qwen2-VL-7B-Instruct"', repr(str(tmp_path / "target")))
            .replace('"lucylyn/MSD-Qwen2VL-7B-Instruct"', repr(str(tmp_path / "draft")))
            .replace('"bfloat16"', '"float32"').replace('"cuda"', '"cpu"'))
    image = Image.fromarray((np.random.default_rng(0).random((16, 24, 3)) * 255).astype("uint8"))
    scope = {"image": image, "AutoProcessor": AutoProcessor}
    exec("import msd\n" + code, scope)
    inputs, output = scope["inputs"], scope["output"]
    assert inputs["pixel_values"] is not None
    expected = target.generate(**inputs, max_new_tokens=256, do_sample=False)
    assert torch.equal(output, expected)


def test_the_llava_example_runs_as_written(tmp_path):
    code = readme_block("llava-hf/llava-1.5-7b-hf")
    target = tiny_llava(tmp_path / "target", seed=1)
    tiny_processor().save_pretrained(tmp_path / "target")
    save_draft(random_draft(target), tmp_path / "draft")
    code = (code.replace('"llava-hf/llava-1.5-7b-hf"', repr(str(tmp_path / "target")))
            .replace('"lucylyn/MSD-LLaVA1.5-7B"', repr(str(tmp_path / "draft")))
            .replace('"bfloat16"', '"float32"').replace('"cuda"', '"cpu"'))
    image = Image.fromarray((np.random.default_rng(1).random((20, 20, 3)) * 255).astype("uint8"))
    scope = {"image": image}
    exec(code, scope)
    expected = target.generate(**scope["inputs"], max_new_tokens=256, do_sample=False)
    assert torch.equal(scope["output"], expected)
