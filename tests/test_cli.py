"""``msd generate`` end to end on a tiny LLaVA saved with a real processor: the streamed
answer equals the target's own greedy ``generate``, the statistics line is printed, and
user errors exit non-zero with a message naming the problem."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlavaProcessor, PreTrainedTokenizerFast

from msd.cli import main
from msd.draft_checkpoint import save_draft
from msd.prompts import encode_prompt

import tiny_models
from tiny_models import IMAGE_SIZE, IMAGE_TOKEN, PATCH, random_draft, tiny_llava

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 12
PROMPT = "w5 w6 w7"
STATS_LINE = r"tau \d+\.\d\d \| {} tokens in \d+\.\d\d s \| \d+\.\d tokens/s"
# A LLaVA-1.5-like template (the tiny vocabulary has "USER:" and "ASSISTANT:" as words).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def tiny_processor(chat_template: str | None) -> LlavaProcessor:
    """The tiny target's processor (tiny_models.tiny_processor) with a whitespace word tokenizer
    over its vocabulary (``<s>`` = 1, ``</s>`` = 2, ``"USER:"``/``"ASSISTANT:"`` one word each,
    ``<image>`` = IMAGE_TOKEN, words ``w5``...) that prepends BOS."""
    vocab = ({"<unk>": 0, "<s>": 1, "</s>": 2, "USER:": 3, "ASSISTANT:": 4}
             | {f"w{i}": i for i in range(5, IMAGE_TOKEN)} | {"<image>": IMAGE_TOKEN})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
                                        model_input_names=["input_ids", "attention_mask"])
    return tiny_models.tiny_processor(tokenizer, chat_template=chat_template)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Targets with and without a chat template (same weights), a draft and two images."""
    root = tmp_path_factory.mktemp("cli")
    paths = {"chat": root / "chat", "plain": root / "plain", "draft": root / "draft"}
    target = tiny_llava(paths["chat"], seed=1)
    tiny_llava(paths["plain"], seed=1)
    tiny_processor(CHAT_TEMPLATE).save_pretrained(paths["chat"])
    tiny_processor(None).save_pretrained(paths["plain"])
    save_draft(random_draft(target), paths["draft"])
    gen = torch.Generator().manual_seed(0)
    for name, size in (("red", (20, 30)), ("noise", (40, 24))):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
        paths[name] = root / f"{name}.png"
        Image.fromarray(pixels.numpy()).save(paths[name])
    return paths | {"target": target}


def expected_answer(files, variant: str, image_names: list[str]) -> tuple[str, int]:
    """The target's own greedy answer on the inputs the CLI builds: text and token count."""
    processor = tiny_processor(CHAT_TEMPLATE if variant == "chat" else None)
    images = [Image.open(files[name]).convert("RGB") for name in image_names]
    inputs = encode_prompt(processor, PROMPT, images)
    prompt_len = inputs["input_ids"].shape[1]
    output = files["target"].generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    new = output[0, prompt_len:]
    return processor.tokenizer.decode(new, skip_special_tokens=True), len(new)


def cli_args(files, variant: str, image_names: list[str], *extra: str) -> list[str]:
    args = ["generate", "--target", str(files[variant]), "--draft", str(files["draft"]), "--prompt", PROMPT,
            "--max-new-tokens", str(MAX_NEW), "--device", "cpu", *extra]
    for name in image_names:
        args += ["--image", str(files[name])]
    return args


@pytest.mark.parametrize("variant, image_names, tree", [
    ("chat", ["red"], []),
    ("chat", [], ["--tree-top-k", "4", "--depth", "3", "--total-tokens", "12"]),
    ("plain", ["red", "noise"], ["--tree-top-k", "2", "--depth", "2", "--total-tokens", "5"]),
])
def test_greedy_answer_equals_target_generate(files, capsys, variant, image_names, tree):
    status = main(cli_args(files, variant, image_names, *tree))
    out, err = capsys.readouterr()
    assert status == 0, err
    answer, new_tokens = expected_answer(files, variant, image_names)
    assert answer  # a non-trivial comparison
    assert out == answer + "\n"  # the streamer ends the answer with a newline
    assert re.fullmatch(STATS_LINE.format(new_tokens), err.splitlines()[-1])


def test_prompt_templates(files):
    image = Image.open(files["red"]).convert("RGB")
    with_template = tiny_processor(CHAT_TEMPLATE)
    plain = tiny_processor(None)
    for processor in (with_template, plain):  # both render the LLaVA-1.5 format here
        ids = encode_prompt(processor, PROMPT, [image, image])["input_ids"][0].tolist()
        visual = (IMAGE_SIZE // PATCH) ** 2
        assert ids == [1, 3] + [IMAGE_TOKEN] * 2 * visual + [5, 6, 7, 4]


def test_sampling_runs_with_seed(files, capsys):
    args = cli_args(files, "chat", ["red"], "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9",
                    "--seed", "3")
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # the seed makes sampling reproducible


def test_module_entry_point(files):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "python")])}
    result = subprocess.run([sys.executable, "-m", "msd", *cli_args(files, "chat", ["noise"])],
                            check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    answer, new_tokens = expected_answer(files, "chat", ["noise"])
    assert result.stdout == answer + "\n"
    assert re.fullmatch(STATS_LINE.format(new_tokens), result.stderr.splitlines()[-1])


@pytest.mark.parametrize("extra, message", [
    (["--image", "missing.png"], "cannot read image missing.png"),
    (["--target", "/no/such/target"], "cannot load the target's processor from /no/such/target"),
    (["--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["--total-tokens", "1"], "argument --total-tokens: must be >= 2, got 1"),
    (["--tree-top-k", "2", "--depth", "1", "--total-tokens", "10"], "total_tokens must be in [2, 7]"),
    (["--top-k", "5"], "--top-k and --top-p shape sampling"),
    (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid integer value: 'many'"),
])
def test_user_errors(files, capsys, extra, message):
    try:
        status = main(cli_args(files, "chat", [], *extra))
    except SystemExit as exc:  # argparse rejects bad option values itself
        status = exc.code
    err = capsys.readouterr().err
    assert status != 0
    assert message in err
    assert "Traceback" not in err


def test_unreadable_image(files, tmp_path, capsys):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    assert main(cli_args(files, "chat", []) + ["--image", str(not_an_image)]) == 1
    assert f"cannot read image {not_an_image}" in capsys.readouterr().err
