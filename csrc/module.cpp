// Makes the shared library importable as `svdfuse._C`. The module itself is empty: importing it
// loads the library, whose static TORCH_LIBRARY blocks register torch.ops.svdfuse.*.
#include <Python.h>

static PyModuleDef svdfuse_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&svdfuse_C_module);
}
