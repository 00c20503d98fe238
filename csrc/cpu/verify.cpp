// PLACEHOLDER until the verify CPU kernels land (replaced in this same change).
#include <c10/util/Exception.h>
#include "cpu/ops_cpu.h"
namespace msd::cpu {
std::tuple<Tensor, Tensor, Tensor> verify_greedy(const Tensor&, const Tensor&, const Tensor&, const Tensor&) { TORCH_CHECK(false, "not written yet"); }
std::tuple<Tensor, Tensor, Tensor> verify_sampling(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&) { TORCH_CHECK(false, "not written yet"); }
}  // namespace msd::cpu
