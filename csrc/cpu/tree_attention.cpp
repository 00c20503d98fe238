// PLACEHOLDER until the tree_attention CPU kernel lands (replaced in this same change).
#include <c10/util/Exception.h>
#include "cpu/ops_cpu.h"
namespace msd::cpu {
Tensor tree_attention(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, std::optional<double>) { TORCH_CHECK(false, "msd::tree_attention: CPU kernel not written yet"); }
}  // namespace msd::cpu
