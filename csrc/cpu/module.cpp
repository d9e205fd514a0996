// quantkern._C: the Python module that carries the kernels. Importing it runs
// the TORCH_LIBRARY_IMPL registrations of every csrc/cpu and csrc/cuda file;
// the schemas themselves are defined in quantkern/_registry.py.
#include <Python.h>

#include <stdexcept>
#include <string>

#include "host_cache.h"
#include "isa.h"

namespace {

PyObject* py_cpu_capabilities(PyObject*, PyObject*) {
  auto caps = qk::supported_cpu_capabilities();
  PyObject* out = PyList_New(Py_ssize_t(caps.size()));
  for (size_t i = 0; i < caps.size(); ++i) PyList_SET_ITEM(out, Py_ssize_t(i), PyUnicode_FromString(caps[i].c_str()));
  return out;
}

PyObject* py_get_cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(qk::isa_table().name);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  try {
    return PyUnicode_FromString(qk::set_cpu_capability(name).c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* py_empty_cache(PyObject*, PyObject*) { return PyLong_FromLongLong(qk::host_cache_empty()); }
PyObject* py_cache_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(qk::host_cache_bytes()); }

PyObject* py_built_with_cuda(PyObject*, PyObject*) {
#ifdef QUANTKERN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"cpu_capabilities", py_cpu_capabilities, METH_NOARGS, "CPU instruction sets this machine can run, best first."},
    {"get_cpu_capability", py_get_cpu_capability, METH_NOARGS, "The instruction set the CPU kernels use now."},
    {"set_cpu_capability", py_set_cpu_capability, METH_O, "Force 'avx512', 'avx2', 'scalar' or 'auto'."},
    {"empty_cache", py_empty_cache, METH_NOARGS, "Release cached CPU output blocks; returns bytes freed."},
    {"cache_bytes", py_cache_bytes, METH_NOARGS, "Bytes held in cached free CPU output blocks."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "quantkern kernels", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
