// The command line of prge-native-train, and the learning-rate schedule it implies.
#pragma once

#include <string>

namespace prge {

struct ReadoutSettings {  // --readout R (0: off), --readout-steps, --readout-lr, --readout-rows (readout.h)
  long rank = 0, steps = 0, rows = 0;
  double lr = 0;
};

struct Options {
  std::string program, data, plan, out;
  long steps = -1, eval_every = 50, checkpoint_every = 25, stop_after = 0;
  double lr = 0, eps = 0;
  std::string lr_schedule = "constant";
  long long seed = 0;
  bool normalize = false, resume = false;
  bool weight_cache = true;  // share XNNPACK's packed weights across the program's methods
  ReadoutSettings readout;   // the label readout after the loop (rank 0: none)
};

extern const char* const USAGE;

Options parse_args(int argc, char** argv);  // throws Fail(..., 2) on bad arguments

// prge.zo.schedule.lr_at: the lr of the update made from step `step`'s g (the same double arithmetic)
double lr_at(const Options& o, long step);

}  // namespace prge
