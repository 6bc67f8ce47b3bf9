// The normalisation plan every op takes explicitly (hamur_fast/ops/contract.py, Plan): the same four values
// the Triton launchers read as constexprs. No kernel infers any of them from a tensor's rank.
#pragma once

#include <ATen/ATen.h>

namespace hamur_fast {

struct NormPlan {
  bool per_domain;        // statistics groups: the rows' domains (paper), or one group of the whole batch
  bool batch_statistics;  // normalise with the batch's statistics (else with given running statistics)
  bool unbiased;          // variance = m2 / max(count - 1, 1) (released), else m2 / max(count, 1)
  double eps;
};

// What m2 is divided by to give the variance normalised with, per group: count (G,) -> (G, 1).
inline at::Tensor variance_divisor(const at::Tensor& count, bool unbiased) {
  return (unbiased ? count - 1 : count).clamp_min(1).unsqueeze(1);
}

}  // namespace hamur_fast
