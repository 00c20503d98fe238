"""benchmarks/e2e.py on tiny shapes: it runs, its JSON and markdown agree, the engine's
output is checked against target.generate, and controlled proposals set the acceptance."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"
TINY = ["--preset", "tiny", "--device", "cpu", "--prompts", "2", "--max-new-tokens", "24", "--warmup", "0",
        "--text-tokens", "8"]


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["e2e"]


def written(out: Path) -> tuple[dict, str]:
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_compare_mode(e2e, tmp_path):
    out = tmp_path / "compare.json"
    result = e2e.main(TINY + ["--tree", "small", "--out", str(out)])
    saved, table = written(out)
    assert saved == json.loads(json.dumps(result))
    assert saved["lossless"] is True and saved["settings"]["mode"] == "compare"
    assert [row["method"] for row in saved["summary"]] == ["target.generate", "SpeculativeLLaVA", "HF assisted"]
    for row in saved["summary"]:
        assert row["matches_target"] is True
        assert row["new_tokens"] == 2 * 24  # random models have no end of sequence
        assert row["tokens_per_second"] == pytest.approx(row["new_tokens"] / row["seconds"])
        assert f"| {row['method']} | {row['tau']:.2f} | {row['tokens_per_second']:.1f} |" in table
    baseline = saved["summary"][0]
    assert baseline["tau"] == 1.0 and baseline["speedup"] == 1.0
    assert len(saved["prompts"]) == 2
    for prompt in saved["prompts"]:
        assert prompt["prompt_tokens"] == 1 + 8 + 16  # BOS, text, 16 image tokens
        assert all(run["first_mismatch"] is None for run in prompt["methods"].values())
    assert saved["commit"] and saved["machine"]["torch"]


def test_controlled_mode_sets_the_acceptance(e2e, tmp_path):
    out = tmp_path / "controlled.json"
    e2e.main(TINY + ["--mode", "controlled", "--taus", "1", "6", "--out", str(out)])
    saved, table = written(out)
    assert saved["lossless"] is True
    baseline, never, always = saved["summary"]
    assert never["corruption"] == 1.0 and never["tau"] == 1.0  # the true token is never proposed
    assert always["corruption"] < 0.1 and always["tau"] > 4.0  # default tree: up to 6 accepted + 1
    assert baseline["tau"] == 1.0 and baseline["corruption"] is None
    for row in saved["summary"]:
        assert row["matches_target"] is True
        assert 0.0 <= row["hook_seconds"] < row["seconds"]
        assert f"| {row['method']} | {row['target_tau']:g} |" in table


def test_a_mismatch_is_reported(e2e):
    baseline = e2e.Run([1, 2, 3, 4], 1.0, 2, 1.0, None, None)
    assert e2e.run_record(baseline, baseline)["first_mismatch"] is None
    assert e2e.run_record(e2e.Run([1, 2, 5, 4], 1.0, 2, 1.0, None, None), baseline)["first_mismatch"] == 2
    assert e2e.run_record(e2e.Run([1, 2, 3], 1.0, 1, 1.0, None, None), baseline)["matches_target"] is False


@pytest.mark.parametrize("tau", [1.0, 2.5, 6.0, 7.0])
def test_corruption_for_tau_inverts_the_expected_acceptance(e2e, tau):
    corruption = e2e.corruption_for_tau(tau, max_path=6)
    assert e2e.expected_tau(corruption, 6) == pytest.approx(tau, abs=1e-9)


def test_unreachable_tau_is_refused(e2e):
    with pytest.raises(ValueError, match="out of reach"):
        e2e.corruption_for_tau(8.0, max_path=6)
