// The Python module fastnn._C. Importing it runs the TORCH_LIBRARY registrations
// of every op; build_info() says what the binary was built with.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "build_info.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnn compiled kernels; the ops live in torch.ops.fastnn";
  m.def("build_info", []() {
    pybind11::dict d;
    for (auto& kv : fastnn::build_info()) d[pybind11::str(kv.first)] = kv.second;
    d["with_cuda"] = fastnn::built_with_cuda();
    d["openmp"] = d["openmp"].cast<std::string>() == "1";
    return d;
  });
}
