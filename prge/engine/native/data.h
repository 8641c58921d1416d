// The pre-tokenised data file (prge.engine.formats.write_dataset) and the step plan
// (prge.engine.native.write_plan), checked against the program they are fed to.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "program.h"

namespace prge {

struct Split {  // one split's examples, padded to the program's (T, K)
  int64_t n = 0;
  std::vector<int64_t> ids, pos, tids, label;
  std::vector<float> mask;
};

struct Rows {  // a batch in the program's input types
  std::vector<int64_t> ids, pos, tids, label;
  std::vector<float> mask;
};

struct Data {
  Split train, dev;
};

// Refuses data written for another program: by the identity hash when both carry one, else by the
// manifest's identity fields.
Data read_data(const std::string& path, const Description& program);

// The example indices of steps 1..steps, (steps, b) row-major; refuses a plan for another seed, b or data.
std::vector<int64_t> read_plan(const std::string& path, long long seed, long steps, int64_t b, int64_t n_train);

// the plan's readout_indices: `count` row indices into the first `n_rows` training rows (prge.zo.readout.rows_order)
std::vector<int64_t> read_readout_order(const std::string& path, int64_t count, int64_t n_rows);

Rows gather(const Split& s, const std::vector<int64_t>& idx, int64_t T, int64_t K);

struct Batch {  // one static batch of an in-order pass over a split (evaluation, the readout's hidden states)
  Rows rows;
  std::vector<int64_t> pos1;  // each row's first target position: a classification program's (N, 1) input
  int64_t k = 0;              // the real rows; the rest of the N repeat the first
};

// Rows start .. start+N-1 of the first n rows, as the program's static batch of N: a last batch short of N
// is filled with a repeat of its first row, whose results the caller drops (it reads the first k).
Batch in_order_batch(const Split& s, int64_t start, int64_t n, int64_t N, int64_t T, int64_t K);

}  // namespace prge
