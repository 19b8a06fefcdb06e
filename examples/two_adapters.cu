// The GPU build of two_adapters.cpp (the same program, compiled by nvcc).
#include "two_adapters.cpp"
