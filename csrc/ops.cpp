// Operator schemas of the wsss extension, declared once (SPEC §6). The CPU and CUDA kernels
// register themselves in csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL; the Python
// side (wsss/crf/_ext.py) adds the fake (meta) kernels and the autograd formula.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// `import wsss._C` must succeed so that loading the shared library runs the static
// registrations below; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(wsss, m) {
  // Permutohedral-lattice Gaussian filter (SPEC §6.2), unnormalised, self term included.
  // features (B,N,d) and values (B,N,C), same floating dtype; returns (B,N,C).
  // transpose=True applies the adjoint (the d+1 blur passes in reverse order).
  m.def("permutohedral_filter(Tensor features, Tensor values, bool transpose=False) -> Tensor");
  // Fully connected CRF mean field (SPEC §6.3). image (B,3,H,W) uint8, probs (B,K,H,W) float32;
  // returns Q (B,K,H,W) float32. num_threads 0 = torch's intra-op setting.
  m.def(
      "dense_crf(Tensor image, Tensor probs, int num_iter, float pos_xy_std, float pos_w, "
      "float bi_xy_std, float bi_rgb_std, float bi_w, int num_threads=0) -> Tensor");
}
