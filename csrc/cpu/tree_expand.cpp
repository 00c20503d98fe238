// PLACEHOLDER until the tree_expand CPU kernel lands (replaced in this same change).
#include <c10/util/Exception.h>
#include "cpu/ops_cpu.h"
namespace msd::cpu {
std::tuple<Tensor, Tensor, Tensor> tree_expand(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t) { TORCH_CHECK(false, "msd::tree_expand: CPU kernel not written yet"); }
}  // namespace msd::cpu
