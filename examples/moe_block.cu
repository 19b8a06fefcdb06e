// The GPU build of moe_block.cpp (the same program, compiled by nvcc).
#include "moe_block.cpp"
