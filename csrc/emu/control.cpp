// Emulator controls, in the emulator's namespace only: the schedule order and the fiber backend.
#include <torch/library.h>

#include <string>

#include "emu/emu.h"

namespace {
void set_schedule(std::string schedule) { cnnext::emu::set_schedule(schedule); }
std::string get_schedule() { return cnnext::emu::get_schedule(); }
std::string fiber_backend() { return cnnext::emu::fiber_backend(); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(cnnext_emu, m) {
  m.def("_set_schedule(str schedule) -> ()", &set_schedule);
  m.def("_get_schedule() -> str", &get_schedule);
  m.def("_fiber_backend() -> str", &fiber_backend);
}
