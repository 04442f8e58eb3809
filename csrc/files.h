// svdfuse._C's functions that are not torch ops (file reads); defined in files.cpp.
#pragma once
#include <Python.h>

PyObject* svdfuse_read_ranges(PyObject* self, PyObject* args);
