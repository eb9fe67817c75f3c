// mxmask_group_norm: the statistics half of GroupNorm for CPU, forward and backward.
//
//   mxmask_group_norm(data (N, C, ...) float32, num_groups, eps)
//       -> x_hat (N, C, ...), mean (N * G,), rstd (N * G,)
//
// Per (sample, group) of C / G channels: x_hat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps)
// with the biased variance: what mxmask.modeling.norm's GroupNorm computes with a LayerNorm
// over the rows of (N * G, C / G * H * W) before its per-channel affine. mean and rstd are
// outputs so that the backward does not recompute them (callers use x_hat only).
//
// Why: MXNet 1.9.1's LayerNorm backward takes its reductions through generic broadcast kernels
// (186 ms of the 1.0 s shapes training step for 28 layers); here each group's statistics and
// gradient are one pass over contiguous memory, in parallel over the groups.
#include <omp.h>

#include <cmath>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"

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
  *num_in = 1;
  *num_out = 3;
  return MX_SUCCESS;
}

MXReturnValue InferType(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<int>* in_types, std::vector<int>* out_types) {
  if (in_types->at(0) != kFloat32) {
    MX_ERROR_MSG << "mxmask_group_norm: data must be float32";
    return MX_FAIL;
  }
  for (auto& t : *out_types) t = kFloat32;
  return MX_SUCCESS;
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
  float* y = outputs->at(0).data<float>();
  float* mean_out = outputs->at(1).data<float>();
  float* rstd_out = outputs->at(2).data<float>();
  const int64_t L = s.group_size();
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
    float* yg = y + ng * L;
    for (int64_t i = 0; i < L; ++i) yg[i] = (xg[i] - m) * rstd;
  }
  return MX_SUCCESS;
}

// inputs: d_x_hat, d_mean, d_rstd (ignored: mean and rstd are not used downstream), data,
// x_hat, mean, rstd; output: d_data = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) per group.
MXReturnValue Backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  const Shape s = GetShape(inputs->at(3), attrs);
  const float* g = inputs->at(0).data<float>();
  const float* x_hat = inputs->at(4).data<float>();
  const float* rstd = inputs->at(6).data<float>();
  float* dx = outputs->at(0).data<float>();
  const int64_t L = s.group_size();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t ng = 0; ng < s.n * s.g; ++ng) {
    const float* gg = g + ng * L;
    const float* xh = x_hat + ng * L;
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t i = 0; i < L; ++i) {
      sum_g += gg[i];
      sum_gx += gg[i] * xh[i];
    }
    const float mean_g = static_cast<float>(sum_g / L);
    const float mean_gx = static_cast<float>(sum_gx / L);
    const float r = rstd[ng];
    float* dxg = dx + ng * L;
    for (int64_t i = 0; i < L; ++i) dxg[i] = r * (gg[i] - mean_g - xh[i] * mean_gx);
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
