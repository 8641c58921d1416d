// prge-native-train: the P-RGE device loop (prge/engine/runtime.py's device_train) in C++, linking only
// the ExecuTorch runtime, its optimized kernels and the XNNPACK backend of the executorch pip wheel.
//
//   prge-native-train --program X.pte --data D.safetensors --plan P.safetensors --out DIR
//                     --steps N --lr LR --eps EPS [--seed S] [--eval-every E] [--checkpoint-every C] [--normalize]
//                     [--lr-schedule constant|linear|cosine] [--resume] [--stop-after K] [--weight-cache on|off]
//                     [--readout R --readout-steps S --readout-lr LR --readout-rows N]
//
// Inputs: X.pte (`prge export`; it describes itself: shapes and an identity hash as constant methods,
// and its manifest X.pte.json beside it names its size and hash), the pre-tokenised data
// (prge.engine.formats.write_dataset) and the step plan (prge.engine.native.write_plan: the example
// indices of every step, which Python's seeded shuffles pick). Outputs, in DIR (as device_train,
// except that B is written flat and `prge.engine.native` turns it into PEFT adapters):
//   metrics.jsonl                      one row per step and per evaluation
//   checkpoints/last|best/             state.safetensors {raw, g}, trainer_state.json, b.safetensors {b}
//   final_b.safetensors                {b (total,), g (q,)}: the clean B after the last step
//   native.json                        steps, seconds, mean step seconds, peak RSS, dev accuracies (and the
//                                      label readout's figures, with --readout R > 0)
//   readout.safetensors                {a (R*H,), b (L*R,), lora_b (total,)}: the label readout fitted after the
//                                      loop (readout.cpp) and the LoRA B of the state it was fitted on
// Every file is written atomically. Any error: one line "prge-native-train: error: ..." on stderr and
// exit status 1 (2 for bad arguments).
//
// Files: options (command line, lr schedule), program (loading, self-description, calls), data (data
// file and plan), loop (prge/run/loop.py's rules), readout (the label readout after the loop),
// safetensors, files (atomic writes).
#include <cstdio>
#include <exception>

#include "files.h"
#include "loop.h"
#include "options.h"

int main(int argc, char** argv) {
  try {
    prge::Loop loop(prge::parse_args(argc, argv));
    return loop.run();
  } catch (const prge::Fail& e) {
    fprintf(stderr, "prge-native-train: error: %s\n", e.what());
    if (e.code == 2) fputs(prge::USAGE, stderr);
    return e.code;
  } catch (const std::exception& e) {
    fprintf(stderr, "prge-native-train: error: %s\n", e.what());
    return 1;
  }
}
