// Python bindings of the emulator's controls (fusedrnn._C.emulation; also used by the
// test-only mutant builds of tests/test_cuda_emulation.py, which carry their own runtime).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <c10/util/Exception.h>

#include "bindings.h"

#pragma GCC visibility push(hidden)

namespace fusedrnn_emu {
namespace py = pybind11;

namespace {
py::dict device_dict(const DeviceProps& p) {
  py::dict d;
  d["name"] = p.name;
  d["sms"] = p.sms;
  d["smem_optin"] = p.smem_optin;
  d["smem_per_sm"] = p.smem_per_sm;
  d["smem_reserved"] = p.smem_reserved;
  d["regs_per_sm"] = p.regs_per_sm;
  d["max_regs_per_thread"] = p.max_regs_per_thread;
  d["max_threads_per_sm"] = p.max_threads_per_sm;
  d["max_blocks_per_sm"] = p.max_blocks_per_sm;
  d["compute_capability"] = py::make_tuple(p.cc_major, p.cc_minor);
  d["index"] = p.id;
  // What the planner reads (launch_emu.h device_limits), with torch.cuda.get_device_properties()'s
  // names: fusedrnn.backends.cuda.device_record() takes it as it is.
  py::dict r;
  r["name"] = p.record_name;
  r["major"] = p.cc_major;
  r["minor"] = p.cc_minor;
  r["multi_processor_count"] = p.sms;
  r["shared_memory_per_block_optin"] = p.smem_optin;
  r["shared_memory_per_multiprocessor"] = p.smem_per_sm;
  r["regs_per_multiprocessor"] = p.regs_per_sm;
  r["max_threads_per_multi_processor"] = p.max_threads_per_sm;
  r["total_memory"] = p.total_memory;
  r["L2_cache_size"] = p.l2_bytes;
  r["warp_size"] = 32;
  d["record"] = r;
  return d;
}
py::dict options_dict(const Options& o) {
  py::dict d;
  d["block_order"] = o.block_order;
  d["thread_order"] = o.thread_order;
  d["seed"] = o.seed;
  d["race_check"] = o.race_check;
  d["stack_kb"] = o.stack_bytes >> 10;
  return d;
}
}  // namespace

void add_bindings(py::module_& m) {
  m.def("device", [] { return device_dict(device()); },
        "dict: the emulated device record (name, sms, smem_optin, smem_per_sm, regs_per_sm, ...)");
  m.def("set_device", [](const std::string& name, int sms) { return device_dict(set_device(name, sms)); },
        py::arg("name"), py::arg("sms") = 0,
        "Emulate device `name` (H100, H200, A100) with `sms` SMs (0: its real count); returns its record");
  m.def("options", [] { return options_dict(options()); });
  m.def(
      "set_options",
      [](py::object block_order, py::object thread_order, py::object seed, py::object race_check, py::object stack_kb) {
        Options& o = options();
        if (!block_order.is_none()) {
          const auto v = block_order.cast<std::string>();
          TORCH_CHECK(v == "random" || v == "round_robin", "block_order: random or round_robin, got ", v);
          o.block_order = v;
        }
        if (!thread_order.is_none()) {
          const auto v = thread_order.cast<std::string>();
          TORCH_CHECK(v == "shuffle" || v == "forward" || v == "reverse", "thread_order: shuffle, forward or reverse, got ", v);
          o.thread_order = v;
        }
        if (!seed.is_none()) o.seed = seed.cast<uint64_t>();
        if (!race_check.is_none()) o.race_check = race_check.cast<bool>();
        if (!stack_kb.is_none()) {
          const auto kb = stack_kb.cast<size_t>();
          TORCH_CHECK(kb >= 16, "stack_kb must be >= 16");
          o.stack_bytes = kb << 10;
        }
        return options_dict(o);
      },
      py::arg("block_order") = py::none(), py::arg("thread_order") = py::none(), py::arg("seed") = py::none(),
      py::arg("race_check") = py::none(), py::arg("stack_kb") = py::none(),
      "Scheduler and checker options; returns them all");
  m.def("kernel_launch_counts", [] {
    py::dict d;
    for (const auto& kv : kernel_launch_counts()) d[py::str(kv.first)] = kv.second;
    return d;
  }, "dict: emulated kernel (short name) -> number of launches since the last reset");
  m.def("reset_kernel_launch_counts", &reset_kernel_launch_counts);
  m.def("compiled_functions", &compiled_functions, py::arg("ns") = "fusedrnn_emu_kernels",
        "short names of the void functions of namespace ns in this extension (the kernel instantiations "
        "that exist, among helpers)");
  m.def("launch_log", [] {
    py::list out;
    for (const LaunchRecord& r : launch_log()) {
      py::dict d;
      d["kernel"] = r.kernel;
      d["grid"] = r.grid;
      d["threads"] = r.threads;
      d["smem"] = r.smem;
      d["cooperative"] = r.cooperative;
      out.append(d);
    }
    return out;
  }, "list of dicts (kernel, grid, threads, smem, cooperative): the most recent launches, oldest first");
  m.def("clear_launch_log", &clear_launch_log);
}

}  // namespace fusedrnn_emu

#pragma GCC visibility pop
