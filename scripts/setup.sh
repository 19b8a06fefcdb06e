#!/usr/bin/env bash
# Installs what building moelora needs on Debian (only the packages that are missing), then
# configures the Meson build directory given as $1 (default: build). The CUDA parts are built
# when nvcc is on PATH (or in /usr/local/cuda/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${1:-build}"

packages=(meson ninja-build g++ pkg-config libopenblas-dev doctest-dev libcli11-dev nlohmann-json3-dev liblapacke-dev)
# The fuzz test (fuzz/run.sh) needs clang with its libFuzzer runtime; without them it is skipped.
optional=(clang libclang-rt-dev)
missing_of() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
mapfile -t missing < <(missing_of "${packages[@]}")
mapfile -t missing_optional < <(missing_of "${optional[@]}")
if ((${#missing[@]} + ${#missing_optional[@]})); then
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ((${#missing_optional[@]})); then
    echo "installing (optional): ${missing_optional[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing_optional[@]}" >/dev/null ||
      echo "could not install ${missing_optional[*]}: the fuzz test will be skipped"
  fi
fi

if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

# CUTLASS 3 headers (the Hopper grouped GEMM of the CUDA bases) from the nvidia-cutlass wheel on PyPI,
# unpacked into the git-ignored .deps/cutlass/include (the build's default `cutlass_include`). Only
# where nvcc exists; without them the bases use cuBLAS.
cutlass_version=4.2.0.0
cutlass_dir=.deps/cutlass
if command -v nvcc >/dev/null && [[ "$(cat "$cutlass_dir/VERSION" 2>/dev/null)" != "$cutlass_version" ]]; then
  echo "fetching the CUTLASS $cutlass_version headers into $cutlass_dir"
  wheel_dir=$(mktemp -d)
  if python3 -m pip download -q --no-deps "nvidia-cutlass==$cutlass_version" -d "$wheel_dir" &&
      rm -rf "$cutlass_dir" && mkdir -p "$cutlass_dir" &&
      python3 -m zipfile -e "$wheel_dir"/nvidia_cutlass-*.whl "$wheel_dir/unpacked" &&
      mv "$wheel_dir/unpacked/cutlass_library/source/include" "$cutlass_dir/include"; then
    echo "$cutlass_version" >"$cutlass_dir/VERSION"
  else
    echo "could not fetch the CUTLASS headers: the CUDA bases will use cuBLAS"
  fi
  rm -rf "$wheel_dir"
fi
if [[ ! -f "$build_dir/build.ninja" ]]; then
  meson setup "$build_dir" --buildtype=debugoptimized >/dev/null
fi
