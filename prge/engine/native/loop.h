// The training loop: prge/run/loop.py's rules (cadence, resume, best/last checkpoints, metrics rows)
// around the program's train_step, with g_i = (L+_i - L-_i) / 2eps computed here as in
// prge.zo.estimator.projected_grad.
#pragma once

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "data.h"
#include "files.h"
#include "options.h"
#include "program.h"
#include "readout.h"

namespace prge {

class Loop {
 public:
  explicit Loop(const Options& o);
  int run();

 private:
  struct Eval {
    double accuracy, loss;
    int64_t n;
    std::vector<double> label_share;  // classification only
  };
  Eval evaluate(long g_step);  // with the clean B: step g_step's pending update folded in
  double step(long step);      // one train_step; returns the mean loss and sets g
  void save_checkpoint(const std::string& folder, long step);
  long resume(const std::string& ckpts);
  nlohmann::ordered_json readout(const std::string& ckpts);  // the label readout on checkpoints/best (readout.h)
  void finish(long start, long end, double step_time, long timed, double last_acc);

  Options o_;
  double rss_start_ = rss_mb();  // the runtime alone, before the program (initialised first)
  RssParts parts_start_ = rss_parts("");  // the same, by kind
  Program prog_;
  const Description& d_;
  Data data_;
  std::vector<int64_t> plan_;
  bool classify_ = true;
  int64_t n_labels_ = 0;
  std::vector<float> g_;  // the last step's q projected gradients
  std::vector<int64_t> readout_order_;  // the plan's readout_indices (--readout R > 0)
  // loop state (LOOP_STATE of prge/run/loop.py)
  double best_acc_ = -1, before_ = 0, before_loss_ = 0, seconds_ = 0;
  long best_step_ = 0;
  bool has_before_ = false;
  double rss_loaded_ = 0;  // after loading the program, its methods and the data
  RssParts parts_loaded_;  // the same, by kind (rss_parts)
};

}  // namespace prge
