// PLACEHOLDER until the tree_assemble CPU kernel lands (replaced in this same change).
#include <c10/util/Exception.h>
#include "cpu/ops_cpu.h"
namespace msd::cpu {
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> tree_assemble(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t) { TORCH_CHECK(false, "msd::tree_assemble: CPU kernel not written yet"); }
}  // namespace msd::cpu
