#include "readout.h"

#include <Eigen/SVD>

#include <algorithm>
#include <cmath>

#include "files.h"

namespace prge {

ReadoutRows readout_rows(Program& p, const Split& s, int64_t rows, std::vector<float>& g, double lr) {
  const Description& d = p.description();
  const int64_t N = d.N, T = d.T, K = d.K, n = std::min(rows, s.n);
  ReadoutRows out;
  out.n = n;
  out.labels = p.output_shape("features", 0).at(1);
  out.hidden = p.output_shape("features", 1).at(1);
  std::vector<float> lr1 = {float(lr)};
  int32_t n32 = int32_t(N), t32 = int32_t(T), q32 = int32_t(d.q);
  for (int64_t start = 0; start < n; start += N) {
    Batch b = in_order_batch(s, start, n, N, T, K);
    auto res = p.run("features", {i64_tensor(b.rows.ids, {n32, t32}), i64_tensor(b.pos1, {n32, 1}), f32_tensor(g, {q32}), f32_tensor(lr1, {1})});
    out.base.insert(out.base.end(), res.at(0).begin(), res.at(0).begin() + b.k * out.labels);
    out.h.insert(out.h.end(), res.at(1).begin(), res.at(1).begin() + b.k * out.hidden);
    out.y.insert(out.y.end(), b.rows.label.begin(), b.rows.label.begin() + b.k);
  }
  return out;
}

std::vector<float> readout_basis(const ReadoutRows& tr, int64_t rank) {
  const int64_t n = tr.n, H = tr.hidden;
  Eigen::MatrixXd x(n, H);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < H; ++k) x(i, k) = tr.h[size_t(i * H + k)];
  Eigen::BDCSVD<Eigen::MatrixXd> svd(x, Eigen::ComputeThinV);
  const Eigen::VectorXd& s = svd.singularValues();
  const Eigen::MatrixXd& v = svd.matrixV();  // (H, min(n, H)): the right singular vectors as columns, s descending
  int64_t r = 0;
  for (int64_t j = 0; j < s.size(); ++j) r += s(j) > s(0) * 1e-6;
  r = std::min(r, rank);
  std::vector<float> a(size_t(rank * H), 0.0f);
  for (int64_t j = 0; j < r; ++j) {
    int64_t at = 0;  // the largest-magnitude entry (the first on a tie) is made positive
    for (int64_t k = 1; k < H; ++k)
      if (std::fabs(v(k, j)) > std::fabs(v(at, j))) at = k;
    double sign = v(at, j) < 0 ? -1.0 : 1.0, rms = s(j) / std::sqrt(double(std::max<int64_t>(n, 1)));
    for (int64_t k = 0; k < H; ++k) a[size_t(j * H + k)] = float(sign * v(k, j) / rms);
  }
  return a;
}

namespace {

// f = h A^T (n, R)
std::vector<float> project(const ReadoutRows& x, const std::vector<float>& a, int64_t R) {
  const int64_t H = x.hidden;
  std::vector<float> f(size_t(x.n * R));
  for (int64_t i = 0; i < x.n; ++i)
    for (int64_t j = 0; j < R; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < H; ++k) acc += double(x.h[size_t(i * H + k)]) * double(a[size_t(j * H + k)]);
      f[size_t(i * R + j)] = float(acc);
    }
  return f;
}

}  // namespace

ReadoutFit fit_readout_rows(Program& p, const ReadoutRows& train, const ReadoutRows& dev, const std::vector<int64_t>& order,
                            const ReadoutSettings& st, long long seed, double eps, double softcap) {
  double t0 = now();
  auto in = p.input_shapes("readout_step");  // f (16, R), base (16, L), y (16,), b (L, R), key (2,), eps (1,), lr (1,)
  const int64_t B = in.at(0).at(0), R = in.at(0).at(1), L = train.labels;
  if (in.at(1).at(1) != L) fail("the program's readout_step reads " + std::to_string(in[1][1]) + " label words, its features " + std::to_string(L));
  if (int64_t(order.size()) < st.steps * B) fail("the plan's readout_indices are fewer than --readout-steps x " + std::to_string(B));
  ReadoutFit fit;
  fit.rank = R;
  fit.hidden = train.hidden;
  fit.labels = L;
  fit.rows = train.n;
  fit.a = readout_basis(train, R);
  std::vector<float> f_tr = project(train, fit.a, R), f_dv = project(dev, fit.a, R);
  float cap = float(softcap);
  auto dev_acc = [&](const std::vector<float>& b) {  // as torch computes it: a float32 mean of the hits
    float hits = 0;
    for (int64_t i = 0; i < dev.n; ++i) {
      int64_t arg = 0;
      float best = 0;
      for (int64_t k = 0; k < L; ++k) {
        double acc = 0;
        for (int64_t j = 0; j < R; ++j) acc += double(f_dv[size_t(i * R + j)]) * double(b[size_t(k * R + j)]);
        float x = dev.base[size_t(i * L + k)] + float(acc);
        if (softcap > 0) x = std::tanh(x / cap) * cap;
        if (k == 0 || x > best) { best = x; arg = k; }
      }
      hits += arg == dev.y[size_t(i)];
    }
    return double(hits / float(std::max<int64_t>(dev.n, 1)));
  };
  std::vector<float> b(size_t(L * R), 0.0f), fb(size_t(B * R)), baseb(size_t(B * L));
  std::vector<int64_t> yb(static_cast<size_t>(B)), key(2);
  std::vector<float> eps1 = {float(eps)}, lr1 = {float(st.lr)};
  fit.dev_before = fit.dev_after = dev_acc(b);
  fit.b = b;
  int32_t b32 = int32_t(B), r32 = int32_t(R), l32 = int32_t(L);
  for (long t = 1; t <= st.steps; ++t) {
    for (int64_t i = 0; i < B; ++i) {
      int64_t row = order[size_t((t - 1) * B + i)];
      std::copy_n(f_tr.begin() + row * R, R, fb.begin() + i * R);
      std::copy_n(train.base.begin() + row * L, L, baseb.begin() + i * L);
      yb[size_t(i)] = train.y[size_t(row)];
    }
    key = {seed, t};
    b = p.run("readout_step", {f32_tensor(fb, {b32, r32}), f32_tensor(baseb, {b32, l32}), i64_tensor(yb, {b32}), f32_tensor(b, {l32, r32}),
                               i64_tensor(key, {2}), f32_tensor(eps1, {1}), f32_tensor(lr1, {1})})
            .at(0);
    if (t % READOUT_EVAL_EVERY == 0 || t == st.steps) {
      double acc = dev_acc(b);
      if (acc > fit.dev_after) {
        fit.dev_after = acc;
        fit.b = b;
        fit.best_step = t;
      }
    }
  }
  fit.seconds_steps = now() - t0;
  return fit;
}

}  // namespace prge
