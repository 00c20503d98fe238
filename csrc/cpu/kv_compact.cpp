// PLACEHOLDER until the kv_compact CPU kernel lands (replaced in this same change).
#include <c10/util/Exception.h>
#include "cpu/ops_cpu.h"
namespace msd::cpu {
void kv_compact(const Tensor&, const Tensor&, const Tensor&, const Tensor&) { TORCH_CHECK(false, "msd::kv_compact: CPU kernel not written yet"); }
}  // namespace msd::cpu
