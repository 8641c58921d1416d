#include "loop.h"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>

#include "files.h"
#include "safetensors.h"

namespace prge {

using json = nlohmann::ordered_json;

namespace {

std::vector<float> scalar(double x) { return {float(x)}; }

struct Saved {  // a checkpoint folder's trainer_state.json and state.safetensors
  json state;
  long step;
  std::vector<float> raw, g;
};

Saved load_saved(const std::string& folder) {
  std::string path = folder + "/trainer_state.json";
  Saved s;
  s.state = json::parse(read_file(path, "checkpoint state"), nullptr, false);
  if (s.state.is_discarded() || !s.state.is_object() || !s.state.contains("step") || !s.state["step"].is_number_integer())
    fail(path + " is damaged (delete the checkpoint folder and start again, or restore it)");
  s.step = s.state["step"].get<long>();
  SafetensorsFile f = read_safetensors(folder + "/state.safetensors", "checkpoint");
  s.raw = f.floats("raw");
  s.g = f.floats("g");
  return s;  // the file's bytes are freed here, before write_raw touches the arena
}

json eval_row(long step, int64_t n, double accuracy, double loss, const std::vector<double>& share) {
  json row = {{"step", step}, {"split", "dev"}, {"accuracy", accuracy}, {"loss", loss}, {"n", n}};
  if (!share.empty()) row["label_share"] = share;
  return row;
}

}  // namespace

Loop::Loop(const Options& o)
    : o_(o), prog_(o.program, o.weight_cache), d_(prog_.description()), g_(size_t(prog_.description().q), 0.0f) {
  if (o_.normalize && d_.q < 2) fail("--normalize needs q >= 2");
  if (o_.eps < d_.min_eps) {
    char msg[256];
    snprintf(msg, sizeof msg, "--eps %g is below what this program's quantised base resolves (min_eps %g): pass --eps %g or larger, "
             "or export with --quantize none", o_.eps, d_.min_eps, d_.min_eps);
    throw Fail(msg, 2);
  }
  data_ = read_data(o_.data, d_);
  plan_ = read_plan(o_.plan, o_.seed, o_.steps, d_.b, data_.train.n);
  auto es = prog_.input_shapes("evaluate");
  classify_ = es.size() == 4;
  if (!classify_ && es.size() != 6) fail(o_.program + ": evaluate takes " + std::to_string(es.size()) + " inputs, expected 4 or 6");
  if (classify_) {
    auto so = prog_.output_shape("evaluate", 0);
    n_labels_ = so.size() == 2 ? so[1] : 0;
    for (const Split* s : {&data_.train, &data_.dev})
      for (auto v : s->label)
        if (v < 0 || v >= n_labels_) fail(o_.data + ": class labels outside the program's label words");
  }
  if (o_.readout.rank > 0) {
    if (!prog_.has("features") || !prog_.has("readout_step"))
      throw Fail("--readout " + std::to_string(o_.readout.rank) + " needs the program's features and readout_step methods, which " + o_.program +
                 " lacks: export it again with this prge (a classification task, --loss class), or pass --readout 0", 2);
    auto in = prog_.input_shapes("readout_step");
    if (in.at(0).at(1) != o_.readout.rank)
      throw Fail("--readout " + std::to_string(o_.readout.rank) + ", but the program's readout_step is exported for rank " +
                 std::to_string(in[0][1]) + ": pass --readout " + std::to_string(in[0][1]) + ", or export with --readout " +
                 std::to_string(o_.readout.rank), 2);
    readout_order_ = read_readout_order(o_.plan, o_.readout.steps * in[0][0], std::min<int64_t>(o_.readout.rows, data_.train.n));
  }
  rss_loaded_ = rss_mb();
  parts_loaded_ = rss_parts(o_.program);
}

Loop::Eval Loop::evaluate(long g_step) {
  const int64_t N = d_.N, T = d_.T, K = d_.K;
  const Split& dev = data_.dev;
  double correct = 0, loss = 0, tokens = 0;
  std::vector<double> counts(size_t(std::max<int64_t>(n_labels_, 1)), 0.0);
  auto lr = scalar(lr_at(o_, g_step));
  int32_t n32 = int32_t(N), t32 = int32_t(T), k32 = int32_t(K), q32 = int32_t(d_.q);
  for (int64_t start = 0; start < dev.n; start += N) {
    Batch b = in_order_batch(dev, start, dev.n, N, T, K);
    const int64_t k = b.k;
    Rows& r = b.rows;
    if (classify_) {
      auto out = prog_.run("evaluate", {i64_tensor(r.ids, {n32, t32}), i64_tensor(b.pos1, {n32, 1}), f32_tensor(g_, {q32}),
                                        f32_tensor(lr, {1})});
      const auto& scores = out.at(0);
      for (int64_t i = 0; i < k; ++i) {
        const float* row = scores.data() + i * n_labels_;
        int64_t arg = 0;
        float mx = row[0];
        for (int64_t j = 1; j < n_labels_; ++j)
          if (row[j] > mx) { mx = row[j]; arg = j; }
        float s = 0;
        for (int64_t j = 0; j < n_labels_; ++j) s += std::exp(row[j] - mx);
        float lse = mx + std::log(s);
        correct += arg == r.label[size_t(i)];
        counts[size_t(arg)] += 1;
        loss += double(lse - row[r.label[size_t(i)]]);
        tokens += 1;
      }
    } else {
      auto out = prog_.run("evaluate", {i64_tensor(r.ids, {n32, t32}), i64_tensor(r.pos, {n32, k32}), i64_tensor(r.tids, {n32, k32}),
                                        f32_tensor(r.mask, {n32, k32}), f32_tensor(g_, {q32}), f32_tensor(lr, {1})});
      for (int64_t i = 0; i < k; ++i) {
        loss += out.at(0)[size_t(i)];
        correct += out.at(1)[size_t(i)];
        for (int64_t j = 0; j < K; ++j) tokens += r.mask[size_t(i * K + j)];
      }
    }
  }
  Eval e{correct / std::max(tokens, 1.0), loss / std::max(tokens, 1.0), dev.n, {}};
  if (classify_)
    for (auto c : counts) e.label_share.push_back(c / double(std::max<int64_t>(dev.n, 1)));
  return e;
}

double Loop::step(long step) {
  const int64_t b = d_.b, q = d_.q;
  std::vector<int64_t> idx(plan_.begin() + (step - 1) * b, plan_.begin() + step * b);
  Rows r = gather(data_.train, idx, d_.T, d_.K);
  std::vector<int64_t> key = {o_.seed, step};
  auto lr = scalar(lr_at(o_, step - 1));  // the pending update is step - 1's
  auto eps = scalar(o_.eps);
  int32_t b32 = int32_t(b), t32 = int32_t(d_.T), k32 = int32_t(d_.K), q32 = int32_t(q);
  auto losses = prog_.run("train_step", {i64_tensor(r.ids, {b32, t32}), i64_tensor(r.pos, {b32, k32}), i64_tensor(r.tids, {b32, k32}),
                                         f32_tensor(r.mask, {b32, k32}), i64_tensor(r.label, {b32}), f32_tensor(lr, {1}),
                                         f32_tensor(eps, {1}), f32_tensor(g_, {q32}), i64_tensor(key, {2})})
                    .at(0);
  if (int64_t(losses.size()) != 2 * q) fail("train_step returned " + std::to_string(losses.size()) + " losses, expected 2q");
  for (float v : losses)
    if (!std::isfinite(v))
      fail("non-finite loss at step " + std::to_string(step) + "; the last good checkpoint is kept in " + o_.out +
           "/checkpoints/last (lower --lr or --eps and resume)");
  // g_i = (L+_i - L-_i) / 2eps, or / (2 std(L)) with --normalize (estimator.projected_grad)
  float den = float(2.0 * o_.eps);
  if (o_.normalize) {
    double mean = 0, var = 0;
    for (float v : losses) mean += v;
    mean /= double(losses.size());
    for (float v : losses) var += (v - mean) * (v - mean);
    float sd = float(std::sqrt(var / double(losses.size() - 1)));
    den = 2.0f * std::max(sd, 1e-12f);
  }
  for (int64_t i = 0; i < q; ++i) g_[size_t(i)] = (losses[size_t(i)] - losses[size_t(q + i)]) / den;
  float sum = 0;
  for (float v : losses) sum += v;
  return double(sum / float(losses.size()));
}

void Loop::save_checkpoint(const std::string& folder, long step) {
  auto lr = scalar(lr_at(o_, step));  // g is this step's
  auto b = prog_.run("read_state", {f32_tensor(g_, {int32_t(d_.q)}), f32_tensor(lr, {1})}).at(0);
  json state = {{"step", step}, {"seed", o_.seed}, {"lr", o_.lr}, {"lr_schedule", o_.lr_schedule}, {"eps", o_.eps},
                {"normalize", o_.normalize}, {"program_sha256", d_.sha256.empty() ? json(nullptr) : json(d_.sha256)},
                {"best_accuracy", best_acc_}, {"best_step", best_step_},
                {"before", has_before_ ? json(before_) : json(nullptr)}, {"before_loss", has_before_ ? json(before_loss_) : json(nullptr)},
                {"seconds", seconds_}, {"native", true}};
  std::string tmp = temp_dir_beside(folder);
  try {
    // the raw state (76 MB for SmolLM2 at q = 4) is written from the arena, where read_raw leaves it, not copied
    auto raw = prog_.run_view("read_raw", {}).at(0);
    write_safetensors(tmp + "/state.safetensors", {{"raw", raw.data, raw.n}, {"g", g_}});
    atomic_write(tmp + "/trainer_state.json", state.dump(2) + "\n");
    write_safetensors(tmp + "/b.safetensors", {{"b", b}});
  } catch (...) {
    rmtree(tmp);
    throw;
  }
  commit_dir(tmp, folder);
}

// restore checkpoints/last (or the .old a kill mid-swap left); returns its step
long Loop::resume(const std::string& ckpts) {
  std::string last = ckpts + "/last";
  if (!exists(last) && is_dir(last + ".old")) last += ".old";
  Saved saved = load_saved(last);
  const json& st = saved.state;
  if (st.contains("seed") && st["seed"].is_number_integer() && st["seed"].get<long long>() != o_.seed)
    fail("the checkpoint was trained with seed " + st["seed"].dump() + ", not " + std::to_string(o_.seed) + " (resume with --seed " +
         st["seed"].dump() + ")");
  if (st.contains("program_sha256") && st["program_sha256"].is_string() && !d_.sha256.empty() && st["program_sha256"] != d_.sha256)
    fail("the checkpoint in " + last + " was written by another program (resume with the program that wrote it)");
  std::vector<float>& raw = saved.raw;
  g_ = saved.g;
  auto raw_shape = prog_.output_shape("read_raw", 0);
  if (raw_shape.size() != 1 || int64_t(raw.size()) != raw_shape[0] || int64_t(g_.size()) != d_.q)
    fail(last + "/state.safetensors does not hold this program's state (resume with the program that wrote it)");
  for (float v : raw)
    if (!std::isfinite(v)) fail("the checkpoint in " + last + " holds non-finite values");
  auto number = [&](const char* k, double& out) {
    if (st.contains(k) && st[k].is_number()) { out = st[k].get<double>(); return true; }
    return false;
  };
  number("best_accuracy", best_acc_);
  double best_step = double(best_step_);
  if (number("best_step", best_step)) best_step_ = long(best_step);
  has_before_ = number("before", before_);
  number("before_loss", before_loss_);
  number("seconds", seconds_);
  prog_.run("write_raw", {f32_tensor(raw, {int32_t(raw.size())})});
  long start = saved.step;
  // drop the metrics rows after the checkpoint (and a line torn by a kill), as io.truncate_metrics
  std::string metrics = o_.out + "/metrics.jsonl";
  if (exists(metrics)) {
    std::ifstream in(metrics);
    std::string line, kept;
    while (std::getline(in, line)) {
      json row = json::parse(line, nullptr, false);
      if (!row.is_discarded() && row.is_object() && row.contains("step") && row["step"].is_number() && row["step"].get<double>() <= start)
        kept += line + "\n";
    }
    atomic_write(metrics, kept);
  }
  fprintf(stderr, "resumed from %s at step %ld\n", last.c_str(), start);
  return start;
}

int Loop::run() {
  std::string ckpts = o_.out + "/checkpoints", metrics = o_.out + "/metrics.jsonl";
  // refuse an unwritable output folder before any work
  mkdirs(o_.out);
  atomic_write(o_.out + "/.prge-native-write-test", "");
  unlink((o_.out + "/.prge-native-write-test").c_str());

  bool has_dev = data_.dev.n > 0;
  long start = 0;
  if (o_.resume) {
    start = resume(ckpts);
  } else {
    unlink(metrics.c_str());
    if (has_dev) {
      Eval e = evaluate(0);
      before_ = best_acc_ = e.accuracy;
      before_loss_ = e.loss;
      has_before_ = true;
      append_line(metrics, eval_row(0, e.n, e.accuracy, e.loss, e.label_share).dump());
      fprintf(stderr, "before training: dev accuracy %.4f (n=%lld)\n", e.accuracy, (long long)e.n);
    }
    save_checkpoint(ckpts + "/best", 0);
    save_checkpoint(ckpts + "/last", 0);  // a kill before the first step keeps the evaluation
  }

  double t_loop = now() - seconds_, step_time = 0, last_acc = NAN;
  // never below the resumed step: a checkpoint must not be relabelled with an earlier step
  long end = o_.stop_after ? std::max(start, std::min(o_.steps, o_.stop_after)) : o_.steps, timed = 0;
  for (long s = start + 1; s <= end; ++s) {
    double t = now();
    double loss = step(s);
    double g_abs = 0;
    for (float v : g_) g_abs += std::fabs(v);
    double dt = now() - t;
    step_time += dt;
    ++timed;
    append_line(metrics, json({{"step", s}, {"loss", loss}, {"g_abs", g_abs / double(d_.q)}, {"seconds", dt}}).dump());
    if ((o_.eval_every && s % o_.eval_every == 0) || s == o_.steps) {
      seconds_ = now() - t_loop;
      if (has_dev) {
        Eval e = evaluate(s);
        last_acc = e.accuracy;
        append_line(metrics, eval_row(s, e.n, e.accuracy, e.loss, e.label_share).dump());
        if (e.accuracy > best_acc_) {
          best_acc_ = e.accuracy;
          best_step_ = s;
          save_checkpoint(ckpts + "/best", s);
        }
      }
      save_checkpoint(ckpts + "/last", s);
    } else if (o_.checkpoint_every && s % o_.checkpoint_every == 0 && s < end) {
      seconds_ = now() - t_loop;
      save_checkpoint(ckpts + "/last", s);
    }
  }
  seconds_ = now() - t_loop;
  finish(start, end, step_time, timed, last_acc);
  return 0;
}

// native.json, and final_b.safetensors (or, stopped early, the last checkpoint)
void Loop::finish(long start, long end, double step_time, long timed, double last_acc) {
  bool stopped = o_.stop_after && end < o_.steps;
  double rss = peak_rss_mb();
  json info = {{"steps", o_.steps}, {"ran_from", start}, {"ran_to", end}, {"seconds", seconds_},
               {"step_seconds", timed ? json(step_time / double(timed)) : json(nullptr)}, {"peak_rss_mb", rss},
               {"dev_before", has_before_ ? json(before_) : json(nullptr)},
               {"dev_after", std::isnan(last_acc) ? json(nullptr) : json(last_acc)}, {"best_dev", best_acc_},
               {"best_step", best_step_}, {"stopped", stopped}, {"weight_cache", o_.weight_cache},
               {"rss_start_mb", rss_start_}, {"rss_loaded_mb", rss_loaded_}};
  // what the resident memory is made of, at the start, after loading and now (after the last step)
  auto parts = [](const RssParts& p) { return json{{"anon_mb", p.anon_mb}, {"file_mb", p.file_mb}, {"program_file_mb", p.mapped_file_mb}}; };
  info["rss_parts"] = {{"start", parts(parts_start_)}, {"loaded", parts(parts_loaded_)}, {"end", parts(rss_parts(o_.program))}};
  if (stopped) {
    save_checkpoint(o_.out + "/checkpoints/last", end);
    atomic_write(o_.out + "/native.json", info.dump(2) + "\n");
    fprintf(stderr, "stopped after step %ld; resume with --resume\n", end);
    return;
  }
  auto lr = scalar(lr_at(o_, end));  // g is step end's
  auto b = prog_.run("read_state", {f32_tensor(g_, {int32_t(d_.q)}), f32_tensor(lr, {1})}).at(0);
  write_safetensors(o_.out + "/final_b.safetensors", {{"b", b}, {"g", g_}});
  fprintf(stderr, "native training done: %ld steps in %.1f s (%.4f s/step, peak RSS %.0f MB)\n", o_.steps, seconds_,
          timed ? step_time / double(timed) : 0.0, rss);
  if (o_.readout.rank > 0) info["readout"] = readout(o_.out + "/checkpoints");
  atomic_write(o_.out + "/native.json", info.dump(2) + "\n");
}

// prge.engine.runtime.fit_readout: the readout on the best checkpoint and, where that is past step 0, on the
// untrained state too (loading the readout's methods leaves the program in it); the better on dev is kept
// (prge.zo.readout.keep_untrained). Writes readout.safetensors {a (R*H,), b (L*R,), lora_b (total,)}: the
// readout's A and B, row-major, and the LoRA B of the state it was fitted on (zero where the untrained won).
json Loop::readout(const std::string& ckpts) {
  double t0 = now();
  std::string best_dir = ckpts + "/best";
  if (!exists(best_dir) && is_dir(best_dir + ".old")) best_dir += ".old";
  Saved best = load_saved(best_dir);
  if (int64_t(best.g.size()) != d_.q) fail(best_dir + "/state.safetensors does not hold this program's state");
  prog_.load("features");  // both before the state is written: loading a method re-initialises it
  prog_.load("readout_step");
  const ReadoutSettings& s = o_.readout;
  double softcap = 0;
  if (d_.manifest.is_object() && d_.manifest.contains("readout") && d_.manifest["readout"].is_object()) {
    const json& r = d_.manifest["readout"];
    if (r.contains("softcap") && r["softcap"].is_number()) softcap = r["softcap"].get<double>();
  }
  int32_t q32 = int32_t(d_.q);
  auto fit_here = [&](std::vector<float>& g, double lr, const std::string& where) {
    ReadoutRows tr = readout_rows(prog_, data_.train, s.rows, g, lr);
    ReadoutRows dv = data_.dev.n ? readout_rows(prog_, data_.dev, data_.dev.n, g, lr) : tr;
    ReadoutFit f = fit_readout_rows(prog_, tr, dv, readout_order_, s, o_.seed, o_.eps, softcap);
    fprintf(stderr, "label readout (rank %lld) on %s: dev %.4f -> %.4f (best of %ld steps at step %ld)\n", (long long)f.rank,
            where.c_str(), f.dev_before, f.dev_after, s.steps, f.best_step);
    return f;
  };
  ReadoutFit untrained;
  bool has_untrained = best.step > 0;
  std::vector<float> b0;
  if (has_untrained) {
    std::vector<float> g0(size_t(d_.q), 0.0f), lr0 = scalar(0.0);
    b0 = prog_.run("read_state", {f32_tensor(g0, {q32}), f32_tensor(lr0, {1})}).at(0);
    untrained = fit_here(g0, 0.0, "the untrained state");
  }
  prog_.run("write_raw", {f32_tensor(best.raw, {int32_t(best.raw.size())})});
  double lr_b = lr_at(o_, best.step);
  ReadoutFit fit = fit_here(best.g, lr_b, "the best checkpoint (step " + std::to_string(best.step) + ")");
  auto lr1 = scalar(lr_b);
  std::vector<float> b = prog_.run("read_state", {f32_tensor(best.g, {q32}), f32_tensor(lr1, {1})}).at(0);
  long step = best.step;
  double steps_s = fit.seconds_steps + (has_untrained ? untrained.seconds_steps : 0.0);
  if (has_untrained && untrained.dev_after > fit.dev_after) {
    fprintf(stderr, "keeping the readout on the untrained state (dev %.4f > %.4f): the best checkpoint's adapter gets B = 0\n",
            untrained.dev_after, fit.dev_after);
    fit = untrained;
    b = b0;
    step = 0;
  }
  write_safetensors(o_.out + "/readout.safetensors", {{"a", fit.a}, {"b", fit.b}, {"lora_b", b}});
  double seconds = now() - t0;
  fprintf(stderr, "label readout kept: dev %.4f -> %.4f; features %.0f s, steps %.1f s\n", fit.dev_before, fit.dev_after,
          seconds - steps_s, steps_s);
  return json{{"rank", fit.rank}, {"hidden", fit.hidden}, {"labels", fit.labels}, {"rows", fit.rows}, {"dev_before", fit.dev_before},
              {"dev_after", fit.dev_after}, {"best_step", fit.best_step}, {"steps", s.steps}, {"checkpoint_step", step},
              {"dev_after_untrained", has_untrained ? json(untrained.dev_after) : json(nullptr)},
              {"seconds_features", seconds - steps_s}, {"seconds_steps", steps_s}, {"peak_rss_mb", peak_rss_mb()}};
}

}  // namespace prge
