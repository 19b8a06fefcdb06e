#!/usr/bin/env bash
# Packs built programs for a run on a lent GPU machine (whose image has the CUDA toolkit, NCCL and
# PyTorch but not Debian's OpenBLAS/LAPACK): copies the given build outputs, stripped, into DEST
# with the non-system shared libraries they load, so that DEST can travel as one folder. Run them
# there with LD_LIBRARY_PATH=DEST/lib. Usage: scripts/device_bundle.sh BUILD_DIR DEST TARGET...
# (TARGET: a path under BUILD_DIR, e.g. tests/moelora_gpu_tests).
set -euo pipefail
build_dir="$1"
dest="$2"
shift 2
mkdir -p "$dest/lib"
# Provided by the GPU image (CUDA 13 toolkit, driver, NCCL) or by every Linux system.
provided='^(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux.*|libcuda|libcudart|libcublas|libcublasLt|libcusolver|libcusparse|libnvJitLink|libnccl|libcurand|libcufft)\.so'
for target in "$@"; do
  cp "$build_dir/$target" "$dest/"
  strip "$dest/$(basename "$target")"
  ldd "$build_dir/$target" | awk '$3 ~ /^\// {print $1, $3}' | while read -r name path; do
    [[ "$name" =~ $provided ]] || cp -L "$path" "$dest/lib/$name"
  done
done
du -sh "$dest"
