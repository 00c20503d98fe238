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


def run_readme_example(target_id: str, draft_id: str, target, processor, folder: Path, image, prelude: str = "",
                       **names) -> dict:
    """Run the README block that loads ``target_id`` as written, but with local folders for the
    Hub ids ``target_id`` (``target``, saved in ``folder / "target"``, and ``processor`` saved
    beside it) and ``draft_id`` (a random draft) and the CPU in float32 for CUDA in bfloat16;
    ``image`` and ``names`` are in its scope, which is returned."""
    processor.save_pretrained(folder / "target")
    save_draft(random_draft(target), folder / "draft")
    code = (readme_block(target_id).replace(f'"{target_id}"', repr(str(folder / "target")))
            .replace(f'"{draft_id}"', repr(str(folder / "draft")))
            .replace('"bfloat16"', '"float32"').replace('"cuda"', '"cpu"'))
    scope = {"image": image, **names}
    exec(prelude + code, scope)
    return scope


def test_the_qwen_example_runs_as_written(tmp_path):
    target = tiny_qwen2_vl(tmp_path / "target", seed=4)
    image = Image.fromarray((np.random.default_rng(0).random((16, 24, 3)) * 255).astype("uint8"))
    scope = run_readme_example("Qwen/Qwen2-VL-7B-Instruct", "lucylyn/MSD-Qwen2VL-7B-Instruct", target,
                               tiny_qwen_processor(), tmp_path, image, prelude="import msd\n",
                               AutoProcessor=AutoProcessor)
    inputs, output = scope["inputs"], scope["output"]
    assert inputs["pixel_values"] is not None
    expected = target.generate(**inputs, max_new_tokens=256, do_sample=False)
    assert torch.equal(output, expected)


def test_the_llava_example_runs_as_written(tmp_path):
    target = tiny_llava(tmp_path / "target", seed=1)
    image = Image.fromarray((np.random.default_rng(1).random((20, 20, 3)) * 255).astype("uint8"))
    scope = run_readme_example("llava-hf/llava-1.5-7b-hf", "lucylyn/MSD-LLaVA1.5-7B", target, tiny_processor(),
                               tmp_path, image)
    expected = target.generate(**scope["inputs"], max_new_tokens=256, do_sample=False)
    assert torch.equal(scope["output"], expected)
