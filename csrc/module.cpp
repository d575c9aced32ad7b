// The Python module refframe._C. Importing it loads this library, which runs the static
// TORCH_LIBRARY (ops.cpp) and TORCH_LIBRARY_IMPL (cpu/, cuda/) registrations; the module itself only
// carries build facts (torch version built against, CUDA support), the CPU kernel choice and the
// CPU covariance's progress, cancellation and last-run facts (cpu/status.h). No pybind11: plain
// CPython calls, so the library needs no libtorch_python.
#include <Python.h>

#include "cpu/status.h"
#include "cpu/syrk_kernel.h"

namespace {

PyObject* cpu_kernel(PyObject*, PyObject*) {
  return PyUnicode_FromString(refframe::cpu::active_kernels().name);
}

PyObject* covariance_progress(PyObject*, PyObject*) {
  auto& p = refframe::cpu::covariance_progress();
  return Py_BuildValue("(LL)", static_cast<long long>(p.done.load()), static_cast<long long>(p.total.load()));
}

PyObject* last_cpu_covariance(PyObject*, PyObject*) {
  auto& last = refframe::cpu::last_covariance();
  const char* set = last.set.load();
  if (set == nullptr) Py_RETURN_NONE;
  return Py_BuildValue("(sL)", set, static_cast<long long>(last.columns.load()));
}

PyObject* thread_key(PyObject*, PyObject*) {
  return PyLong_FromUnsignedLongLong(refframe::cpu::thread_key());
}

PyObject* cancel_covariance(PyObject*, PyObject* arg) {
  const unsigned long long key = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  refframe::cpu::request_cancel(key);
  Py_RETURN_NONE;
}

PyObject* clear_cancel(PyObject*, PyObject* arg) {
  const unsigned long long key = PyLong_AsUnsignedLongLong(arg);
  if (PyErr_Occurred()) return nullptr;
  refframe::cpu::clear_cancel(key);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_kernel", cpu_kernel, METH_NOARGS, "Name of the CPU micro-kernel set chosen at run time."},
    {"covariance_progress", covariance_progress, METH_NOARGS,
     "(rows done, rows in all) of the running CPU center_syrk call; (0, 0) when none runs."},
    {"last_cpu_covariance", last_cpu_covariance, METH_NOARGS,
     "(kernel set, columns multiplied) of the last CPU center_syrk call, or None before any: the set "
     "that really ran (avx512bf16 hands fp16/fp32 W, and W with many columns to split, to avx512) "
     "and d, or more when avx512bf16 split columns far from zero into parts."},
    {"thread_key", thread_key, METH_NOARGS, "Key of the calling thread for cancel_covariance."},
    {"cancel_covariance", cancel_covariance, METH_O,
     "cancel_covariance(key): stop the CPU center_syrk call of that thread at its next row block "
     "(it raises 'cancelled'), or the next one it starts."},
    {"clear_cancel", clear_cancel, METH_O, "clear_cancel(key): withdraw a cancel request."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "refframe native kernels", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "TORCH_VERSION", REFFRAME_TORCH_VERSION);
#ifdef REFFRAME_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
