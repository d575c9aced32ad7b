#!/usr/bin/env bash
# Compile-check of the CUDA kernels, no GPU needed: every csrc/cuda/*.cu is compiled to an sm_90
# object against the torch headers of the active Python. Exits non-zero if any file fails to compile;
# prints "skipped: nvcc not found" and exits 0 when there is no nvcc (CUDACXX, PATH, /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc="${CUDACXX:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" || ! -x "$nvcc" ]]; then
  echo "skipped: nvcc not found"
  exit 0
fi
python="${PYTHON:-$(command -v python || command -v python3)}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# CPU wheels of torch lack this generated header; a CUDA wheel's own copy comes first in the search.
mkdir -p "$tmp/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"

# Include paths and C++ ABI exactly as CMakeLists.txt takes them from torch.
if ! torch_flags_text="$("$python" -c '
import sysconfig, torch
from torch.utils import cpp_extension
for path in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]:
    print("-isystem"); print(path)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
')"; then
  echo "compile_cuda: cannot import torch from $python (set PYTHON to the environment's interpreter)"
  exit 1
fi
mapfile -t torch_flags <<<"$torch_flags_text"

flags=(-c -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90
       -Xcompiler=-fPIC,-Wall,-Wextra -Xptxas=-warn-spills,-warn-lmem-usage
       "${torch_flags[@]}" -isystem "$tmp/stub")

echo "nvcc: $("$nvcc" --version | tail -n 2 | head -n 1)"
failed=()
count=0
for src in csrc/cuda/*.cu; do
  start=$SECONDS
  if "$nvcc" "${flags[@]}" "$src" -o "$tmp/$(basename "$src").o"; then
    echo "ok: $src ($((SECONDS - start)) s)"
  else
    echo "FAILED: $src"
    failed+=("$src")
  fi
  count=$((count + 1))
done
if ((${#failed[@]})); then
  echo "compile_cuda: ${#failed[@]} of $count file(s) failed: ${failed[*]}"
  exit 1
fi
echo "compile_cuda: all $count file(s) compiled for sm_90"
