// Emulator controls, in the emulator's namespace only: the schedule order, TF32 for float
// convolutions, the fiber backend and the launch recorder (cnnext/_backend.py parses what
// _record_stop returns).
#include <torch/library.h>

#include <string>

#include "emu/emu.h"

namespace {
void set_schedule(std::string schedule) { cnnext::emu::set_schedule(schedule); }
std::string get_schedule() { return cnnext::emu::get_schedule(); }
void set_tf32(bool enabled) { cnnext::emu::set_tf32(enabled); }
bool get_tf32() { return cnnext::emu::tf32_enabled(); }
std::string fiber_backend() { return cnnext::emu::fiber_backend(); }
int64_t record_start() { return cnnext::emu::record_start(); }
std::string record_stop(int64_t token) { return cnnext::emu::record_stop(token); }
std::string record_peek(int64_t token) { return cnnext::emu::record_peek(token); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(cnnext_emu, m) {
  m.def("_set_schedule(str schedule) -> ()", &set_schedule);
  m.def("_get_schedule() -> str", &get_schedule);
  m.def("_set_tf32(bool enabled) -> ()", &set_tf32);
  m.def("_get_tf32() -> bool", &get_tf32);
  m.def("_fiber_backend() -> str", &fiber_backend);
  m.def("_record_start() -> int", &record_start);
  m.def("_record_stop(int token) -> str", &record_stop);
  m.def("_record_peek(int token) -> str", &record_peek);
}
