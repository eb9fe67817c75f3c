// Helpers shared by the compiled operators (each .cc registers one operator).
#ifndef MXMASK_OPS_COMMON_H_
#define MXMASK_OPS_COMMON_H_

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

}  // namespace mxmask_ops

#endif  // MXMASK_OPS_COMMON_H_
