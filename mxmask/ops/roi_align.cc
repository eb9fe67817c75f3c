// mxmask_roi_align: contrib.ROIAlign's forward and backward for CPU: a channel-vectorised
// forward that gives contrib.ROIAlign's outputs bit for bit, and a parallel backward.
//
//   mxmask_roi_align(data (B, C, H, W) float32, rois (R, 5) float32 [batch, x1, y1, x2, y2],
//                    pooled_h, pooled_w, spatial_scale, sample_ratio, aligned, layout="NCHW")
//       -> (R, C, pooled_h, pooled_w)
//   layout="NHWC": data is (B, H, W, C), already channels-last (mxmask_level_canvas).
//
// The same sampling as MXNet 1.9.1's contrib.ROIAlign (position_sensitive=False): roi scaled by
// spatial_scale (minus 0.5 when aligned), bins of roi/pooled, sample_ratio (or, when <= 0,
// ceil(roi_size / pooled)) samples per bin and axis, each read bilinearly; a sample beyond
// [-1, H] x [-1, W] reads 0, one in [-1, 0] reads the first row/column, one past H - 1 the last.
// Without `aligned`, a roi is at least 1x1; with it, an empty roi gets one sample per bin
// instead of contrib.ROIAlign's abort. A roi with a negative batch index pools to zeros and
// gets no gradient.
//
// Why: contrib.ROIAlign's CPU backward is one serial loop over every output element that
// recomputes the roi's sample positions for each channel. Here each roi's samples (positions
// and weights) are computed once, in parallel, and the gradient is scattered in parallel over
// (image, channel) planes, which no two threads share. Its forward reads one channel plane at
// a time, a few scattered floats per sample; this one reads a channels-last copy, whole channel
// vectors per sample (docs/kernels.md, "The compiled CPU operators").
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"
#include "common.h"

using namespace mxnet::ext;

namespace {

struct Params {
  int pooled_h, pooled_w, sample_ratio;
  float spatial_scale;
  bool aligned;
  bool channels_last;  // layout "NHWC"
};

int GetInt(const std::unordered_map<std::string, std::string>& attrs, const char* key,
           int fallback) {
  auto it = attrs.find(key);
  return it == attrs.end() ? fallback : std::stoi(it->second);
}

Params Parse(const std::unordered_map<std::string, std::string>& attrs) {
  Params p;
  p.pooled_h = GetInt(attrs, "pooled_h", 7);
  p.pooled_w = GetInt(attrs, "pooled_w", 7);
  p.sample_ratio = GetInt(attrs, "sample_ratio", 0);
  auto it = attrs.find("spatial_scale");
  p.spatial_scale = it == attrs.end() ? 1.f : std::stof(it->second);
  it = attrs.find("aligned");
  p.aligned = it != attrs.end() && (it->second == "1" || it->second == "True" ||
                                    it->second == "true");
  it = attrs.find("layout");
  p.channels_last = it != attrs.end() && it->second == "NHWC";
  return p;
}

// One bilinear read: four positions in a (H, W) plane and their weights.
struct Tap {
  int pos[4];
  float w[4];
};

// The samples of one roi: taps[(ph * pooled_w + pw) * per_bin + k], per_bin taps per bin;
// a bin's value is the sum of its taps' reads divided by count (= per_bin, as a float).
struct RoiSamples {
  int batch = -1;
  int per_bin = 0;
  float count = 1.f;
  std::vector<Tap> taps;
};

void SampleRoi(const Params& p, const float* roi, int height, int width, RoiSamples* out) {
  out->batch = static_cast<int>(roi[0]);
  out->taps.clear();
  out->per_bin = 0;
  if (out->batch < 0) return;
  const float offset = p.aligned ? 0.5f : 0.f;
  const float x1 = roi[1] * p.spatial_scale - offset;
  const float y1 = roi[2] * p.spatial_scale - offset;
  float roi_w = roi[3] * p.spatial_scale - offset - x1;
  float roi_h = roi[4] * p.spatial_scale - offset - y1;
  if (!p.aligned) {
    roi_w = std::max(roi_w, 1.f);
    roi_h = std::max(roi_h, 1.f);
  }
  const float bin_h = roi_h / p.pooled_h;
  const float bin_w = roi_w / p.pooled_w;
  const int grid_h = std::max(1, p.sample_ratio > 0 ? p.sample_ratio
                                                     : static_cast<int>(std::ceil(roi_h / p.pooled_h)));
  const int grid_w = std::max(1, p.sample_ratio > 0 ? p.sample_ratio
                                                     : static_cast<int>(std::ceil(roi_w / p.pooled_w)));
  out->per_bin = grid_h * grid_w;
  out->count = static_cast<float>(out->per_bin);
  out->taps.resize(static_cast<size_t>(p.pooled_h) * p.pooled_w * out->per_bin);
  Tap* tap = out->taps.data();
  for (int ph = 0; ph < p.pooled_h; ++ph) {
    for (int pw = 0; pw < p.pooled_w; ++pw) {
      for (int iy = 0; iy < grid_h; ++iy) {
        float y = y1 + ph * bin_h + (iy + .5f) * bin_h / grid_h;
        for (int ix = 0; ix < grid_w; ++ix, ++tap) {
          float x = x1 + pw * bin_w + (ix + .5f) * bin_w / grid_w;
          float yy = y;
          if (yy < -1.f || yy > height || x < -1.f || x > width) {
            *tap = Tap{{0, 0, 0, 0}, {0.f, 0.f, 0.f, 0.f}};
            continue;
          }
          yy = std::max(yy, 0.f);
          x = std::max(x, 0.f);
          int y_lo = static_cast<int>(yy), x_lo = static_cast<int>(x), y_hi, x_hi;
          if (y_lo >= height - 1) {
            y_lo = y_hi = height - 1;
            yy = static_cast<float>(y_lo);
          } else {
            y_hi = y_lo + 1;
          }
          if (x_lo >= width - 1) {
            x_lo = x_hi = width - 1;
            x = static_cast<float>(x_lo);
          } else {
            x_hi = x_lo + 1;
          }
          const float ly = yy - y_lo, lx = x - x_lo, hy = 1.f - ly, hx = 1.f - lx;
          *tap = Tap{{y_lo * width + x_lo, y_lo * width + x_hi, y_hi * width + x_lo,
                      y_hi * width + x_hi},
                     {hy * hx, hy * lx, ly * hx, ly * lx}};
        }
      }
    }
  }
}

// One call's sizes and every roi's samples, from the feature map (B, C, H, W) and rois (R, 5):
// the forward and the backward start from the same.
struct Problem {
  Params p;
  int batch, channels, height, width, num_rois, bins;
  int64_t plane;
  std::vector<RoiSamples> samples;

  Problem(const std::unordered_map<std::string, std::string>& attrs, MXTensor* data,
          MXTensor* rois)
      : p(Parse(attrs)), batch(data->shape[0]),
        channels(data->shape[p.channels_last ? 3 : 1]),
        height(data->shape[p.channels_last ? 1 : 2]),
        width(data->shape[p.channels_last ? 2 : 3]), num_rois(rois->shape[0]),
        bins(p.pooled_h * p.pooled_w), plane(static_cast<int64_t>(height) * width),
        samples(num_rois) {
    const float* r = rois->data<float>();
#pragma omp parallel for schedule(dynamic, 4)
    for (int i = 0; i < num_rois; ++i) SampleRoi(p, r + 5 * i, height, width, &samples[i]);
  }
};

MXReturnValue ParseAttrs(const std::unordered_map<std::string, std::string>& attrs,
                         int* num_in, int* num_out) {
  *num_in = 2;
  *num_out = 1;
  auto it = attrs.find("layout");
  if (it != attrs.end() && it->second != "NCHW" && it->second != "NHWC") {
    MX_ERROR_MSG << "mxmask_roi_align: layout must be NCHW or NHWC, got " << it->second;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

MXReturnValue InferType(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<int>* in_types, std::vector<int>* out_types) {
  return mxmask_ops::AllFloat32("mxmask_roi_align", *in_types, out_types);
}

MXReturnValue InferShape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in_shapes,
                         std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& d = in_shapes->at(0);
  const auto& r = in_shapes->at(1);
  if (d.size() != 4 || r.size() != 2 || r[1] != 5) {
    MX_ERROR_MSG << "mxmask_roi_align: expected data (B, C, H, W) and rois (R, 5)";
    return MX_FAIL;
  }
  const Params p = Parse(attrs);
  out_shapes->at(0) = {r[0], d[p.channels_last ? 3 : 1], static_cast<unsigned>(p.pooled_h),
                       static_cast<unsigned>(p.pooled_w)};
  return MX_SUCCESS;
}

// Channels-last copy of data (B, C, H, W) -> (B, H, W, C), rows in parallel.
void ToChannelsLast(const float* x, int batch, int channels, int height, int width, float* xt) {
  const int64_t plane = static_cast<int64_t>(height) * width;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < static_cast<int64_t>(batch) * height; ++row) {
    const int64_t b = row / height, y = row % height;
    mxmask_ops::RowToChannelsLast(x + b * channels * plane + y * width, plane, channels, width,
                                  xt + row * width * channels);
  }
}

// The bins of one roi from the channels-last copy: each tap reads four contiguous channel
// vectors, so the inner loop runs over channels and vectorises (function clones for AVX-512 and
// AVX2, picked at load time by the CPU).
__attribute__((target_clones("avx512f", "avx2", "default")))
void PoolRoiChannelsLast(const RoiSamples& s, const float* image, int channels, int bins,
                         float* acc, float* out) {
  const Tap* tap = s.taps.data();
  for (int b = 0; b < bins; ++b) {
    std::fill(acc, acc + channels, 0.f);
    for (int k = 0; k < s.per_bin; ++k, ++tap) {
      const float* p0 = image + static_cast<int64_t>(tap->pos[0]) * channels;
      const float* p1 = image + static_cast<int64_t>(tap->pos[1]) * channels;
      const float* p2 = image + static_cast<int64_t>(tap->pos[2]) * channels;
      const float* p3 = image + static_cast<int64_t>(tap->pos[3]) * channels;
      const float w0 = tap->w[0], w1 = tap->w[1], w2 = tap->w[2], w3 = tap->w[3];
      for (int c = 0; c < channels; ++c)
        acc[c] += w0 * p0[c] + w1 * p1[c] + w2 * p2[c] + w3 * p3[c];
    }
    for (int c = 0; c < channels; ++c) out[static_cast<int64_t>(c) * bins + b] = acc[c] / s.count;
  }
}

// Forward: the feature map is copied channels-last once per call (MXNet's workspace) unless it
// is channels-last already (layout "NHWC"), then every roi is pooled from it, rois in
// parallel. Each output is contrib.ROIAlign's float32 arithmetic in its order (the four
// weighted taps of a sample, summed over the bin's samples, divided by their count; built
// without FMA contraction), so the two agree bit for bit.
MXReturnValue Forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                      const OpResource& res) {
  const Problem job(attrs, &inputs->at(0), &inputs->at(1));
  const int channels = job.channels, bins = job.bins;
  const float* x = inputs->at(0).data<float>();
  float* y = outputs->at(0).data<float>();
  const int64_t bytes = static_cast<int64_t>(job.batch) * job.plane * channels * sizeof(float);
  const float* xt = x;
  std::vector<float> own;
  if (!job.p.channels_last) {
    float* copy = nullptr;
    if (bytes <= static_cast<int64_t>(std::numeric_limits<int>::max())) {
      copy = static_cast<float*>(res.alloc_cpu(static_cast<int>(bytes)));
    }
    if (copy == nullptr) {
      own.resize(static_cast<size_t>(bytes / sizeof(float)));
      copy = own.data();
    }
    ToChannelsLast(x, job.batch, channels, job.height, job.width, copy);
    xt = copy;
  }
#pragma omp parallel
  {
    std::vector<float> acc(channels);
#pragma omp for schedule(dynamic, 4)
    for (int r = 0; r < job.num_rois; ++r) {
      const RoiSamples& s = job.samples[r];
      float* out = y + static_cast<int64_t>(r) * channels * bins;
      if (s.batch < 0 || s.batch >= job.batch) {
        std::fill(out, out + static_cast<int64_t>(channels) * bins, 0.f);
        continue;
      }
      PoolRoiChannelsLast(s, xt + static_cast<int64_t>(s.batch) * job.plane * channels,
                          channels, bins, acc.data(), out);
    }
  }
  return MX_SUCCESS;
}

// inputs: output gradient, data, rois, output; outputs: data gradient, rois gradient (zeros).
MXReturnValue Backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  const Problem job(attrs, &inputs->at(1), &inputs->at(2));
  const int batch = job.batch, channels = job.channels, bins = job.bins;
  // a tap position's element of channel c: dst[pos * step] (NCHW: plane of c, step 1; NHWC:
  // offset c, step C)
  const int64_t step = job.p.channels_last ? channels : 1;
  const int64_t plane = job.plane;
  const float* g = inputs->at(0).data<float>();
  float* dx = outputs->at(0).data<float>();
  std::fill(outputs->at(1).data<float>(), outputs->at(1).data<float>() + outputs->at(1).size(),
            0.f);
  // rois of each image, in order (the sum over rois keeps contrib.ROIAlign's order)
  std::vector<std::vector<int>> by_image(batch);
  for (int r = 0; r < job.num_rois; ++r) {
    const int b = job.samples[r].batch;
    if (b >= 0 && b < batch) by_image[b].push_back(r);
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t bc = 0; bc < static_cast<int64_t>(batch) * channels; ++bc) {
    const int b = static_cast<int>(bc / channels), c = static_cast<int>(bc % channels);
    float* dst = job.p.channels_last ? dx + b * plane * channels + c : dx + bc * plane;
    for (int64_t i = 0; i < plane; ++i) dst[i * step] = 0.f;
    for (int r : by_image[b]) {
      const RoiSamples& s = job.samples[r];
      const float* grad = g + (static_cast<int64_t>(r) * channels + c) * bins;
      const Tap* tap = s.taps.data();
      for (int bin = 0; bin < bins; ++bin) {
        const float v = grad[bin] / s.count;
        for (int k = 0; k < s.per_bin; ++k, ++tap) {
          dst[tap->pos[0] * step] += tap->w[0] * v;
          dst[tap->pos[1] * step] += tap->w[1] * v;
          dst[tap->pos[2] * step] += tap->w[2] * v;
          dst[tap->pos[3] * step] += tap->w[3] * v;
        }
      }
    }
  }
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(mxmask_roi_align)
.setParseAttrs(ParseAttrs)
.setInferType(InferType)
.setInferShape(InferShape)
.setForward(Forward, "cpu")
.setBackward(Backward, "cpu");

MXReturnValue initialize(int version) {
  if (version < 10900) {
    MX_ERROR_MSG << "mxmask_roi_align needs MXNet 1.9 or later, got " << version;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}
