// kd/model/transformer.hpp: the decoder (Qwen3-MoE teacher or Llama student), written once against the
// op interface of ops.hpp, forward and backward.
//
// One object holds the parameter arena, its gradient arena and the activations of the last forward.
// forward() keeps what backward() needs (training) or only what the caller can read (inference: one set
// of per-layer scratch reused by every layer, hidden states and router outputs kept). It returns what a
// distillation loss needs: logits or the final normed hidden state (for the fused linear losses), the
// residual stream after any layer, attention maps of the layers asked for, and router logits,
// probabilities and expert choices with per-expert token counts. backward() takes the gradient of the
// loss with respect to any of those and fills the gradient arena.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <kd/model/ops.hpp>
#include <kd/model/parameters.hpp>
#include <kd/core/numeric.hpp>
#include <kd/core/parallel.hpp>
#include <kd/core/rng.hpp>
#include <kd/core/status.hpp>

namespace kd::model {

namespace detail {

// out[i] ~ N(0, stddev) from (seed, stream, i) alone: Box-Muller over two hashed uniforms.
template <class T>
void fill_normal(std::vector<T>& out, double stddev, std::uint64_t seed, std::uint64_t stream) {
  const std::size_t n = out.size();
  const std::uint64_t key = stream_key(seed, stream);
  // Counter-based, so the split never changes a value; ~250 units of work per element puts a thread on
  // each ~64k elements.
  parallel_blocks(static_cast<std::int64_t>(n), 250.0 * static_cast<double>(n), [&](std::int64_t b, std::int64_t e) {
    for (auto i = static_cast<std::size_t>(b); i < static_cast<std::size_t>(e); ++i) {
      const double u1 = 1.0 - uniform_at(key, 2 * i);  // (0, 1]
      out[i] = store_as<T>(stddev * box_muller(u1, uniform_at(key, 2 * i + 1)));
    }
  });
}

}  // namespace detail

struct forward_options {
  bool training = true;                        // keep activations for backward()
  bool logits = true;                          // compute logits [tokens, vocab] (else only the final hidden)
  std::vector<std::int64_t> attention_layers;  // layers whose attention maps are materialised
  // Routing replay: per layer (empty for dense layers) host expert ids [tokens, top_k] used instead of the
  // router's own top-k; the weights still come from this model's router probabilities. Comparing two
  // models or precisions under one routing isolates numerics from near-tie routing flips (a bf16 MoE
  // routes ~1% of tokens differently from fp64 at ties within rounding).
  const std::vector<std::vector<index_t>>* replay_routing = nullptr;
};

// Gradients of the loss with respect to forward()'s outputs; every pointer is optional (backend memory).
template <class T, class A>
struct backward_inputs {
  const T* d_logits = nullptr;        // [tokens, vocab]
  const T* d_final_hidden = nullptr;  // [tokens, hidden]: w.r.t. final_hidden() (fused linear losses)
  std::vector<std::pair<std::int64_t, const T*>> d_hidden;         // layer l -> [tokens, hidden] w.r.t. hidden(l)
  std::vector<std::pair<std::int64_t, const T*>> d_attention;      // layer l -> [batch, heads, seq, seq]
  std::vector<std::pair<std::int64_t, const T*>> d_router_logits;  // layer l -> [tokens, experts]
  // Called after layer l's backward (l from the last layer down): its parameters' gradients (and those of
  // every later layer and the final norm) are then final, so a data-parallel step can start reducing them
  // while the earlier layers run (kd::train::distill_step's gradient buckets).
  std::function<status(std::int64_t)> on_layer_done;
};

// How backward() writes the gradient arena.
enum class grad_mode {
  accumulate,  // add to it (gradient accumulation over micro-batches; zero_grads() before the first)
  overwrite,   // replace it: every weight's first gradient write overwrites, so no zero_grads() pass over
               // the whole arena (2 GB for the seed teacher) is needed
};

template <ModelBackend B>
class transformer {
 public:
  using value_type = typename B::value_type;
  using acc_type = typename B::acc_type;
  using T = value_type;
  using A = acc_type;
  template <class U>
  using buffer = typename B::template buffer<U>;
  using grads_in = backward_inputs<T, A>;

  transformer(B& backend, model::arch a) : b_(&backend), table_(a), arch_(table_.arch()) {}
  transformer(const transformer&) = delete;
  transformer& operator=(const transformer&) = delete;

  // Allocates the parameter arena (zero) and, with `with_grads`, the gradient arena, after the backend
  // accepted the architecture (B::can_implement: e.g. the CUDA kernels' limits on experts and top-k).
  status allocate(bool with_grads) {
    if (arch_.hidden <= 0 || arch_.layers.empty()) return {errc::invalid_argument, "transformer: empty architecture"};
    KD_TRY(B::can_implement(arch_));  // a model the backend cannot run fails here, not at its first forward
    // The fused QKV projection reads the q, k, v weights (and writes their gradients) as one matrix.
    const auto H = static_cast<std::size_t>(arch_.hidden);
    for (std::int64_t l = 0; l < arch_.num_layers(); ++l) {
      const layer_offsets& p = table_.layer(l);
      if (p.k != p.q + static_cast<std::size_t>(arch_.q_width()) * H || p.v != p.k + static_cast<std::size_t>(arch_.kv_width()) * H)
        return {errc::invalid_argument, "transformer: the q, k and v weights of layer " + std::to_string(l) +
                                            " are not adjacent in the parameter table"};
    }
    params_ = b_->template alloc<T>(table_.size());
    if (params_.size() != table_.size()) return alloc_error("parameters", table_.size() * sizeof(T));
    if (with_grads) {
      grads_ = b_->template alloc<T>(table_.size());
      if (grads_.size() != table_.size()) return alloc_error("gradients", table_.size() * sizeof(T));
    }
    return {};
  }

  // N(0, range) for matrices, 1 for norm weights (HF's _init_weights for these models), from `seed`.
  // Counter-based (element i of tensor t draws from hash(seed, t, i)) and split over threads, so the
  // 978M-parameter teacher initialises in about a second and the result never depends on the thread count.
  status initialize(double range, std::uint64_t seed) {
    if (params_.size() != table_.size()) return {errc::invalid_argument, "transformer: allocate() first"};
    std::vector<T> host;
    const auto& entries = table_.entries();
    for (std::size_t t = 0; t < entries.size(); ++t) {
      const param_entry& e = entries[t];
      host.resize(e.numel);
      if (e.kind == param_kind::norm)
        std::fill(host.begin(), host.end(), store_as<T>(1.0));
      else
        detail::fill_normal(host, range, seed, t);
      KD_TRY(b_->upload(host.data(), host.size(), params_.data() + e.offset));
    }
    return {};
  }

  [[nodiscard]] B& backend() const noexcept { return *b_; }
  [[nodiscard]] const parameter_table& table() const noexcept { return table_; }
  [[nodiscard]] const model::arch& arch() const noexcept { return arch_; }
  [[nodiscard]] T* params() noexcept { return params_.data(); }
  [[nodiscard]] const T* params() const noexcept { return params_.data(); }
  [[nodiscard]] T* grads() noexcept { return grads_.data(); }
  [[nodiscard]] bool has_grads() const noexcept { return grads_.size() == table_.size(); }
  status zero_grads() {
    if (!has_grads()) return {errc::invalid_argument, "transformer: allocated without gradients"};
    return b_->fill_zero(grads_.data(), grads_.size());
  }

  // ---------------------------------------------------------------------------------------------
  // Forward
  // ---------------------------------------------------------------------------------------------

  // ids: host token ids [batch, seq], each sequence causal on its own.
  status forward(std::span<const index_t> ids, std::int64_t batch, std::int64_t seq, const forward_options& opt = {}) {
    if (params_.size() != table_.size()) return {errc::invalid_argument, "transformer: allocate() first"};
    if (batch <= 0 || seq <= 0)
      return {errc::invalid_argument, "forward: batch and seq must be positive, got " + std::to_string(batch) +
                                          " x " + std::to_string(seq)};
    if (static_cast<std::int64_t>(ids.size()) != batch * seq)
      return {errc::shape_mismatch, "forward: " + std::to_string(ids.size()) + " token ids for batch " +
                                        std::to_string(batch) + " x seq " + std::to_string(seq)};
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= arch_.vocab)
        return {errc::out_of_range, "forward: token id " + std::to_string(ids[i]) + " at position " +
                                        std::to_string(i) + " is outside the vocabulary [0, " +
                                        std::to_string(arch_.vocab) + ")"};
    for (std::int64_t l : opt.attention_layers)
      if (l < 0 || l >= arch_.num_layers())
        return {errc::out_of_range, "forward: attention layer " + std::to_string(l) + " outside [0, " +
                                        std::to_string(arch_.num_layers()) + ")"};
    KD_TRY(prepare(batch, seq, opt));
    std::vector<index_t> pos(static_cast<std::size_t>(n_));
    for (std::int64_t i = 0; i < n_; ++i) pos[static_cast<std::size_t>(i)] = static_cast<index_t>(i % seq);
    KD_TRY(b_->upload(ids.data(), ids.size(), ids_.data()));
    KD_TRY(b_->upload(pos.data(), pos.size(), pos_.data()));
    if (arch_.qk_norm) KD_TRY(b_->rope_cache(pos_.data(), n_, arch_.head_dim, arch_.theta));  // pos is fixed until the next forward

    const std::int64_t H = arch_.hidden;
    KD_TRY(b_->embedding(ids_.data(), w(table_.embed()), hs_[0].data(), n_, arch_.vocab, H));
    for (std::int64_t l = 0; l < arch_.num_layers(); ++l) KD_TRY(layer_forward(l));
    const T* last = hs_.back().data();
    KD_TRY(b_->rmsnorm(last, w(table_.final_norm()), xf_.data(), rstd_f_.data(), n_, H, arch_.eps));
    if (opt.logits) KD_TRY(b_->linear(xf_.data(), w(table_.head()), logits_.data(), n_, arch_.vocab, H, false));
    forwarded_ = true;
    return {};
  }

  [[nodiscard]] std::int64_t tokens() const noexcept { return n_; }
  [[nodiscard]] std::int64_t batch() const noexcept { return batch_; }
  [[nodiscard]] std::int64_t seq() const noexcept { return seq_; }
  // [tokens, vocab] (only with forward_options::logits).
  [[nodiscard]] const T* logits() const noexcept { return opt_.logits ? logits_.data() : nullptr; }
  // Writable: backward() never reads the logits, so a loss may overwrite them with their gradient in
  // place and pass the same pointer as d_logits (saves a tokens x vocab buffer).
  [[nodiscard]] T* logits() noexcept { return opt_.logits ? logits_.data() : nullptr; }
  // The final normed hidden state [tokens, hidden]: the head's input.
  [[nodiscard]] const T* final_hidden() const noexcept { return xf_.data(); }
  // The residual stream after layer l (l = -1: the embeddings), [tokens, hidden]; HF's hidden_states[l + 1]
  // except the last, which HF reports after the final norm (final_hidden()).
  [[nodiscard]] const T* hidden(std::int64_t l) const noexcept { return hs_[static_cast<std::size_t>(l + 1)].data(); }
  // [batch, heads, seq, seq] for a layer named in forward_options::attention_layers, else nullptr.
  [[nodiscard]] const T* attention(std::int64_t l) const noexcept {
    const auto& p = probs_[static_cast<std::size_t>(l)];
    return p.size() ? p.data() : nullptr;
  }
  // Router outputs of an MoE layer (nullptr / empty for a dense layer).
  [[nodiscard]] const T* router_logits(std::int64_t l) const noexcept { return router(l).logits.data(); }
  [[nodiscard]] const A* router_probs(std::int64_t l) const noexcept { return router(l).probs.data(); }
  [[nodiscard]] const index_t* expert_ids(std::int64_t l) const noexcept { return router(l).topk_idx.data(); }
  [[nodiscard]] const A* expert_weights(std::int64_t l) const noexcept { return router(l).topk_w.data(); }
  // Tokens routed to each expert in the last forward (host): expert-utilization statistics.
  [[nodiscard]] std::span<const std::int64_t> expert_counts(std::int64_t l) const noexcept {
    return router(l).counts;
  }

  // ---------------------------------------------------------------------------------------------
  // Backward
  // ---------------------------------------------------------------------------------------------
  status backward(const grads_in& g, grad_mode mode = grad_mode::accumulate) {
    if (!forwarded_ || !opt_.training)
      return {errc::invalid_argument, "backward: needs a forward() with forward_options::training"};
    if (!has_grads()) return {errc::invalid_argument, "backward: the model was allocated without gradients"};
    if (g.d_logits != nullptr && !opt_.logits)
      return {errc::invalid_argument, "backward: d_logits given but the forward computed no logits"};
    for (const auto& [l, p] : g.d_attention)
      if (l < 0 || l >= arch_.num_layers() || attention(l) == nullptr)
        return {errc::invalid_argument, "backward: d_attention for layer " + std::to_string(l) +
                                            ", whose attention map the forward did not materialise"};
    for (const auto& [l, p] : g.d_hidden)
      if (l < -1 || l >= arch_.num_layers())
        return {errc::out_of_range, "backward: d_hidden for layer " + std::to_string(l) + " outside [-1, " +
                                        std::to_string(arch_.num_layers()) + ")"};
    for (const auto& [l, p] : g.d_router_logits)
      if (l < 0 || l >= arch_.num_layers() || !arch_.layers[static_cast<std::size_t>(l)].moe)
        return {errc::invalid_argument, "backward: d_router_logits for layer " + std::to_string(l) +
                                            ", which has no router"};

    const std::int64_t H = arch_.hidden, V = arch_.vocab;
    const bool acc = mode == grad_mode::accumulate;
    const bool tied = table_.head() == table_.embed();
    const auto table_size = static_cast<std::size_t>(V * H);
    // Head and final norm: d xf, then into the residual stream.
    KD_TRY(b_->fill_zero(bw_.dxn.data(), bw_.dxn.size()));
    if (g.d_logits != nullptr) {
      KD_TRY(b_->linear_dx(g.d_logits, w(table_.head()), bw_.dxn.data(), n_, V, H, false));
      KD_TRY(b_->linear_dw(g.d_logits, xf_.data(), dw(table_.head()), n_, V, H, acc));
    } else if (!acc) {
      KD_TRY(b_->fill_zero(dw(table_.head()), table_size));
    }
    if (g.d_final_hidden != nullptr) KD_TRY(b_->add(bw_.dxn.data(), g.d_final_hidden, bw_.dxn.size()));
    KD_TRY(b_->rmsnorm_bwd(hs_.back().data(), w(table_.final_norm()), rstd_f_.data(), bw_.dxn.data(),
                           bw_.dx.data(), dw(table_.final_norm()), n_, H, false, acc));
    KD_TRY(add_hidden_grad(g, arch_.num_layers() - 1));
    for (std::int64_t l = arch_.num_layers() - 1; l >= 0; --l) {
      KD_TRY(layer_backward(l, g, acc));
      if (g.on_layer_done) KD_TRY(g.on_layer_done(l));
      KD_TRY(add_hidden_grad(g, l - 1));
    }
    // The embedding's gradient is a scatter-add; a tied table already holds the head's gradient.
    if (!acc && !tied) KD_TRY(b_->fill_zero(dw(table_.embed()), table_size));
    return b_->embedding_dw(ids_.data(), bw_.dx.data(), dw(table_.embed()), n_, V, H);
  }

 private:
  struct router_state {
    buffer<T> logits;
    buffer<A> probs, topk_w;
    buffer<index_t> topk_idx, slot_token, token_slot;
    std::vector<std::int64_t> counts;
  };
  // Activations of one layer (per layer in training; one shared set in inference).
  struct layer_state {
    buffer<T> xn1, qkv, q, k, v, o, x_mid, xn2, gu, h, xg, y;  // qkv: the fused projection (kept with QK norm)
    buffer<A> rstd1, rstd_q, rstd_k, lse, rstd2;
  };
  // Backward scratch, sized for the largest layer.
  struct backward_state {
    buffer<T> dx, dxn, d_o, dq, dk, dv, dqkv, dgu, dh, dy, dxg, drouter;
    buffer<A> dtopk;
  };

  static status alloc_error(const std::string& what, std::size_t bytes) {
    return {errc::backend_error, "transformer: cannot allocate " + what + " (" + std::to_string(bytes) + " bytes)"};
  }

  [[nodiscard]] const T* w(std::size_t off) const noexcept { return params_.data() + off; }
  [[nodiscard]] T* dw(std::size_t off) noexcept { return grads_.data() + off; }
  [[nodiscard]] const router_state& router(std::int64_t l) const noexcept {
    return routers_[static_cast<std::size_t>(l)];
  }
  [[nodiscard]] layer_state& state(std::int64_t l) noexcept {
    return states_[opt_.training ? static_cast<std::size_t>(l) : 0];
  }

  template <class U>
  status alloc(buffer<U>& out, std::int64_t n, const char* what) {
    out = b_->template alloc<U>(static_cast<std::size_t>(n));
    if (static_cast<std::int64_t>(out.size()) != n) return alloc_error(what, static_cast<std::size_t>(n) * sizeof(U));
    return {};
  }

  // Sizes every activation for (batch, seq, options); reuses the buffers when nothing changed.
  status prepare(std::int64_t batch, std::int64_t seq, const forward_options& opt) {
    const bool same = batch == batch_ && seq == seq_ && opt.training == opt_.training && opt.logits == opt_.logits &&
                      opt.attention_layers == opt_.attention_layers && !states_.empty();
    forwarded_ = false;
    opt_ = opt;  // the replay pointer may change between calls of the same shape
    if (same) return {};
    batch_ = batch;
    seq_ = seq;
    n_ = batch * seq;
    const auto& a = arch_;
    const std::int64_t n = n_, H = a.hidden, L = a.num_layers(), Q = a.q_width(), KV = a.kv_width();
    states_.clear();
    routers_.clear();
    hs_.clear();
    probs_.clear();
    KD_TRY(alloc(ids_, n, "token ids"));
    KD_TRY(alloc(pos_, n, "positions"));
    hs_.resize(static_cast<std::size_t>(L + 1));
    for (auto& h : hs_) KD_TRY(alloc(h, n * H, "hidden states"));
    KD_TRY(alloc(xf_, n * H, "final hidden"));
    KD_TRY(alloc(rstd_f_, n, "final norm"));
    if (opt.logits) KD_TRY(alloc(logits_, n * a.vocab, "logits"));
    else logits_ = buffer<T>{};
    std::int64_t max_rows = n, max_i = 0;
    bool any_moe = false;
    for (const auto& la : a.layers) {
      max_i = std::max(max_i, la.intermediate);
      if (la.moe) max_rows = std::max(max_rows, n * a.top_k);
      any_moe = any_moe || la.moe;
    }
    states_.resize(opt.training ? static_cast<std::size_t>(L) : 1);
    for (std::size_t s = 0; s < states_.size(); ++s) {
      // In inference one set serves every layer, so it takes the largest layer's sizes.
      const bool moe = opt.training ? a.layers[s].moe : any_moe;
      const std::int64_t I = opt.training ? a.layers[s].intermediate : max_i;
      const std::int64_t rows = moe ? n * a.top_k : n;
      layer_state& st = states_[s];
      KD_TRY(alloc(st.xn1, n * H, "activations"));
      if (a.qk_norm) {  // the QK norm's backward reads its input, the q and k columns of qkv
        KD_TRY(alloc(st.qkv, n * (Q + 2 * KV), "activations"));
        KD_TRY(alloc(st.rstd_q, n * a.heads, "activations"));
        KD_TRY(alloc(st.rstd_k, n * a.kv_heads, "activations"));
      }
      KD_TRY(alloc(st.q, n * Q, "activations"));
      KD_TRY(alloc(st.k, n * KV, "activations"));
      KD_TRY(alloc(st.v, n * KV, "activations"));
      KD_TRY(alloc(st.o, n * Q, "activations"));
      KD_TRY(alloc(st.lse, n * a.heads, "activations"));
      KD_TRY(alloc(st.rstd1, n, "activations"));
      KD_TRY(alloc(st.rstd2, n, "activations"));
      KD_TRY(alloc(st.x_mid, n * H, "activations"));
      KD_TRY(alloc(st.xn2, n * H, "activations"));
      KD_TRY(alloc(st.gu, std::max(rows, n) * 2 * I, "activations"));
      KD_TRY(alloc(st.h, std::max(rows, n) * I, "activations"));
      if (moe) {
        KD_TRY(alloc(st.xg, rows * H, "activations"));
        KD_TRY(alloc(st.y, rows * H, "activations"));
      }
    }
    qkv_ = buffer<T>{};
    if (!a.qk_norm) KD_TRY(alloc(qkv_, n * (Q + 2 * KV), "activations"));  // only the forward reads it: shared
    routers_.resize(static_cast<std::size_t>(L));
    probs_.resize(static_cast<std::size_t>(L));
    for (std::int64_t l = 0; l < L; ++l) {
      if (a.layers[static_cast<std::size_t>(l)].moe) {
        router_state& r = routers_[static_cast<std::size_t>(l)];
        KD_TRY(alloc(r.logits, n * a.experts, "router logits"));
        KD_TRY(alloc(r.probs, n * a.experts, "router probabilities"));
        KD_TRY(alloc(r.topk_w, n * a.top_k, "router weights"));
        KD_TRY(alloc(r.topk_idx, n * a.top_k, "expert ids"));
        KD_TRY(alloc(r.slot_token, n * a.top_k, "expert dispatch"));
        KD_TRY(alloc(r.token_slot, n * a.top_k, "expert dispatch"));
        r.counts.assign(static_cast<std::size_t>(a.experts), 0);
      }
    }
    for (std::int64_t l : opt.attention_layers)
      KD_TRY(alloc(probs_[static_cast<std::size_t>(l)], batch * a.heads * seq * seq, "attention maps"));
    bw_ = backward_state{};
    if (opt.training) {
      KD_TRY(alloc(bw_.dx, n * H, "gradients"));
      KD_TRY(alloc(bw_.dxn, n * H, "gradients"));
      KD_TRY(alloc(bw_.d_o, n * Q, "gradients"));
      KD_TRY(alloc(bw_.dq, n * Q, "gradients"));
      KD_TRY(alloc(bw_.dk, n * KV, "gradients"));
      KD_TRY(alloc(bw_.dv, n * KV, "gradients"));
      KD_TRY(alloc(bw_.dqkv, n * (Q + 2 * KV), "gradients"));
      KD_TRY(alloc(bw_.dgu, max_rows * 2 * max_i, "gradients"));
      KD_TRY(alloc(bw_.dh, max_rows * max_i, "gradients"));
      if (any_moe) {
        KD_TRY(alloc(bw_.dy, max_rows * H, "gradients"));
        KD_TRY(alloc(bw_.dxg, max_rows * H, "gradients"));
        KD_TRY(alloc(bw_.drouter, n * a.experts, "gradients"));
        KD_TRY(alloc(bw_.dtopk, n * a.top_k, "gradients"));
      }
    }
    return {};
  }

  [[nodiscard]] double scale() const noexcept { return 1.0 / std::sqrt(static_cast<double>(arch_.head_dim)); }

  status layer_forward(std::int64_t l) {
    const auto& a = arch_;
    const layer_offsets& p = table_.layer(l);
    const layer_arch& la = a.layers[static_cast<std::size_t>(l)];
    layer_state& st = state(l);
    const std::int64_t n = n_, H = a.hidden, Q = a.q_width(), KV = a.kv_width(), D = a.head_dim;
    const T* x = hs_[static_cast<std::size_t>(l)].data();
    T* out = hs_[static_cast<std::size_t>(l + 1)].data();

    // Attention block: x_mid = x + o_proj(attn(rope(qk_norm(W x_n)))). The q, k and v weights are adjacent in
    // the arena (parameter_table), so the three projections are one GEMM into qkv [n, Q + 2 KV]: one wide
    // GEMM runs much closer to the GPU's peak than the two narrow k / v ones did.
    // The norm also copies x into x_mid, which the o projection then accumulates into (x stays for backward).
    KD_TRY(b_->rmsnorm(x, w(p.input_norm), st.xn1.data(), st.rstd1.data(), n, H, a.eps, st.x_mid.data()));
    const std::int64_t QKV = Q + 2 * KV;
    T* qkv = a.qk_norm ? st.qkv.data() : qkv_.data();
    KD_TRY(b_->linear(st.xn1.data(), w(p.q), qkv, n, QKV, H, false));
    if (a.qk_norm) {  // per-head QK norm and RoPE in one op, reading the q / k columns in place
      KD_TRY(b_->rmsnorm_rope(qkv, w(p.q_norm), st.q.data(), st.rstd_q.data(), pos_.data(), n, a.heads, D, a.eps,
                              a.theta, QKV));
      KD_TRY(b_->rmsnorm_rope(qkv + Q, w(p.k_norm), st.k.data(), st.rstd_k.data(), pos_.data(), n, a.kv_heads, D,
                              a.eps, a.theta, QKV));
    } else {
      KD_TRY(b_->copy_rows(qkv, QKV, st.q.data(), Q, n, Q));
      KD_TRY(b_->copy_rows(qkv + Q, QKV, st.k.data(), KV, n, KV));
      KD_TRY(b_->rope(st.q.data(), pos_.data(), n, a.heads, D, a.theta, false));
      KD_TRY(b_->rope(st.k.data(), pos_.data(), n, a.kv_heads, D, a.theta, false));
    }
    KD_TRY(b_->copy_rows(qkv + Q + KV, QKV, st.v.data(), KV, n, KV));
    KD_TRY(b_->attention(st.q.data(), st.k.data(), st.v.data(), st.o.data(), st.lse.data(), batch_, seq_, a.heads,
                         a.kv_heads, D, scale()));
    if (auto& pr = probs_[static_cast<std::size_t>(l)]; pr.size())
      KD_TRY(b_->attention_probs(st.q.data(), st.k.data(), st.lse.data(), pr.data(), batch_, seq_, a.heads,
                                 a.kv_heads, D, scale()));
    KD_TRY(b_->linear(st.o.data(), w(p.o), st.x_mid.data(), n, H, Q, true));

    // MLP block: out = x_mid + mlp(x_mid_n).
    const std::int64_t I = la.intermediate;
    // Dense: out starts as a copy of x_mid (made by the norm) that the down projection accumulates into;
    // MoE: the combine takes x_mid as its residual.
    KD_TRY(b_->rmsnorm(st.x_mid.data(), w(p.post_norm), st.xn2.data(), st.rstd2.data(), n, H, a.eps,
                       la.moe ? nullptr : out));
    if (!la.moe) {
      KD_TRY(b_->linear(st.xn2.data(), w(p.gate_up), st.gu.data(), n, 2 * I, H, false));
      KD_TRY(b_->swiglu(st.gu.data(), st.h.data(), n, I));
      return b_->linear(st.h.data(), w(p.down), out, n, H, I, true);
    }
    // Dropless MoE: route, group the (token, choice) pairs by expert, one GEMM pair per expert, combine
    // onto the residual. The gather does not need the expert sizes, so it is queued before waiting for them.
    router_state& r = routers_[static_cast<std::size_t>(l)];
    const std::int64_t E = a.experts, k = a.top_k, S = n * k;
    KD_TRY(b_->linear(st.xn2.data(), w(p.router), r.logits.data(), n, E, H, false));
    KD_TRY(b_->router(r.logits.data(), r.probs.data(), r.topk_idx.data(), r.topk_w.data(), n, E, k, a.renorm_topk));
    if (opt_.replay_routing != nullptr) KD_TRY(replay_routing(l, r));
    KD_TRY(b_->moe_dispatch(r.topk_idx.data(), n, E, k, r.slot_token.data(), r.token_slot.data(), r.counts.data()));
    KD_TRY(b_->gather_rows(st.xn2.data(), r.slot_token.data(), st.xg.data(), S, H));
    KD_TRY(b_->sync_counts());
    KD_TRY(b_->grouped_linear(st.xg.data(), w(p.gate_up), st.gu.data(), r.counts.data(), E, 2 * I, H, false));
    KD_TRY(b_->swiglu(st.gu.data(), st.h.data(), S, I));
    KD_TRY(b_->grouped_linear(st.h.data(), w(p.down), st.y.data(), r.counts.data(), E, H, I, false));
    return b_->moe_combine(st.y.data(), r.token_slot.data(), r.topk_w.data(), st.x_mid.data(), out, n, k, H);
  }

  // Overwrites the router's choices with the replayed ones (host round trip: a testing and analysis path).
  status replay_routing(std::int64_t l, router_state& r) {
    const auto& all = *opt_.replay_routing;
    const std::int64_t n = n_, E = arch_.experts, k = arch_.top_k;
    const std::string where = "forward: replay_routing layer " + std::to_string(l);
    if (static_cast<std::int64_t>(all.size()) != arch_.num_layers())
      return {errc::shape_mismatch, "forward: replay_routing holds " + std::to_string(all.size()) +
                                        " layers, the model has " + std::to_string(arch_.num_layers())};
    const std::vector<index_t>& ids = all[static_cast<std::size_t>(l)];
    if (static_cast<std::int64_t>(ids.size()) != n * k)
      return {errc::shape_mismatch, where + " holds " + std::to_string(ids.size()) + " ids, expected tokens x top_k = " +
                                        std::to_string(n * k)};
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t j = 0; j < k; ++j) {
        const index_t e = ids[static_cast<std::size_t>(t * k + j)];
        if (e < 0 || e >= E)
          return {errc::out_of_range, where + ": token " + std::to_string(t) + " names expert " + std::to_string(e)};
        for (std::int64_t j2 = 0; j2 < j; ++j2)
          if (ids[static_cast<std::size_t>(t * k + j2)] == e)
            return {errc::invalid_argument, where + ": token " + std::to_string(t) + " names expert " +
                                                std::to_string(e) + " twice"};
      }
    std::vector<A> probs(static_cast<std::size_t>(n * E)), w(static_cast<std::size_t>(n * k));
    KD_TRY(b_->download(r.probs.data(), probs.size(), probs.data()));
    for (std::int64_t t = 0; t < n; ++t) {
      A sum = 0;
      for (std::int64_t j = 0; j < k; ++j) {
        const std::size_t i = static_cast<std::size_t>(t * k + j);
        w[i] = probs[static_cast<std::size_t>(t * E + ids[i])];
        sum += w[i];
      }
      if (arch_.renorm_topk)
        for (std::int64_t j = 0; j < k; ++j) w[static_cast<std::size_t>(t * k + j)] /= sum;
    }
    KD_TRY(b_->upload(ids.data(), ids.size(), r.topk_idx.data()));
    return b_->upload(w.data(), w.size(), r.topk_w.data());
  }

  status add_hidden_grad(const grads_in& g, std::int64_t l) {
    for (const auto& [layer, d] : g.d_hidden)
      if (layer == l) KD_TRY(b_->add(bw_.dx.data(), d, bw_.dx.size()));
    return {};
  }

  // bw_.dx holds d loss / d out (the residual after layer l); leaves d loss / d x (before layer l).
  // acc: add to the gradient arena (else this layer's weight gradients are overwritten).
  status layer_backward(std::int64_t l, const grads_in& g, bool acc) {
    const auto& a = arch_;
    const layer_offsets& p = table_.layer(l);
    const layer_arch& la = a.layers[static_cast<std::size_t>(l)];
    layer_state& st = state(l);
    auto& bw = bw_;
    const std::int64_t n = n_, H = a.hidden, Q = a.q_width(), KV = a.kv_width(), D = a.head_dim;
    const std::int64_t I = la.intermediate;
    const T* x = hs_[static_cast<std::size_t>(l)].data();

    // MLP block: d xn2 into bw.dxn, then through the post-attention norm into dx (the residual adds dx).
    if (!la.moe) {
      KD_TRY(b_->linear_dx(bw.dx.data(), w(p.down), bw.dh.data(), n, H, I, false));
      KD_TRY(b_->linear_dw(bw.dx.data(), st.h.data(), dw(p.down), n, H, I, acc));
      KD_TRY(b_->swiglu_bwd(st.gu.data(), bw.dh.data(), bw.dgu.data(), n, I));
      KD_TRY(b_->linear_dw(bw.dgu.data(), st.xn2.data(), dw(p.gate_up), n, 2 * I, H, acc));
      KD_TRY(b_->linear_dx(bw.dgu.data(), w(p.gate_up), bw.dxn.data(), n, 2 * I, H, false));
    } else {
      const router_state& r = routers_[static_cast<std::size_t>(l)];
      const std::int64_t E = a.experts, k = a.top_k, S = n * k;
      KD_TRY(b_->moe_combine_bwd(st.y.data(), r.token_slot.data(), r.topk_w.data(), bw.dx.data(), bw.dy.data(),
                                 bw.dtopk.data(), n, k, H));
      const std::int64_t* counts = r.counts.data();
      KD_TRY(b_->grouped_linear_dx(bw.dy.data(), w(p.down), bw.dh.data(), counts, E, H, I, false));
      KD_TRY(b_->grouped_linear_dw(bw.dy.data(), st.h.data(), dw(p.down), counts, E, H, I, acc));
      KD_TRY(b_->swiglu_bwd(st.gu.data(), bw.dh.data(), bw.dgu.data(), S, I));
      KD_TRY(b_->grouped_linear_dw(bw.dgu.data(), st.xg.data(), dw(p.gate_up), counts, E, 2 * I, H, acc));
      KD_TRY(b_->grouped_linear_dx(bw.dgu.data(), w(p.gate_up), bw.dxg.data(), counts, E, 2 * I, H, false));
      // Router: through the top-k weights, plus any loss on the router logits (load balance, z-loss).
      KD_TRY(b_->router_bwd(r.probs.data(), r.topk_idx.data(), bw.dtopk.data(), nullptr, bw.drouter.data(), n, E, k,
                            a.renorm_topk));
      for (const auto& [layer, d] : g.d_router_logits)
        if (layer == l) KD_TRY(b_->add(bw.drouter.data(), d, static_cast<std::size_t>(n * E)));
      KD_TRY(b_->linear_dw(bw.drouter.data(), st.xn2.data(), dw(p.router), n, E, H, acc));
      // d xn2: the experts' input gradients gathered back to their tokens, plus the router's (fused).
      KD_TRY(b_->moe_gather_add(bw.dxg.data(), r.token_slot.data(), bw.dxn.data(), n, k, H, false, bw.drouter.data(),
                                w(p.router), E));
    }
    KD_TRY(b_->rmsnorm_bwd(st.x_mid.data(), w(p.post_norm), st.rstd2.data(), bw.dxn.data(), bw.dx.data(),
                           dw(p.post_norm), n, H, true, acc));

    // Attention block.
    KD_TRY(b_->linear_dx(bw.dx.data(), w(p.o), bw.d_o.data(), n, H, Q, false));
    KD_TRY(b_->linear_dw(bw.dx.data(), st.o.data(), dw(p.o), n, H, Q, acc));
    KD_TRY(b_->attention_bwd(st.q.data(), st.k.data(), st.v.data(), st.o.data(), st.lse.data(), bw.d_o.data(),
                             bw.dq.data(), bw.dk.data(), bw.dv.data(), batch_, seq_, a.heads, a.kv_heads, D, scale()));
    for (const auto& [layer, d] : g.d_attention)
      if (layer == l)
        KD_TRY(b_->attention_probs_bwd(st.q.data(), st.k.data(), probs_[static_cast<std::size_t>(l)].data(), d,
                                       bw.dq.data(), bw.dk.data(), batch_, seq_, a.heads, a.kv_heads, D, scale()));
    // Gradients of the fused projection's output, assembled in dqkv [n, Q + 2 KV]: one GEMM each for the
    // weight gradient (the q, k, v gradients are adjacent too) and the input gradient.
    const std::int64_t QKV = Q + 2 * KV;
    T* dqkv = bw.dqkv.data();
    if (a.qk_norm) {
      KD_TRY(b_->rmsnorm_rope_bwd(st.qkv.data(), w(p.q_norm), st.rstd_q.data(), pos_.data(), bw.dq.data(), dqkv,
                                  dw(p.q_norm), n, a.heads, D, a.theta, QKV, acc));
      KD_TRY(b_->rmsnorm_rope_bwd(st.qkv.data() + Q, w(p.k_norm), st.rstd_k.data(), pos_.data(), bw.dk.data(),
                                  dqkv + Q, dw(p.k_norm), n, a.kv_heads, D, a.theta, QKV, acc));
    } else {
      KD_TRY(b_->rope(bw.dq.data(), pos_.data(), n, a.heads, D, a.theta, true));
      KD_TRY(b_->rope(bw.dk.data(), pos_.data(), n, a.kv_heads, D, a.theta, true));
      KD_TRY(b_->copy_rows(bw.dq.data(), Q, dqkv, QKV, n, Q));
      KD_TRY(b_->copy_rows(bw.dk.data(), KV, dqkv + Q, QKV, n, KV));
    }
    KD_TRY(b_->copy_rows(bw.dv.data(), KV, dqkv + Q + KV, QKV, n, KV));
    KD_TRY(b_->linear_dw(dqkv, st.xn1.data(), dw(p.q), n, QKV, H, acc));
    KD_TRY(b_->linear_dx(dqkv, w(p.q), bw.dxn.data(), n, QKV, H, false));
    return b_->rmsnorm_bwd(x, w(p.input_norm), st.rstd1.data(), bw.dxn.data(), bw.dx.data(), dw(p.input_norm), n, H,
                           true, acc);
  }

  B* b_;
  parameter_table table_;
  const model::arch& arch_;
  buffer<T> params_, grads_;
  forward_options opt_;
  bool forwarded_ = false;
  std::int64_t batch_ = 0, seq_ = 0, n_ = 0;
  buffer<index_t> ids_, pos_;
  std::vector<buffer<T>> hs_;
  buffer<T> xf_, logits_;
  buffer<A> rstd_f_;
  std::vector<layer_state> states_;
  std::vector<router_state> routers_;
  std::vector<buffer<T>> probs_;
  buffer<T> qkv_;  // the fused projection's output without QK norm (forward only, shared by the layers)
  backward_state bw_;
};

}  // namespace kd::model
