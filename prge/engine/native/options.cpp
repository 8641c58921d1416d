#include "options.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include "files.h"
#include "sha256.h"

namespace prge {

const char* const USAGE =
    "usage: prge-native-train --program X.pte --data D.safetensors --plan P.safetensors --out DIR\n"
    "                         --steps N --lr LR --eps EPS [--seed S] [--eval-every E] [--checkpoint-every C] [--normalize]\n"
    "                         [--lr-schedule constant|linear|cosine] [--resume] [--stop-after K] [--weight-cache on|off]\n"
    "                         [--readout R --readout-steps S --readout-lr LR --readout-rows N]\n";

Options parse_args(int argc, char** argv) {
  Options o;
  bool have_lr = false, have_eps = false;
  auto value = [&](int& i, const std::string& flag) -> std::string {
    if (i + 1 >= argc) throw Fail(flag + " needs a value", 2);
    return argv[++i];
  };
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--program") o.program = value(i, a);
      else if (a == "--data") o.data = value(i, a);
      else if (a == "--plan") o.plan = value(i, a);
      else if (a == "--out") o.out = value(i, a);
      else if (a == "--steps") o.steps = std::stol(value(i, a));
      else if (a == "--lr") { o.lr = std::stod(value(i, a)); have_lr = true; }
      else if (a == "--eps") { o.eps = std::stod(value(i, a)); have_eps = true; }
      else if (a == "--lr-schedule") o.lr_schedule = value(i, a);
      else if (a == "--seed") o.seed = std::stoll(value(i, a));
      else if (a == "--eval-every") o.eval_every = std::stol(value(i, a));
      else if (a == "--checkpoint-every") o.checkpoint_every = std::stol(value(i, a));
      else if (a == "--stop-after") o.stop_after = std::stol(value(i, a));
      else if (a == "--readout") o.readout.rank = std::stol(value(i, a));
      else if (a == "--readout-steps") o.readout.steps = std::stol(value(i, a));
      else if (a == "--readout-lr") o.readout.lr = std::stod(value(i, a));
      else if (a == "--readout-rows") o.readout.rows = std::stol(value(i, a));
      else if (a == "--normalize") o.normalize = true;
      else if (a == "--resume") o.resume = true;
      else if (a == "--weight-cache") {
        std::string v = value(i, a);
        if (v != "on" && v != "off") throw Fail("--weight-cache takes on or off", 2);
        o.weight_cache = v == "on";
      } else if (a == "-h" || a == "--help") {
        fputs(USAGE, stdout);
        fputs(hashing_available() ? "SHA-256: the program, data, plan and checkpoint files are checked against the hashes prge recorded\n"
                                  : "SHA-256: not checked (built without OpenSSL's libcrypto): sizes and shapes only\n",
              stdout);
        exit(0);
      } else {
        throw Fail("unknown argument " + a, 2);
      }
    }
  } catch (const std::invalid_argument&) {
    throw Fail("a numeric option has a non-numeric value", 2);
  } catch (const std::out_of_range&) {
    throw Fail("a numeric option is out of range", 2);
  }
  if (o.program.empty() || o.data.empty() || o.plan.empty() || o.out.empty() || o.steps < 0 || !have_lr || !have_eps)
    throw Fail("--program, --data, --plan, --out, --steps, --lr and --eps are required", 2);
  if (!(o.eps > 0) || o.eval_every < 0 || o.checkpoint_every < 0 || o.stop_after < 0)
    throw Fail("bad loop settings: pass --eps > 0, --eval-every >= 0, --checkpoint-every >= 0, --stop-after >= 0", 2);
  const ReadoutSettings& r = o.readout;
  if (r.rank < 0 || (r.rank > 0 && (r.steps < 0 || r.rows < 1 || !(r.lr > 0) || !std::isfinite(r.lr))))
    throw Fail("bad readout settings: pass --readout R >= 0 and, with R > 0, --readout-steps >= 0, --readout-rows >= 1, --readout-lr > 0", 2);
  if (o.lr_schedule != "constant" && o.lr_schedule != "linear" && o.lr_schedule != "cosine")
    throw Fail("unknown --lr-schedule " + o.lr_schedule + " (constant, linear or cosine)", 2);
  return o;
}

double lr_at(const Options& o, long step) {
  if (o.lr_schedule == "constant" || step < 1 || o.steps < 1) return o.lr;
  double x = double(step - 1) / double(o.steps);
  return o.lr_schedule == "linear" ? o.lr * (1.0 - x) : o.lr * 0.5 * (1.0 + std::cos(std::acos(-1.0) * x));
}

}  // namespace prge
