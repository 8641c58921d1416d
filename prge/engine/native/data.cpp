#include "data.h"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "files.h"
#include "safetensors.h"

namespace prge {

using nlohmann::json;

// IDENTITY of prge/engine/formats.py: the fields that must agree between a program and its data
static const char* const IDENTITY[] = {"model", "vocab_size", "vocab_sha256", "pad_id", "batch_size", "max_length",
                                       "answer_slots", "q", "loss", "label_ids", "layers"};

namespace {

void check_identity(const std::string& path, const json& meta, const Description& p) {
  // the shapes first: the program's own numbers name the difference
  const std::pair<const char*, int64_t> shapes[] = {
      {"batch_size", p.b}, {"max_length", p.T}, {"answer_slots", p.K}, {"q", p.q}, {"vocab_size", p.vocab}};
  for (auto& [key, value] : shapes)
    if (meta.contains(key) && meta[key].is_number_integer() && meta[key].get<int64_t>() != value)
      fail("the program does not match the data: " + std::string(key) + " is " + std::to_string(value) + " in the program but " +
           meta[key].dump() + " in " + path + " (re-export the program or write the data for it)");
  std::string data_identity = meta.value("identity_sha256", "");
  if (!p.identity.empty() && !data_identity.empty()) {
    if (data_identity != p.identity)
      fail("the program does not match the data: " + path + " was written for another program (identity hash " +
           data_identity.substr(0, 12) + " vs the program's " + p.identity.substr(0, 12) +
           "; model, tokenizer, loss, label words or LoRA layers differ) (re-export the program or write the data for it)");
    return;
  }
  if (p.manifest.is_null()) return;  // a self-described program and data without a hash: shapes checked above
  for (const char* key : IDENTITY)
    if (p.manifest.contains(key) && meta.contains(key) && p.manifest[key] != meta[key])
      fail("the program does not match the data: " + std::string(key) + " differs (re-export the program or write the data for it)");
}

void read_split(const SafetensorsFile& f, const std::string& s, Split& out, const Description& p) {
  out.ids = f.ints(s + "_input_ids");
  out.pos = f.ints(s + "_target_pos");
  out.tids = f.ints(s + "_target_ids");
  out.mask = f.floats(s + "_target_mask");
  out.label = f.ints(s + "_label");
  const auto& sh = f.find(s + "_input_ids")->shape;
  const auto& ph = f.find(s + "_target_pos")->shape;
  if (sh.size() != 2 || ph.size() != 2) fail(f.path + ": " + s + " tensors have the wrong rank");
  out.n = sh[0];
  if (sh[1] != p.T || ph[1] != p.K)
    fail(f.path + ": " + s + " examples are padded to max_length T=" + std::to_string(sh[1]) + ", K=" + std::to_string(ph[1]) +
         "; the program takes T=" + std::to_string(p.T) + ", K=" + std::to_string(p.K));
  if (ph[0] != out.n || int64_t(out.tids.size()) != out.n * p.K || int64_t(out.mask.size()) != out.n * p.K ||
      int64_t(out.label.size()) != out.n)
    fail(f.path + ": " + s + " tensors disagree in length");
  for (auto v : out.ids)
    if (v < 0 || v >= p.vocab) fail(f.path + ": token ids outside the program's vocabulary");
  for (auto v : out.pos)
    if (v < 0 || v >= p.T) fail(f.path + ": target positions outside the sequence");
}

}  // namespace

Data read_data(const std::string& path, const Description& p) {
  SafetensorsFile f = read_safetensors(path, "data file");
  auto raw = f.metadata.find("prge");
  if (raw == f.metadata.end() || !raw->is_string()) fail(path + " is not a prge engine data file (no 'prge' metadata)");
  json meta = json::parse(raw->get<std::string>(), nullptr, false);
  if (meta.is_discarded() || !meta.is_object() || meta.value("format", "") != "prge-engine-data")
    fail(path + " is not a prge engine data file");
  check_identity(path, meta, p);
  Data d;
  if (!f.find("train_input_ids")) fail(path + ": no train examples");
  read_split(f, "train", d.train, p);
  if (f.find("dev_input_ids")) read_split(f, "dev", d.dev, p);
  if (d.train.n == 0) fail(path + ": no training examples");
  return d;
}

std::vector<int64_t> read_plan(const std::string& path, long long seed, long steps, int64_t b, int64_t n_train) {
  SafetensorsFile f = read_safetensors(path, "plan file");
  const TensorInfo* t = f.find("indices");
  if (!t || t->shape.size() != 2) fail(path + " is not a prge step plan (no indices (steps, b))");
  if (t->shape[1] != b)
    fail(path + ": the plan has " + std::to_string(t->shape[1]) + " examples per step, the program takes b=" + std::to_string(b));
  auto plan_seed = f.ints("seed");
  if (plan_seed.size() != 1 || plan_seed[0] != seed)
    fail(path + " was made for another seed (write the plan for --seed " + std::to_string(seed) + ")");
  if (t->shape[0] < steps)
    fail(path + " covers " + std::to_string(t->shape[0]) + " steps, fewer than --steps " + std::to_string(steps));
  auto plan = f.ints("indices");
  for (auto v : plan)
    if (v < 0 || v >= n_train) fail(path + ": example index outside the training data (a plan for other data)");
  return plan;
}

std::vector<int64_t> read_readout_order(const std::string& path, int64_t count, int64_t n_rows) {
  SafetensorsFile f = read_safetensors(path, "plan file");
  if (!f.find("readout_indices")) fail(path + " has no readout_indices (write the plan with the readout settings)");
  auto order = f.ints("readout_indices");
  if (int64_t(order.size()) < count)
    fail(path + " holds " + std::to_string(order.size()) + " readout rows, fewer than --readout-steps x 16 = " + std::to_string(count));
  for (auto v : order)
    if (v < 0 || v >= n_rows) fail(path + ": a readout row outside the first --readout-rows training rows (a plan for other settings)");
  return order;
}

Rows gather(const Split& s, const std::vector<int64_t>& idx, int64_t T, int64_t K) {
  Rows r;
  for (int64_t i : idx) {
    r.ids.insert(r.ids.end(), s.ids.begin() + i * T, s.ids.begin() + (i + 1) * T);
    r.pos.insert(r.pos.end(), s.pos.begin() + i * K, s.pos.begin() + (i + 1) * K);
    r.tids.insert(r.tids.end(), s.tids.begin() + i * K, s.tids.begin() + (i + 1) * K);
    r.mask.insert(r.mask.end(), s.mask.begin() + i * K, s.mask.begin() + (i + 1) * K);
    r.label.push_back(s.label[size_t(i)]);
  }
  return r;
}

Batch in_order_batch(const Split& s, int64_t start, int64_t n, int64_t N, int64_t T, int64_t K) {
  Batch b;
  b.k = std::min(N, n - start);
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < N; ++i) idx.push_back(i < b.k ? start + i : start);
  b.rows = gather(s, idx, T, K);
  b.pos1.resize(size_t(N));
  for (int64_t i = 0; i < N; ++i) b.pos1[size_t(i)] = b.rows.pos[size_t(i * K)];
  return b;
}

}  // namespace prge
