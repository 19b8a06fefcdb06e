// The SVD-based initialisers on the host backend.
#include "cases/init_cases.hpp"

MOELORA_INIT_CASES(HostHarness);
