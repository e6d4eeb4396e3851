// The llmfleet ops as Python functions that call them straight through the dispatcher, unboxed. A call through
// torch.ops spends ~3.6 us in Python and in boxing its arguments on a Zen 3, one of these ~0.7 us, and a decode step
// makes ~9 calls a layer (one sequence, the model's 30 layers: 7.6 -> 6.5 ms a step). worker.cpu_kernels.op() hands
// them out; torch.ops.llmfleet has the same ops, for everything else.
#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

// Op llmfleet::`name`; typed() throws where Signature is not the op's kernel's.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const std::string& name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(("llmfleet::" + name).c_str(), "").typed<Signature>();
}

template <typename Signature>
struct Bound;

// Op `name` found once, called with the GIL released, as torch.ops does.
template <typename R, typename... Args>
struct Bound<R(Args...)> {
    static py::cpp_function of(const std::string& name) {
        const auto op = find<R(Args...)>(name);
        return py::cpp_function([op](Args... args) -> R { return op.call(args...); },
                                py::call_guard<py::gil_scoped_release>());
    }
};

using BlockQuant = Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t, int64_t);
using CachedAttention =
    void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, Tensor&);
using PromptAttention = void(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, double, Tensor&);
using AddRmsNorm = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double);
using SiluMul = Tensor(const Tensor&);
using RotaryToCache =
    Tensor(const Tensor&, int64_t, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, Tensor&);

py::cpp_function bind(const std::string& name) {
    if (name.rfind("block_quant_matmul", 0) == 0) return Bound<BlockQuant>::of(name);
    if (name == "cached_attention") return Bound<CachedAttention>::of(name);
    if (name == "prompt_attention_amx") return Bound<PromptAttention>::of(name);
    if (name == "rotary_to_cache") return Bound<RotaryToCache>::of(name);
    if (name == "rms_norm") return Bound<Tensor(const Tensor&, const Tensor&, double)>::of(name);
    if (name == "add_rms_norm") return Bound<AddRmsNorm>::of(name);
    if (name == "silu_mul") return Bound<SiluMul>::of(name);
    throw py::key_error("no direct call for llmfleet::" + name);
}

// One 4-bit product of a layer (worker.block_quant.BlockQuantLinear), its weights as one matrix.
struct Product {
    Tensor packed, scales;
    std::optional<Tensor> mins;
};

// A prompt chunk's rows in a step: its slot, its first row's position, its rows.
using Chunk = std::tuple<int64_t, int64_t, int64_t>;

// A step's layers, one call from Python instead of ~10 a layer: the ops that worker.llama_runner.LlamaRunner._layers
// calls for a step, in the same order on the same inputs, so its results are the same bits, without the Python between
// them (~0.8 ms of a one-sequence decode step of 5.7 ms on Zen 4). Its products run on the vector kernel (`matmul`),
// the rows from `tile_start` on on `tiles`, as BlockQuantLinear.rows_call splits them; its rows attend with
// cached_attention, but for the prompt chunks' rows on AMX, which attend with prompt_attention_amx (KernelAttention).
struct LayerChain {
    c10::TypedOperatorHandle<BlockQuant> matmul, tiles;
    c10::TypedOperatorHandle<RotaryToCache> rotary;
    c10::TypedOperatorHandle<CachedAttention> attention;
    std::optional<c10::TypedOperatorHandle<PromptAttention>> prompt_attention;
    c10::TypedOperatorHandle<AddRmsNorm> add_norm;
    c10::TypedOperatorHandle<SiluMul> silu_mul;
    std::vector<Product> qkv, o, gate_up, down;
    std::vector<Tensor> attention_norms, next_norms, k_cache, v_cache;
    Tensor cos, sin;
    int64_t heads, kv_heads, head_dim, group_size, bits;
    double eps, scale;

    Tensor product(const Product& w, const Tensor& x, int64_t tile_start) const {
        const auto call = [&](const c10::TypedOperatorHandle<BlockQuant>& op, const Tensor& rows) {
            return op.call(rows, w.packed, w.scales, w.mins, group_size, bits);
        };
        if (tile_start >= x.size(0)) return call(matmul, x);
        if (tile_start == 0) return call(tiles, x);
        const int64_t rest = x.size(0) - tile_start;
        return at::cat({call(matmul, x.narrow(0, 0, tile_start)), call(tiles, x.narrow(0, tile_start, rest))});
    }

    // Into `out`: the rows before the chunks' with cached_attention, each chunk's with prompt_attention.
    void attend(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& slots, const Tensor& lengths,
                const std::vector<Chunk>& chunks, Tensor& out) const {
        const auto grouped = [&](const Tensor& t) { return t.view({t.size(0), kv_heads, heads / kv_heads, head_dim}); };
        int64_t first = q.size(0);
        for (const auto& chunk : chunks) first -= std::get<2>(chunk);
        if (first) {
            Tensor rows = grouped(out.narrow(0, 0, first));
            attention.call(grouped(q.narrow(0, 0, first)), keys, values, slots.narrow(0, 0, first),
                           lengths.narrow(0, 0, first), scale, rows);
        }
        for (const auto& [slot, start, n] : chunks) {
            Tensor rows = grouped(out.narrow(0, first, n));
            prompt_attention->call(grouped(q.narrow(0, first, n)), keys, values, slot, start, scale, rows);
            first += n;
        }
    }

    // (hidden, normed) after the last layer, from the embedded rows and their first norm. `last_rows`: the rows that
    // go on past the last layer's keys and values (those with logits), where not all do; `chunks`: the prompt chunks
    // whose rows (the step's last) attend with prompt_attention.
    std::tuple<Tensor, Tensor> operator()(Tensor hidden, Tensor normed, Tensor slots, const Tensor& positions,
                                          Tensor lengths, int64_t tile_start, const std::optional<Tensor>& last_rows,
                                          std::vector<Chunk> chunks) const {
        TORCH_CHECK(chunks.empty() || prompt_attention, "layer_chain: prompt chunks need prompt_attention_amx");
        for (size_t i = 0; i < qkv.size(); ++i) {
            Tensor keys = k_cache[i], values = v_cache[i];  // handles of the cache, which the ops write
            Tensor q = rotary.call(product(qkv[i], normed, tile_start).view({hidden.size(0), -1, head_dim}), heads, cos,
                                   sin, slots, positions, keys, values);
            if (last_rows && i + 1 == qkv.size()) {
                q = q.index_select(0, *last_rows);
                hidden = hidden.index_select(0, *last_rows);
                slots = slots.index_select(0, *last_rows);
                lengths = lengths.index_select(0, *last_rows);
                for (auto& [slot, start, n] : chunks) std::tie(start, n) = std::make_tuple(start + n - 1, 1);
            }
            Tensor out = at::empty({q.size(0), heads, head_dim}, q.options());
            attend(q, keys, values, slots, lengths, chunks, out);
            const Tensor attended = product(o[i], out.view({q.size(0), heads * head_dim}), tile_start);
            std::tie(hidden, normed) = add_norm.call(hidden, attended, attention_norms[i], eps);
            std::tie(hidden, normed) = add_norm.call(
                hidden, product(down[i], silu_mul.call(product(gate_up[i], normed, tile_start)), tile_start),
                next_norms[i], eps);
        }
        return {hidden, normed};
    }
};

std::vector<Product> products(const std::vector<Tensor>& packed, const std::vector<Tensor>& scales,
                              const std::vector<std::optional<Tensor>>& mins) {
    std::vector<Product> all;
    for (size_t i = 0; i < packed.size(); ++i) all.push_back({packed[i], scales[i], mins[i]});
    return all;
}

// layer_chain(matmul op name, tile op name, prompt attention op name or "", [qkv, o, gate_up, down] as (packed,
// scales, mins) lists each, ...): LayerChain as a Python function (hidden, normed, slots, positions, lengths,
// tile_start, last_rows, chunks as (slot, start, rows) tuples) -> (hidden, normed), run with the GIL released.
py::cpp_function layer_chain(const std::string& matmul, const std::string& tiles, const std::string& prompt_attention,
                             const std::vector<std::vector<Tensor>>& packed,
                             const std::vector<std::vector<Tensor>>& scales,
                             const std::vector<std::vector<std::optional<Tensor>>>& mins,
                             std::vector<Tensor> attention_norms, std::vector<Tensor> next_norms,
                             std::vector<Tensor> k_cache, std::vector<Tensor> v_cache, Tensor cos, Tensor sin,
                             int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t group_size, int64_t bits,
                             double eps, double scale) {
    TORCH_CHECK(packed.size() == 4 && scales.size() == 4 && mins.size() == 4, "layer_chain: qkv, o, gate_up, down");
    std::optional<c10::TypedOperatorHandle<PromptAttention>> prompt;
    if (!prompt_attention.empty()) prompt = find<PromptAttention>(prompt_attention);
    LayerChain chain{find<BlockQuant>(matmul),
                     find<BlockQuant>(tiles),
                     find<RotaryToCache>("rotary_to_cache"),
                     find<CachedAttention>("cached_attention"),
                     prompt,
                     find<AddRmsNorm>("add_rms_norm"),
                     find<SiluMul>("silu_mul"),
                     products(packed[0], scales[0], mins[0]),
                     products(packed[1], scales[1], mins[1]),
                     products(packed[2], scales[2], mins[2]),
                     products(packed[3], scales[3], mins[3]),
                     std::move(attention_norms), std::move(next_norms), std::move(k_cache), std::move(v_cache),
                     std::move(cos), std::move(sin), heads, kv_heads, head_dim, group_size, bits, eps, scale};
    return py::cpp_function(
        [chain](Tensor hidden, Tensor normed, Tensor slots, const Tensor& positions, Tensor lengths, int64_t tile_start,
                const std::optional<Tensor>& last_rows, std::vector<Chunk> chunks) {
            return chain(std::move(hidden), std::move(normed), std::move(slots), positions, std::move(lengths),
                         tile_start, last_rows, std::move(chunks));
        },
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("bind", &bind, "Op llmfleet::`name` as a direct call.");
    module.def("layer_chain", &layer_chain, "A step's layers as one call (LayerChain).");
}
