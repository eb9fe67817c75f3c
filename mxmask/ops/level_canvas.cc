// mxmask_level_canvas: the level canvas of mxmask.modeling.poolers.level_canvas, built
// channels-last in one pass, for mxmask_roi_align(layout="NHWC"); its backward sums each
// canvas position's gradient into the level pixel it copies.
//
//   mxmask_level_canvas(P_0 (B, C, H_0, W_0), ..., P_{L-1} (B, C, H_k, W_k), num_args=L)
//       -> (B, H_0 + 1 + sum_{k>0} (H_k + 2), W_0 + 1, C) float32
//
// The same values as level_canvas's Pad / Concat / slice_like graph, transposed: level 0 at
// rows 0 .. H_0 - 1, then one replicated bottom row; level k > 0 at rows o_k .. o_k + H_k - 1
// (o_1 = H_0 + 2, o_{k+1} = o_k + H_k + 2) with a replicated row above and below; every level
// left-aligned with one replicated column on its right and zeros beyond, up to W_0 + 1 columns.
//
// Why: mxmask_roi_align pools from a channels-last copy of its input. The inference graph pools
// the same canvas twice or more (box head, mask or keypoint head), and the canvas itself is a
// copy of the levels; building the channels-last canvas once replaces that copy and every
// per-call transpose with one pass (docs/kernels.md, "The compiled CPU operators").
#include <omp.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "mxnet/lib_api.h"
#include "common.h"

using namespace mxnet::ext;

namespace {

int NumLevels(const std::unordered_map<std::string, std::string>& attrs) {
  auto it = attrs.find("num_args");
  return it == attrs.end() ? 1 : std::stoi(it->second);
}

MXReturnValue ParseAttrs(const std::unordered_map<std::string, std::string>& attrs,
                         int* num_in, int* num_out) {
  *num_in = NumLevels(attrs);
  *num_out = 1;
  if (*num_in < 1) {
    MX_ERROR_MSG << "mxmask_level_canvas: num_args must be at least 1";
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

MXReturnValue InferType(const std::unordered_map<std::string, std::string>& attrs,
                        std::vector<int>* in_types, std::vector<int>* out_types) {
  return mxmask_ops::AllFloat32("mxmask_level_canvas", *in_types, out_types);
}

MXReturnValue InferShape(const std::unordered_map<std::string, std::string>& attrs,
                         std::vector<std::vector<unsigned int>>* in_shapes,
                         std::vector<std::vector<unsigned int>>* out_shapes) {
  const auto& first = in_shapes->at(0);
  if (first.size() != 4) {
    MX_ERROR_MSG << "mxmask_level_canvas: expected levels (B, C, H, W)";
    return MX_FAIL;
  }
  unsigned rows = first[2] + 1;
  for (size_t k = 1; k < in_shapes->size(); ++k) {
    const auto& s = in_shapes->at(k);
    if (s.size() != 4 || s[0] != first[0] || s[1] != first[1] || s[2] > first[2] ||
        s[3] > first[3]) {
      MX_ERROR_MSG << "mxmask_level_canvas: level " << k << " must be (B, C, H, W) with the "
                   << "first level's B and C and at most its H and W";
      return MX_FAIL;
    }
    rows += s[2] + 2;
  }
  out_shapes->at(0) = {first[0], rows, first[3] + 1, first[1]};
  return MX_SUCCESS;
}

// The canvas of some levels: which level row each canvas row copies, and its sizes.
struct RowSource {
  int level, row;
};

struct Canvas {
  std::vector<MXTensor*> levels;
  std::vector<RowSource> rows;  // canvas row -> (level, its row)
  int batch, channels, width;   // width: W_0 + 1
  int64_t num_rows;

  explicit Canvas(std::vector<MXTensor*> of) : levels(std::move(of)) {
    for (size_t k = 0; k < levels.size(); ++k) {
      const int h = static_cast<int>(levels[k]->shape[2]);
      if (k > 0) rows.push_back({static_cast<int>(k), 0});                // replicated above
      for (int y = 0; y < h; ++y) rows.push_back({static_cast<int>(k), y});
      rows.push_back({static_cast<int>(k), h - 1});                        // replicated below
    }
    batch = static_cast<int>(levels[0]->shape[0]);
    channels = static_cast<int>(levels[0]->shape[1]);
    width = static_cast<int>(levels[0]->shape[3]) + 1;
    num_rows = static_cast<int64_t>(rows.size());
  }
};

// Forward: each (image, canvas row) is written by one thread: the level's row made
// channels-last, its last column repeated once, zeros beyond.
MXReturnValue Forward(const std::unordered_map<std::string, std::string>& attrs,
                      std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                      const OpResource& res) {
  std::vector<MXTensor*> levels;
  std::vector<const float*> data;
  for (MXTensor& level : *inputs) {
    levels.push_back(&level);
    data.push_back(level.data<float>());
  }
  const Canvas canvas(std::move(levels));
  const int channels = canvas.channels, canvas_w = canvas.width;
  const int64_t num_rows = canvas.num_rows;
  float* out = outputs->at(0).data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < static_cast<int64_t>(canvas.batch) * num_rows; ++i) {
    const int64_t b = i / num_rows;
    const RowSource src = canvas.rows[i % num_rows];
    const MXTensor& level = *canvas.levels[src.level];
    const int height = static_cast<int>(level.shape[2]), width = static_cast<int>(level.shape[3]);
    const int64_t plane = static_cast<int64_t>(height) * width;
    const float* from = data[src.level] + b * channels * plane +
                        static_cast<int64_t>(src.row) * width;
    float* to = out + i * canvas_w * channels;
    mxmask_ops::RowToChannelsLast(from, plane, channels, width, to);
    std::copy(to + static_cast<int64_t>(width - 1) * channels,
              to + static_cast<int64_t>(width) * channels,
              to + static_cast<int64_t>(width) * channels);
    std::fill(to + static_cast<int64_t>(width + 1) * channels,
              to + static_cast<int64_t>(canvas_w) * channels, 0.f);
  }
  return MX_SUCCESS;
}

// inputs: canvas gradient, the L levels, the canvas; outputs: the L level gradients. Each
// (image, level row) is summed by one thread from the canvas rows that copy it (itself and its
// replicated rows), its last column also from the replicated column; filler gets nothing.
MXReturnValue Backward(const std::unordered_map<std::string, std::string>& attrs,
                       std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                       const OpResource& res) {
  const int num_levels = static_cast<int>(outputs->size());
  std::vector<MXTensor*> levels;
  for (int k = 0; k < num_levels; ++k) levels.push_back(&inputs->at(1 + k));
  const Canvas canvas(levels);
  const int batch = canvas.batch, channels = canvas.channels, canvas_w = canvas.width;
  const int64_t num_rows = canvas.num_rows;
  const std::vector<RowSource>& rows = canvas.rows;
  // the canvas rows of each level row, and the (level, row) tasks
  std::vector<std::vector<std::vector<int>>> copies(num_levels);
  std::vector<RowSource> tasks;
  for (int k = 0; k < num_levels; ++k) {
    const int h = static_cast<int>(levels[k]->shape[2]);
    copies[k].resize(h);
    for (int y = 0; y < h; ++y) tasks.push_back({k, y});
  }
  for (int64_t i = 0; i < num_rows; ++i) copies[rows[i].level][rows[i].row].push_back(i);
  std::vector<float*> grads;
  for (MXTensor& g : *outputs) grads.push_back(g.data<float>());
  const float* g = inputs->at(0).data<float>();
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < static_cast<int64_t>(batch) * num_tasks; ++i) {
    const int64_t b = i / num_tasks;
    const RowSource task = tasks[i % num_tasks];
    const MXTensor& level = *levels[task.level];
    const int height = static_cast<int>(level.shape[2]), width = static_cast<int>(level.shape[3]);
    const int64_t plane = static_cast<int64_t>(height) * width;
    float* to = grads[task.level] + b * channels * plane + static_cast<int64_t>(task.row) * width;
    const std::vector<int>& from = copies[task.level][task.row];
    for (int c0 = 0; c0 < channels; c0 += 16) {
      const int c1 = std::min(channels, c0 + 16);
      for (int x0 = 0; x0 < width; x0 += 16) {
        const int x1 = std::min(width, x0 + 16);
        for (int c = c0; c < c1; ++c) {
          for (int x = x0; x < x1; ++x) {
            float sum = 0.f;
            for (int row : from) {
              const float* src = g + ((b * num_rows + row) * canvas_w + x) * channels + c;
              sum += src[0];
              if (x == width - 1) sum += src[channels];                 // replicated column
            }
            to[c * plane + x] = sum;
          }
        }
      }
    }
  }
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(mxmask_level_canvas)
.setParseAttrs(ParseAttrs)
.setInferType(InferType)
.setInferShape(InferShape)
.setForward(Forward, "cpu")
.setBackward(Backward, "cpu");
