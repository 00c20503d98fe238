#!/usr/bin/env bash
# Checks the plain `pip install .` path: built with pip's build isolation (no torch at
# build time), the wheel carries the C++ sources, and the kernels compile on first import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(realpath -s "$(command -v "${1:-python3}")")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m pip wheel -q --no-deps . -w "$work/dist"
wheel=$(ls "$work"/dist/msd-*.whl)
"$PY" - "$wheel" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for required in ("msd_kernels/_csrc/ops.cpp", "msd/engine.py", "msd/train/trainer.py", "msd/demo/run.py"):
    assert required in names, f"wheel lacks {required}"
assert not any(n.endswith(".so") for n in names), "an isolated build must not ship a compiled library"
print(f"wheel-check: {len(names)} files, sources included, no prebuilt library")
PYEOF
"$PY" -m pip install -q --no-deps --target "$work/site" "$wheel"
cd "$work"
PYTHONPATH="$work/site" MSD_KERNELS_CACHE_DIR="$work/cache" "$PY" - <<'PYEOF'
import os, torch, msd, msd_kernels, msd.train.trainer, msd.demo.run
for module in (msd, msd_kernels, msd.train.trainer, msd.demo.run):
    assert module.__file__.startswith(os.environ["PYTHONPATH"]), module.__file__
where = msd_kernels.load_library()
assert where.startswith(os.environ["MSD_KERNELS_CACHE_DIR"]), where
logits = torch.randn(2, 7, 50)
tokens = torch.randint(0, 50, (2, 7))
links = torch.full((2, 7), -1, dtype=torch.int64)
got = msd_kernels.verify_greedy(logits, tokens, links, links)
want = msd_kernels.reference.verify_greedy(logits, tokens, links, links)
assert all(torch.equal(g, w) for g, w in zip(got, want))
print(f"wheel-check: kernels built on first import into {where} and agree with the reference")
PYEOF
