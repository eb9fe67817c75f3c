// mxmask_group_norm: GroupNorm with its per-channel affine, for CPU, forward and backward.
//
//   mxmask_group_norm(data (N, C, ...) float32, gamma (C,), beta (C,), num_groups, eps)
//       -> y (N, C, ...), mean (N * G,), rstd (N * G,)
//
// Per (sample, group) of C / G channels: x_hat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps)
// with the biased variance, then y = x_hat * gamma[c] + beta[c]: what mxmask.modeling.norm's
// GroupNorm computes with a LayerNorm over the rows of (N * G, C / G * H * W) and an
// inference-mode BatchNorm for the affine. mean and rstd are outputs so that the backward does
// not recompute them (callers use y only); it recomputes x_hat from data, mean and rstd.
//
// Why: MXNet 1.9.1's LayerNorm backward takes its reductions through generic broadcast kernels,
// and the separate affine costs one more operator and pass over the data forward and backward
// per layer; here each group's statistics and gradients are one pass over contiguous memory, in
// parallel over the groups (docs/kernels.md, "The compiled CPU operators").
#include <omp.h>

#include <cmath>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"
#include "common.h"

using namespace mxnet::ext;

namespace {

struct Shape {
  int64_t n, c, g, spatial;   // spatial: product of the axes after C
  int64_t group_size() const { return c / g * spatial; }
};

Shape GetShape(const MXTensor& data, const std::unordered_map<std::string, std::string>& attrs) {
  Shape s;
  s.n = data.shape[0];
  s.c = data.shape[1];
  s.spatial = 1;
  for (size_t i = 2; i < data.shape.size(); ++i) s.spatial *= data.shape[i];
  s.g = std::stoi(attrs.at("num_groups"));
  return s;
}

float Eps(const std::unordered_map<std::string, std::string>& attrs) {
  auto it = attrs.find("eps");
  return it == attrs.end() ? 1e-5f : std::stof(it->second);
}

MXReturnValue ParseAttrs(const std::unordered_map<std::string, std::string>& attrs,
                         int* num_in, int* num_out) {
  if (!attrs.count("num_groups") || std::stoi(attrs.at("num_groups")) <= 0) {
    MX_ERROR_MSG << "mxmask_group_norm: num_groups must be a positive integer";
    return MX_FAIL;
  }
  *num_in = 3;
  *num_out = 3;
  return MX_SUCCESS;
}

MXReturnValue InferType(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<int>* in_types, std::vector<int>* out_types) {
  return mxmask_ops::AllFloat32("mxmask_group_norm", *in_types, out_types);
}

MXReturnValue InferShape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in_shapes,
                         std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& d = in_shapes->at(0);
  const unsigned groups = std::stoi(attrs.at("num_groups"));
  if (d.size() < 2 || d[1] % groups != 0) {
    MX_ERROR_MSG << "mxmask_group_norm: expected data (N, C, ...) with C divisible by "
                 << "num_groups";
    return MX_FAIL;
  }
  for (int i = 1; i < 3; ++i) {
    const auto& p = in_shapes->at(i);
    if (p.size() != 1 || p[0] != d[1]) {
      MX_ERROR_MSG << "mxmask_group_norm: gamma and beta must have shape (C,) = (" << d[1]
                   << ",)";
      return MX_FAIL;
    }
  }
  out_shapes->at(0) = d;
  out_shapes->at(1) = {d[0] * groups};
  out_shapes->at(2) = {d[0] * groups};
  return MX_SUCCESS;
}

MXReturnValue Forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                      const OpResource& res) {
  const Shape s = GetShape(inputs->at(0), attrs);
  const float eps = Eps(attrs);
  const float* x = inputs->at(0).data<float>();
  const float* gamma = inputs->at(1).data<float>();
  const float* beta = inputs->at(2).data<float>();
  float* y = outputs->at(0).data<float>();
  float* mean_out = outputs->at(1).data<float>();
  float* rstd_out = outputs->at(2).data<float>();
  const int64_t L = s.group_size();
  const int64_t cg = s.c / s.g;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ng = 0; ng < s.n * s.g; ++ng) {
    const float* xg = x + ng * L;
    double sum = 0.0;
    for (int64_t i = 0; i < L; ++i) sum += xg[i];
    const double mean = sum / L;
    double sq = 0.0;
    for (int64_t i = 0; i < L; ++i) {
      const double d = xg[i] - mean;
      sq += d * d;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / L + eps));
    const float m = static_cast<float>(mean);
    mean_out[ng] = m;
    rstd_out[ng] = rstd;
    const int64_t c0 = (ng % s.g) * cg;
    for (int64_t j = 0; j < cg; ++j) {
      const float a = gamma[c0 + j], b = beta[c0 + j];
      const float* xc = xg + j * s.spatial;
      float* yc = y + ng * L + j * s.spatial;
      for (int64_t i = 0; i < s.spatial; ++i) yc[i] = (xc[i] - m) * rstd * a + b;
    }
  }
  return MX_SUCCESS;
}

// inputs: d_y, d_mean, d_rstd (ignored: mean and rstd are not used downstream), data, gamma,
// beta, y, mean, rstd; outputs: d_data, d_gamma, d_beta. Per group, with g = d_y * gamma[c]:
// d_data = rstd * (g - mean(g) - x_hat * mean(g * x_hat)); d_gamma[c] = sum over samples and
// positions of d_y * x_hat, d_beta[c] = sum of d_y (per-sample partial sums, then summed over
// the samples in a fixed order).
MXReturnValue Backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  const Shape s = GetShape(inputs->at(3), attrs);
  const float* dy = inputs->at(0).data<float>();
  const float* x = inputs->at(3).data<float>();
  const float* gamma = inputs->at(4).data<float>();
  const float* mean = inputs->at(7).data<float>();
  const float* rstd = inputs->at(8).data<float>();
  float* dx = outputs->at(0).data<float>();
  float* dgamma = outputs->at(1).data<float>();
  float* dbeta = outputs->at(2).data<float>();
  const int64_t L = s.group_size();
  const int64_t cg = s.c / s.g;
  std::vector<double> sum_dy(s.n * s.c), sum_dyx(s.n * s.c);   // per (sample, channel)
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ng = 0; ng < s.n * s.g; ++ng) {
    const int64_t n = ng / s.g, c0 = (ng % s.g) * cg;
    const float m = mean[ng], r = rstd[ng];
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t j = 0; j < cg; ++j) {
      const float* dyc = dy + ng * L + j * s.spatial;
      const float* xc = x + ng * L + j * s.spatial;
      double a = 0.0, b = 0.0;
      for (int64_t i = 0; i < s.spatial; ++i) {
        a += dyc[i];
        b += dyc[i] * ((xc[i] - m) * r);
      }
      sum_dy[n * s.c + c0 + j] = a;
      sum_dyx[n * s.c + c0 + j] = b;
      sum_g += a * gamma[c0 + j];
      sum_gx += b * gamma[c0 + j];
    }
    const float mean_g = static_cast<float>(sum_g / L);
    const float mean_gx = static_cast<float>(sum_gx / L);
    for (int64_t j = 0; j < cg; ++j) {
      const float gm = gamma[c0 + j];
      const float* dyc = dy + ng * L + j * s.spatial;
      const float* xc = x + ng * L + j * s.spatial;
      float* dxc = dx + ng * L + j * s.spatial;
      for (int64_t i = 0; i < s.spatial; ++i) {
        const float xh = (xc[i] - m) * r;
        dxc[i] = r * (dyc[i] * gm - mean_g - xh * mean_gx);
      }
    }
  }
  for (int64_t c = 0; c < s.c; ++c) {
    double a = 0.0, b = 0.0;
    for (int64_t n = 0; n < s.n; ++n) {
      a += sum_dy[n * s.c + c];
      b += sum_dyx[n * s.c + c];
    }
    dbeta[c] = static_cast<float>(a);
    dgamma[c] = static_cast<float>(b);
  }
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(mxmask_group_norm)
.setParseAttrs(ParseAttrs)
.setInferType(InferType)
.setInferShape(InferShape)
.setForward(Forward, "cpu")
.setBackward(Backward, "cpu");
