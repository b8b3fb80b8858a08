// Emulator controls, in the emulator's namespace only: the schedule order, the fiber backend and
// the launch recorder (cnnext/_backend.py parses what _record_stop returns).
#include <torch/library.h>

#include <string>

#include "emu/emu.h"

namespace {
void set_schedule(std::string schedule) { cnnext::emu::set_schedule(schedule); }
std::string get_schedule() { return cnnext::emu::get_schedule(); }
std::string fiber_backend() { return cnnext::emu::fiber_backend(); }
int64_t record_start() { return cnnext::emu::record_start(); }
std::string record_stop(int64_t token) { return cnnext::emu::record_stop(token); }
std::string record_peek(int64_t token) { return cnnext::emu::record_peek(token); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(cnnext_emu, m) {
  m.def("_set_schedule(str schedule) -> ()", &set_schedule);
  m.def("_get_schedule() -> str", &get_schedule);
  m.def("_fiber_backend() -> str", &fiber_backend);
  m.def("_record_start() -> int", &record_start);
  m.def("_record_stop(int token) -> str", &record_stop);
  m.def("_record_peek(int token) -> str", &record_peek);
}
