// quantkern._C: the Python module that carries the kernels. Importing it runs
// the TORCH_LIBRARY_IMPL registrations of every csrc/cpu and csrc/cuda file;
// the schemas themselves are defined in quantkern/_registry.py.
#include <Python.h>

#include <stdexcept>
#include <string>

#include "host_cache.h"
#include "cpu_features.h"
#include "isa.h"

namespace {

PyObject* str_list(const std::vector<std::string>& v) {
  PyObject* out = PyList_New(Py_ssize_t(v.size()));
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(out, Py_ssize_t(i), PyUnicode_FromString(v[i].c_str()));
  return out;
}

PyObject* py_cpu_capabilities(PyObject*, PyObject*) { return str_list(qk::supported_cpu_capabilities()); }
PyObject* py_emulated_cpu_capabilities(PyObject*, PyObject*) { return str_list(qk::emulated_cpu_capabilities()); }

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

PyObject* py_cpu_features(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  for (int i = 0; i < int(qk::CpuFeature::Count); ++i) {
    const auto f = qk::CpuFeature(i);
    PyObject* v = Py_BuildValue("(OO)", qk::cpu_feature_detected(f) ? Py_True : Py_False,
                                qk::cpu_feature_on(f) ? Py_True : Py_False);
    PyDict_SetItemString(out, qk::cpu_feature_name(f), v);
    Py_DECREF(v);
  }
  return out;
}

PyObject* py_set_cpu_feature(PyObject*, PyObject* args) {
  const char* name;
  int on;
  if (!PyArg_ParseTuple(args, "sp", &name, &on)) return nullptr;
  if (!qk::set_cpu_feature_enabled(name, on != 0)) {
    PyErr_Format(PyExc_ValueError, "unknown cpu feature '%s' (known: vnni, vbmi, bf16, amx)", name);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_built_with_cuda(PyObject*, PyObject*) {
#ifdef QUANTKERN_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"cpu_capabilities", py_cpu_capabilities, METH_NOARGS, "CPU instruction sets this machine can run, best first."},
    {"emulated_cpu_capabilities", py_emulated_cpu_capabilities, METH_NOARGS,
     "Emulated instruction sets set_cpu_capability also takes here (tests)."},
    {"get_cpu_capability", py_get_cpu_capability, METH_NOARGS, "The instruction set the CPU kernels use now."},
    {"set_cpu_capability", py_set_cpu_capability, METH_O, "Force 'avx512', 'avx2', 'scalar', 'avx512emu' or 'auto'."},
    {"cpu_features", py_cpu_features, METH_NOARGS, "Optional CPU features: {name: (detected, enabled)}."},
    {"set_cpu_feature", py_set_cpu_feature, METH_VARARGS, "Enable/disable an optional CPU feature (vnni, vbmi, bf16, amx)."},
    {"empty_cache", py_empty_cache, METH_NOARGS, "Release cached CPU output blocks; returns bytes freed."},
    {"cache_bytes", py_cache_bytes, METH_NOARGS, "Bytes held in cached free CPU output blocks."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "quantkern kernels", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
