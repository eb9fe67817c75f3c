// mxmask_box_nms: contrib.box_nms's forward for CPU, with the same output, in corner format.
//
//   mxmask_box_nms(data (..., N, W) float32, overlap_thresh, valid_thresh, topk, coord_start,
//                  score_index, id_index, force_suppress)  -> (..., N, W)
//
// Each leading index is an independent batch of N rows of W columns: a score, the corner box
// (x1, y1, x2, y2) at coord_start, optionally a class id. Per batch, as MXNet 1.9.1's box_nms:
// the rows whose score is > valid_thresh, stably sorted by descending score, the first topk of
// them (topk < 0: all), greedy suppression in that order of every later row whose IoU with a
// kept row is > overlap_thresh (only rows of the same class id when id_index >= 0 and not
// force_suppress), IoU = inter / (area_a + area_b - inter) in float32 with areas of negative
// width or height 0. The kept rows are written in that order at the front of the batch, all
// their columns copied; every other row is -1. No background_id and no center format (both
// are refused). The gradient is zero: the callers stop gradients at the proposals and
// detections anyway.
//
// Why: MXNet's CPU box_nms launches one parallel kernel per reference row (6000 launches for
// GluonCV's 6000 pre-NMS proposals) and sorts all batches together; here each batch is one
// task, sorted on its own, and the suppression by each kept row is one vectorised pass over the
// later candidates (docs/kernels.md, "The compiled CPU operators").
#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "mxnet/lib_api.h"
#include "common.h"

using namespace mxnet::ext;

namespace {

struct Params {
  float overlap_thresh = 0.5f, valid_thresh = 0.f;
  int topk = -1, coord_start = 2, score_index = 1, id_index = -1;
  bool force_suppress = false;
};

bool IsTrue(const std::string& v) { return v == "1" || v == "True" || v == "true"; }

Params Parse(const std::unordered_map<std::string, std::string>& attrs) {
  Params p;
  auto get = [&attrs](const char* key) -> const std::string* {
    auto it = attrs.find(key);
    return it == attrs.end() ? nullptr : &it->second;
  };
  if (auto v = get("overlap_thresh")) p.overlap_thresh = std::stof(*v);
  if (auto v = get("valid_thresh")) p.valid_thresh = std::stof(*v);
  if (auto v = get("topk")) p.topk = std::stoi(*v);
  if (auto v = get("coord_start")) p.coord_start = std::stoi(*v);
  if (auto v = get("score_index")) p.score_index = std::stoi(*v);
  if (auto v = get("id_index")) p.id_index = std::stoi(*v);
  if (auto v = get("force_suppress")) p.force_suppress = IsTrue(*v);
  return p;
}

MXReturnValue ParseAttrs(const std::unordered_map<std::string, std::string>& attrs,
                         int* num_in, int* num_out) {
  for (const char* key : {"in_format", "out_format"}) {
    auto it = attrs.find(key);
    if (it != attrs.end() && it->second != "corner") {
      MX_ERROR_MSG << "mxmask_box_nms: only the corner format, got " << key << "="
                   << it->second;
      return MX_FAIL;
    }
  }
  auto it = attrs.find("background_id");
  if (it != attrs.end() && std::stoi(it->second) != -1) {
    MX_ERROR_MSG << "mxmask_box_nms: background_id is not supported (got " << it->second << ")";
    return MX_FAIL;
  }
  *num_in = 1;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue InferType(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<int>* in_types, std::vector<int>* out_types) {
  return mxmask_ops::AllFloat32("mxmask_box_nms", *in_types, out_types);
}

MXReturnValue InferShape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in_shapes,
                         std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& s = in_shapes->at(0);
  const Params p = Parse(attrs);
  if (s.size() < 2) {
    MX_ERROR_MSG << "mxmask_box_nms: data needs at least 2 axes (rows, columns)";
    return MX_FAIL;
  }
  const int width = static_cast<int>(s.back());
  if (p.coord_start < 0 || p.coord_start + 3 >= width || p.score_index < 0 ||
      p.score_index >= width || p.id_index >= width ||
      (p.score_index >= p.coord_start && p.score_index <= p.coord_start + 3)) {
    MX_ERROR_MSG << "mxmask_box_nms: score_index / coord_start / id_index do not fit rows of "
                 << width << " columns";
    return MX_FAIL;
  }
  out_shapes->at(0) = s;
  return MX_SUCCESS;
}

inline float Area(const float* box) {
  const float w = box[2] - box[0], h = box[3] - box[1];
  return (w < 0 || h < 0) ? 0.f : w * h;
}

// Marks removed[q] for every candidate q in [from, n) of class `a_cls` whose IoU with
// (ax1, ay1, ax2, ay2) of area `a_area` is > thresh (all classes are 0 when NMS ignores them).
// Branch-free over structure-of-arrays candidates, so it vectorises (clones for AVX-512 and
// AVX2, picked at load time). The arithmetic is box_nms's: max/min as a > b ? a : b, widths
// clamped at 0, float32.
__attribute__((target_clones("avx512f", "avx2", "default")))
void SuppressAfter(int64_t from, int64_t n, float ax1, float ay1, float ax2, float ay2,
                   float a_area, int a_cls, float thresh, const float* x1,
                   const float* y1, const float* x2, const float* y2, const float* area,
                   const int* cls, int* removed) {
#pragma omp simd
  for (int64_t q = from; q < n; ++q) {
    const float left = ax1 > x1[q] ? ax1 : x1[q];
    const float right = ax2 < x2[q] ? ax2 : x2[q];
    const float top = ay1 > y1[q] ? ay1 : y1[q];
    const float bottom = ay2 < y2[q] ? ay2 : y2[q];
    float w = right - left;
    float h = bottom - top;
    w = w > 0 ? w : 0.f;
    h = h > 0 ? h : 0.f;
    const float inter = w * h;
    const float iou = inter / (a_area + area[q] - inter);
    removed[q] |= (iou > thresh) & (cls[q] == a_cls);
  }
}

// One batch: rows (num, width) -> out (num, width).
void NmsBatch(const Params& p, const float* rows, int64_t num, int64_t width, float* out) {
  std::vector<int64_t> order;
  order.reserve(num);
  for (int64_t i = 0; i < num; ++i) {
    if (rows[i * width + p.score_index] > p.valid_thresh) order.push_back(i);
  }
  // box_nms's stable sort by descending score is the order (score descending, row ascending);
  // with topk, only the first k of that order are needed
  auto before = [rows, width, &p](int64_t a, int64_t b) {
    const float sa = rows[a * width + p.score_index], sb = rows[b * width + p.score_index];
    return sa > sb || (sa == sb && a < b);
  };
  const int64_t k = p.topk < 0 ? num : std::min<int64_t>(num, p.topk);
  if (static_cast<int64_t>(order.size()) > k) {
    std::nth_element(order.begin(), order.begin() + k, order.end(), before);
    order.resize(k);
  }
  std::sort(order.begin(), order.end(), before);
  const int64_t n = static_cast<int64_t>(order.size());
  const bool by_class = p.id_index >= 0 && !p.force_suppress;
  // the candidates in score order, structure of arrays
  std::vector<float> x1(n), y1(n), x2(n), y2(n), area(n);
  std::vector<int> cls(n, 0), removed(n, 0);
  for (int64_t j = 0; j < n; ++j) {
    const float* row = rows + order[j] * width;
    const float* box = row + p.coord_start;
    x1[j] = box[0];
    y1[j] = box[1];
    x2[j] = box[2];
    y2[j] = box[3];
    area[j] = Area(box);
    if (by_class) cls[j] = static_cast<int>(row[p.id_index]);
  }
  for (int64_t r = 0; r + 1 < n; ++r) {
    if (removed[r]) continue;
    SuppressAfter(r + 1, n, x1[r], y1[r], x2[r], y2[r], area[r], cls[r], p.overlap_thresh,
                  x1.data(), y1.data(), x2.data(), y2.data(), area.data(), cls.data(),
                  removed.data());
  }
  std::fill(out, out + num * width, -1.f);
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (removed[j]) continue;
    std::copy(rows + order[j] * width, rows + (order[j] + 1) * width, out + count * width);
    ++count;
  }
}

MXReturnValue Forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                      const OpResource& res) {
  const Params p = Parse(attrs);
  const auto& shape = inputs->at(0).shape;
  const int64_t width = shape.back();
  const int64_t num = shape[shape.size() - 2];
  int64_t batches = 1;
  for (size_t i = 0; i + 2 < shape.size(); ++i) batches *= shape[i];
  const float* data = inputs->at(0).data<float>();
  float* out = outputs->at(0).data<float>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < batches; ++b) {
    NmsBatch(p, data + b * num * width, num, width, out + b * num * width);
  }
  return MX_SUCCESS;
}

MXReturnValue Backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  MXTensor& grad = outputs->at(0);
  std::fill(grad.data<float>(), grad.data<float>() + grad.size(), 0.f);
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(mxmask_box_nms)
.setParseAttrs(ParseAttrs)
.setInferType(InferType)
.setInferShape(InferShape)
.setForward(Forward, "cpu")
.setBackward(Backward, "cpu");
