// Helpers shared by the compiled operators (each .cc registers one operator).
#ifndef MXMASK_OPS_COMMON_H_
#define MXMASK_OPS_COMMON_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mxnet/lib_api.h"

namespace mxmask_ops {

// The type inference of an operator that takes and gives float32 only: every output float32,
// or an error naming the operator when an input is anything else.
inline mxnet::ext::MXReturnValue AllFloat32(const char* op, const std::vector<int>& in_types,
                                            std::vector<int>* out_types) {
  for (int t : in_types) {
    if (t != mxnet::ext::kFloat32) {
      MX_ERROR_MSG << op << ": every input must be float32";
      return mxnet::ext::MX_FAIL;
    }
  }
  for (auto& t : *out_types) t = mxnet::ext::kFloat32;
  return mxnet::ext::MX_SUCCESS;
}

// One row of a (C, H, W) feature map made channels-last: src points at row y of channel 0
// (channel c's row is at src + c * plane), dst receives width x channels floats. Tiles of
// 16 x 16 (channel, column) keep both the reads and the writes in cache.
inline void RowToChannelsLast(const float* src, int64_t plane, int channels, int width,
                              float* dst) {
  for (int c0 = 0; c0 < channels; c0 += 16) {
    const int c1 = std::min(channels, c0 + 16);
    for (int x0 = 0; x0 < width; x0 += 16) {
      const int x1 = std::min(width, x0 + 16);
      for (int c = c0; c < c1; ++c) {
        const float* s = src + c * plane;
        for (int x = x0; x < x1; ++x) dst[static_cast<int64_t>(x) * channels + c] = s[x];
      }
    }
  }
}

}  // namespace mxmask_ops

#endif  // MXMASK_OPS_COMMON_H_
