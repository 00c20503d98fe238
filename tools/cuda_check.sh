#!/usr/bin/env bash
# Compile every CUDA source under csrc/ (and every framework-free header in
# csrc/include/msd/) with nvcc for sm_80 and sm_90, warnings as errors. Needs no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "cuda-check: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

flags=(-std=c++17 -O3 -Icsrc -Icsrc/include --expt-relaxed-constexpr
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
       -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror)

# Every header alone in a translation unit: each must be self-contained and warning-free.
for header in csrc/include/msd/*.h csrc/include/msd/*.cuh; do
  [ -e "$header" ] || continue
  unit="$out/$(basename "$header").cu"
  printf '#include "%s"\n' "${header#csrc/include/}" > "$unit"
  sources+=("$unit")
done
while IFS= read -r file; do sources+=("$file"); done < <(find csrc -name '*.cu' | sort)

count=0
for source in "${sources[@]}"; do
  echo "nvcc sm_80+sm_90 -Werror: ${source#"$out"/}"
  "$NVCC" "${flags[@]}" -c "$source" -o "$out/unit$count.o"
  count=$((count + 1))
done
echo "cuda-check: $count translation units compiled cleanly for sm_80 and sm_90"

# The thin torch glue (host C++ registering the CUDA ops): syntax and warnings against the
# installed torch's headers, which ship the CUDA ones even in CPU builds.
PYTHON=${PYTHON:-python3}
torch_include=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")
# Where nvcc finds the CUDA runtime headers (nvcc may be a wrapper script outside the toolkit).
printf '#include <cuda_runtime_api.h>\n' > "$out/probe.cu"
cuda_include=$(dirname "$("$NVCC" -M "$out/probe.cu" | tr ' \\' '\n\n' | grep '/cuda_runtime_api\.h$' | head -1)")
# CPU wheels ship c10/cuda headers without the build-generated cuda_cmake_macros.h: stub it.
stub_include="$out/stub"
if [ ! -e "$(echo "$torch_include" | cut -d' ' -f1)/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$stub_include/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub_include/c10/cuda/impl/cuda_cmake_macros.h"
fi
glue=0
for source in $(find csrc/cuda -name '*.cpp' | sort); do
  echo "g++ -fsyntax-only -Werror: $source"
  # shellcheck disable=SC2046
  g++ -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Icsrc -Icsrc/include \
      $(printf -- '-isystem %s ' $torch_include "$cuda_include" "$stub_include") "$source"
  glue=$((glue + 1))
done
echo "cuda-check: $glue torch glue files checked"
