// Makes the shared library importable as `svdfuse._C`. Importing it loads the library, whose
// static TORCH_LIBRARY_IMPL blocks register the compiled kernels of torch.ops.svdfuse.* (their
// schemas are defined in svdfuse/_native.py, which imports this module). Its one function,
// `read_ranges` (files.cpp), reads the blocks of several files at once.
#include <Python.h>

#include "files.h"

static PyMethodDef svdfuse_C_methods[] = {
    {"read_ranges", svdfuse_read_ranges, METH_VARARGS, "read_ranges(ranges, threads) -> bytes read per (fd, offset, length, address)"},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef svdfuse_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, svdfuse_C_methods};

PyMODINIT_FUNC PyInit__C() {
  return PyModule_Create(&svdfuse_C_module);
}
