#!/usr/bin/env python3
"""Writes the fuzzer's seed corpus with the reference writer (pip package `safetensors` >= 0.8).

The files are committed; tests/host/test_safetensors_robust.cpp reads them back and checks that
moelora's writer produces the same bytes from the same tensors. Byte k of tensor number t is
(t * 31 + k * 7) & 0xff. Usage: fuzz/make_corpus.py [OUTPUT_DIR] (default: fuzz/corpus).
"""
import ctypes
import pathlib
import sys

from safetensors import TensorSpec, serialize_file

# file dtype: (bytes per element, the name TensorSpec takes)
DTYPES = {"BF16": (2, "bfloat16"), "F16": (2, "float16"), "F32": (4, "float32"), "F64": (8, "float64"),
          "I8": (1, "int8"), "U8": (1, "uint8"), "I32": (4, "int32"), "I64": (8, "int64"),
          "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "F8_E8M0": (1, "float8_e8m0fnu")}


def pattern(t, n):
    return bytes((t * 31 + k * 7) & 0xFF for k in range(n))


def write(path, specs, metadata):
    """Writes the tensors `specs` = [(name, file dtype, shape)] to `path`."""
    buffers, tensors = [], {}
    for t, (name, dtype, shape) in enumerate(specs):
        n, torch_name = DTYPES[dtype]
        for d in shape:
            n *= d
        buffers.append(ctypes.create_string_buffer(pattern(t, n), max(n, 1)))
        tensors[name] = TensorSpec(dtype=torch_name, shape=shape, data_ptr=ctypes.addressof(buffers[-1]), data_len=n)
    serialize_file(tensors, str(path), metadata)


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "corpus")
    root.mkdir(parents=True, exist_ok=True)
    every_dtype = [(f"t.{d}", d, [2, 3]) for d in DTYPES]
    write(root / "every_dtype.safetensors", every_dtype, {"format": "pt"})
    adapter = [("model.experts.lora_a_x.weight", "BF16", [2, 2, 4]),
               ("model.experts.lora_b_x.weight", "BF16", [2, 3, 2]),
               ("scales", "F32", [3]), ("packed", "U8", [5])]
    write(root / "adapter.safetensors", adapter, {"format": "pt", "moelora.adapters": "[]"})
    empty = [("none", "F32", [0, 4]), ("scalar", "F64", []), ("also_none", "I8", [3, 0])]
    write(root / "empty_tensors.safetensors", empty, None)
    write(root / "no_tensors.safetensors", [], None)


if __name__ == "__main__":
    main()
