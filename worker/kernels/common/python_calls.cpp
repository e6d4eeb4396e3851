// The llmfleet ops as Python functions that call them straight through the dispatcher, unboxed. A call through
// torch.ops spends ~3.6 us in Python and in boxing its arguments on a Zen 3, one of these ~0.7 us, and a decode step
// makes ~9 calls a layer (one sequence, the model's 30 layers: 7.6 -> 6.5 ms a step). worker.cpu_kernels.op() hands
// them out; torch.ops.llmfleet has the same ops, for everything else.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

namespace {

using at::Tensor;

template <typename Signature>
struct Bound;

// Op `name` found once, called with the GIL released, as torch.ops does. typed() throws where Signature is not the
// op's kernel's.
template <typename R, typename... Args>
struct Bound<R(Args...)> {
    static py::cpp_function of(const std::string& name) {
        const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(("llmfleet::" + name).c_str(), "").typed<R(Args...)>();
        return py::cpp_function([op](Args... args) -> R { return op.call(args...); },
                                py::call_guard<py::gil_scoped_release>());
    }
};

using BlockQuant = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t, int64_t);
using CachedAttention = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, Tensor&);
using PromptAttention = void(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double, Tensor&);
using RotaryToCache = Tensor(const Tensor&, int64_t, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&,
                             Tensor&);

py::cpp_function bind(const std::string& name) {
    if (name.rfind("block_quant_matmul", 0) == 0) return Bound<BlockQuant>::of(name);
    if (name == "cached_attention") return Bound<CachedAttention>::of(name);
    if (name == "prompt_attention_amx") return Bound<PromptAttention>::of(name);
    if (name == "rotary_to_cache") return Bound<RotaryToCache>::of(name);
    if (name == "rms_norm") return Bound<Tensor(const Tensor&, const Tensor&, double)>::of(name);
    if (name == "add_rms_norm") return Bound<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>::of(name);
    if (name == "silu_mul") return Bound<Tensor(const Tensor&)>::of(name);
    throw py::key_error("no direct call for llmfleet::" + name);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("bind", &bind, "Op llmfleet::`name` as a direct call.");
}
