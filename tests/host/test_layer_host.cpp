// GroupedLoRA behaviour on the host reference backend.
#include "cases/layer_cases.hpp"

MOELORA_LAYER_CASES(moelora::testing::HostHarness);
