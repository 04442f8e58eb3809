// Makes the shared library importable as `svdfuse._C`. The module itself is empty: importing it
// loads the library, whose static TORCH_LIBRARY_IMPL blocks register the compiled kernels of
// torch.ops.svdfuse.* (their schemas are defined in svdfuse/_native.py, which imports this module).
#include <Python.h>

static PyModuleDef svdfuse_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&svdfuse_C_module);
}
