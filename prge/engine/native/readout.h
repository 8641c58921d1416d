// The label readout after the loop (prge.zo.readout; the Python loop's host step is
// prge.engine.runtime.fit_readout): the program's `features` method gives the final hidden states h of
// the first --readout-rows training rows and of the dev rows, the basis A is their SVD (Eigen, with
// prge.zo.readout.basis's sign rule), and each zeroth-order step is the program's `readout_step` method
// (prge.zo.readout.step: the noise, losses, g and update the Python side computes) on the rows the plan
// names; the B with the best dev accuracy (B = 0 included) is kept.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data.h"
#include "options.h"
#include "program.h"

namespace prge {

constexpr long READOUT_EVAL_EVERY = 250;  // prge.zo.readout.EVAL_EVERY: readout steps between dev evaluations

struct ReadoutRows {  // rows through `features`: h (n, H), the head's label-word logits (n, L), labels (n,)
  int64_t n = 0, hidden = 0, labels = 0;
  std::vector<float> h, base;
  std::vector<int64_t> y;
};

struct ReadoutFit {
  int64_t rank = 0, hidden = 0, labels = 0, rows = 0;
  std::vector<float> a, b;  // A (rank, hidden) and B (labels, rank), row-major
  long best_step = 0;
  double dev_before = 0, dev_after = 0, seconds_steps = 0;
};

// the first `rows` rows of a split through `features`, under the state the program holds (g, lr: its pending update)
ReadoutRows readout_rows(Program& p, const Split& s, int64_t rows, std::vector<float>& g, double lr);

// prge.zo.readout.basis: (rank, H) row-major, zero rows past the features' numerical rank
std::vector<float> readout_basis(const ReadoutRows& train, int64_t rank);

// prge.zo.readout.fit_features: `order` holds steps x 16 row indices into `train` (the plan's readout_indices)
ReadoutFit fit_readout_rows(Program& p, const ReadoutRows& train, const ReadoutRows& dev, const std::vector<int64_t>& order,
                            const ReadoutSettings& s, long long seed, double eps, double softcap);

}  // namespace prge
