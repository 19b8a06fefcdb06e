// The GPU build of qad_finetune.cpp (the same program, compiled by nvcc).
#include "qad_finetune.cpp"
