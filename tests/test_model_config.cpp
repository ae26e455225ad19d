// Tests for kd::model::moe_config / dense_config (kd/model/config.hpp) and their Hugging Face config.json
// (kd/io/config_json.hpp): exact parameter counts, validation, JSON round trips, reading configs in the
// format transformers writes, rejecting corrupt ones.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <kd/model/config.hpp>
#include <kd/io/config_json.hpp>

#include "test_util.hpp"

namespace {

using kd::model::dense_config;
using kd::model::moe_config;
using kdtest::contains;
using json = nlohmann::json;

// Checks that s failed with code `code` and a message containing `needle`.
void check_fails(const kd::status& s, kd::errc code, const std::string& needle) {
  CHECK_FALSE(s.ok());
  CHECK(s.code() == code);
  CHECK_MESSAGE(contains(s.message(), needle), "message: ", s.message(), " | expected: ", needle);
}

template <class Config, class Mutate>
kd::status validate_with(Config c, Mutate m) {
  m(c);
  return c.validate();
}

}  // namespace

// =====================================================================================================
// Parameter counts
// =====================================================================================================
TEST_CASE("seed_teacher: 978,309,120 parameters, 525,324,288 active") {
  // Qwen3-MoE, V = 151,936, H = 1024, L = 24, 16 heads / 4 KV heads of 64, E = 8 experts top-2 of width 1024.
  //   embed_tokens          151,936 * 1024                       = 155,582,464
  //   lm_head (untied)      151,936 * 1024                       = 155,582,464
  //   final norm                                                 =       1,024
  //   per layer:
  //     q_proj 1024 * (16 * 64) = 1,048,576; k_proj, v_proj 1024 * (4 * 64) = 262,144 each;
  //     o_proj (16 * 64) * 1024 = 1,048,576                       =   2,621,440
  //     q_norm + k_norm         64 + 64                          =         128
  //     input / post-attention layernorms  2 * 1024              =       2,048
  //     router gate           8 * 1024                           =       8,192
  //     experts               8 * 3 * 1024 * 1024                =  25,165,824
  //     layer total                                              =  27,797,632
  //   24 layers               24 * 27,797,632                    = 667,143,168
  //   total  155,582,464 * 2 + 1,024 + 667,143,168               = 978,309,120   (the seed's "978M")
  // Active: 6 of the 8 experts idle per layer: 24 * 6 * 3,145,728 = 452,984,832 fewer = 525,324,288.
  const moe_config t = kd::model::seed_teacher();
  REQUIRE(t.validate().ok());
  CHECK(t.num_sparse_layers() == 24);
  CHECK(t.parameter_count() == 978'309'120);
  CHECK(t.active_parameter_count() == 525'324'288);
  CHECK(t.expert_parameter_count() == 24LL * 8 * 3'145'728);
  CHECK(t.vocab_size == 151'936);
  CHECK_FALSE(t.tie_word_embeddings);
  CHECK(t.norm_topk_prob);
}

TEST_CASE("seed_student: 135,178,560 parameters (SmolLM-135M geometry, vocabulary 50,304, tied)") {
  // Llama, V = 50,304, H = 576, MLP 1536, L = 30, 9 heads / 3 KV heads of 64, tied.
  //   embed_tokens (= lm_head)  50,304 * 576                     =  28,975,104
  //   per layer:
  //     q_proj 576 * 576 = 331,776; k_proj, v_proj 576 * 192 = 110,592 each; o_proj 331,776
  //                                                              =     884,736
  //     MLP gate, up, down 3 * 576 * 1536                        =   2,654,208
  //     layernorms 2 * 576                                       =       1,152
  //     layer total                                              =   3,540,096
  //   30 layers                                                  = 106,202,880
  //   final norm                                                 =         576
  //   total                                                      = 135,178,560
  // (SmolLM-135M itself, vocabulary 49,152: 28,311,552 + 106,202,880 + 576 = 134,515,008.)
  const dense_config s = kd::model::seed_student();
  REQUIRE(s.validate().ok());
  CHECK(s.parameter_count() == 135'178'560);
  CHECK(s.active_parameter_count() == 135'178'560);
  CHECK(s.head_dim == 64);
  CHECK(s.rms_norm_eps == 1e-5);
  CHECK(s.rope_theta == 10000.0);
  CHECK(s.tie_word_embeddings);
  dense_config untied = s;
  untied.tie_word_embeddings = false;
  CHECK(untied.parameter_count() == 135'178'560 + 28'975'104);
}

TEST_CASE("demo presets: 211,199,488 (173,450,752 active) and 19,173,632 parameters") {
  // Teacher: V = 151,936, H = 512, L = 8, 8 heads / 2 KV heads of 64, 8 experts top-2 of width 512, untied.
  //   embed + lm_head 2 * 151,936 * 512 = 2 * 77,791,232          = 155,582,464
  //   per layer: q 512*512 = 262,144; k, v 512*128 = 65,536 each; o 262,144 = 655,360
  //              + q/k norms 128 + layernorms 1,024 + router 8*512 = 4,096
  //              + experts 8 * 3 * 512 * 512 = 6,291,456          =   6,952,064
  //   8 layers                                                    =  55,616,512
  //   final norm 512; total                                       = 211,199,488
  //   active: 8 layers * 6 idle experts * 786,432 = 37,748,736 fewer = 173,450,752
  const moe_config t = kd::model::demo_teacher();
  REQUIRE(t.validate().ok());
  CHECK(t.vocab_size == 151'936);
  CHECK(t.parameter_count() == 211'199'488);
  CHECK(t.active_parameter_count() == 173'450'752);
  // Student: V = 50,304, H = 256, MLP 768, L = 8, 4 heads / 2 KV heads of 64, tied.
  //   embed 50,304 * 256                                          =  12,877,824
  //   per layer: q 65,536 + k, v 32,768 each + o 65,536 = 196,608; MLP 3 * 256 * 768 = 589,824;
  //              layernorms 512                                   =     786,944
  //   8 layers                                                    =   6,295,552
  //   final norm 256; total                                       =  19,173,632
  const dense_config s = kd::model::demo_student();
  REQUIRE(s.validate().ok());
  CHECK(s.vocab_size == 50'304);
  CHECK(s.parameter_count() == 19'173'632);
}

TEST_CASE("tiny presets: 25,088 (18,944 active) and 20,544 parameters") {
  // Teacher: V = 97, H = 32, L = 2, 4 heads / 2 KV heads of 8, 4 experts top-2 of width 16, untied.
  //   embed + lm_head 2 * 97 * 32 = 6,208; final norm 32
  //   per layer: q 32*32 = 1,024; k, v 32*16 = 512 each; o 1,024 -> 3,072; q/k norms 16; layernorms 64;
  //              router 4*32 = 128; experts 4 * 3 * 32 * 16 = 6,144 -> 9,424
  //   total 6,208 + 32 + 2 * 9,424 = 25,088; active: 2 layers * 2 idle experts * 1,536 fewer = 18,944
  const moe_config t = kd::model::tiny_teacher();
  REQUIRE(t.validate().ok());
  CHECK(t.parameter_count() == 25'088);
  CHECK(t.active_parameter_count() == 18'944);
  // Student: V = 61, H = 32, MLP 64, L = 2, 4 heads / 2 KV heads of 8, tied.
  //   embed 61 * 32 = 1,952; per layer 3,072 + 3 * 32 * 64 = 6,144 + 64 -> 9,280; final norm 32
  //   total 1,952 + 2 * 9,280 + 32 = 20,544
  const dense_config s = kd::model::tiny_student();
  REQUIRE(s.validate().ok());
  CHECK(s.parameter_count() == 20'544);
}

TEST_CASE("moe_config: dense layers (mlp_only_layers, decoder_sparse_step) and biases are counted") {
  // tiny teacher with layer 0 dense: its router (128) and experts (6,144) are replaced by a dense SwiGLU of
  // width intermediate_size = 32: 3 * 32 * 32 = 3,072. 25,088 - 6,272 + 3,072 = 21,888.
  moe_config t = kd::model::tiny_teacher();
  t.mlp_only_layers = {0};
  REQUIRE(t.validate().ok());
  CHECK_FALSE(t.is_sparse_layer(0));
  CHECK(t.is_sparse_layer(1));
  CHECK(t.num_sparse_layers() == 1);
  CHECK(t.parameter_count() == 21'888);
  // active: layer 1 keeps router + 2 experts (128 + 3,072); 18,944 - (128 + 3,072) + 3,072 = 18,816.
  CHECK(t.active_parameter_count() == 18'816);

  // decoder_sparse_step 2: only layers with (l + 1) % 2 == 0 are sparse: layer 1 of 2, the same count.
  moe_config step = kd::model::tiny_teacher();
  step.decoder_sparse_step = 2;
  REQUIRE(step.validate().ok());
  CHECK_FALSE(step.is_sparse_layer(0));
  CHECK(step.is_sparse_layer(1));
  CHECK(step.parameter_count() == 21'888);

  // attention_bias adds q (32) + k, v (16 each) + o (32) = 96 per layer.
  moe_config bias = kd::model::tiny_teacher();
  bias.attention_bias = true;
  CHECK(bias.parameter_count() == 25'088 + 2 * 96);
  // tied teacher drops lm_head (97 * 32 = 3,104).
  moe_config tied = kd::model::tiny_teacher();
  tied.tie_word_embeddings = true;
  CHECK(tied.parameter_count() == 25'088 - 3'104);

  // Llama mlp_bias adds gate, up (64 each) + down (32) = 160 per layer; attention_bias 96 per layer.
  dense_config s = kd::model::tiny_student();
  s.mlp_bias = true;
  CHECK(s.parameter_count() == 20'544 + 2 * 160);
  s.attention_bias = true;
  CHECK(s.parameter_count() == 20'544 + 2 * 160 + 2 * 96);
}

TEST_CASE("moe_config: head_dim decoupled from hidden_size / heads (Qwen3-30B-A3B geometry)") {
  // Qwen3-30B-A3B: V 151,936, H 2048, L 48, 32 heads / 4 KV heads of 128 (32 * 128 = 4096 != 2048),
  // 128 experts top-8 of width 768, untied.
  //   embed + lm_head 2 * 151,936 * 2048                          =    622,329,856
  //   per layer: q 2048*4096 = 8,388,608; k, v 2048*512 = 1,048,576 each; o 8,388,608 -> 18,874,368
  //              q/k norms 256; layernorms 4,096; router 128 * 2048 = 262,144
  //              experts 128 * 3 * 2048 * 768 = 603,979,776       -> 623,120,640
  //   48 layers 29,909,790,720; final norm 2,048; total           = 30,532,122,624   ("30.5B")
  //   active: experts 8 * 4,718,592 = 37,748,736 per layer -> 56,889,600 per layer
  //           48 * 56,889,600 + 622,329,856 + 2,048            =  3,353,032,704   ("3.3B activated")
  moe_config c;
  c.hidden_size = 2048;
  c.intermediate_size = 6144;
  c.num_hidden_layers = 48;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 4;
  c.head_dim = 128;
  c.moe_intermediate_size = 768;
  c.num_experts = 128;
  c.num_experts_per_tok = 8;
  REQUIRE(c.validate().ok());
  CHECK(c.parameter_count() == 30'532'122'624LL);
  CHECK(c.active_parameter_count() == 3'353'032'704LL);
}

// =====================================================================================================
// Validation
// =====================================================================================================
TEST_CASE("moe_config::validate rejects each broken rule with a message naming it") {
  using kd::errc;
  auto v = [](auto m) { return validate_with(kd::model::seed_teacher(), m); };
  check_fails(v([](moe_config& c) { c.vocab_size = 0; }), errc::invalid_argument, "vocab_size must be positive, got 0");
  check_fails(v([](moe_config& c) { c.hidden_size = -1; }), errc::invalid_argument, "hidden_size must be positive");
  check_fails(v([](moe_config& c) { c.num_hidden_layers = 0; }), errc::invalid_argument,
              "num_hidden_layers must be positive");
  check_fails(v([](moe_config& c) { c.num_attention_heads = 0; }), errc::invalid_argument,
              "num_attention_heads must be positive");
  check_fails(v([](moe_config& c) { c.num_key_value_heads = 0; }), errc::invalid_argument,
              "num_key_value_heads must be positive");
  check_fails(v([](moe_config& c) { c.head_dim = 0; }), errc::invalid_argument, "head_dim must be positive");
  check_fails(v([](moe_config& c) { c.max_position_embeddings = 0; }), errc::invalid_argument,
              "max_position_embeddings must be positive");
  check_fails(v([](moe_config& c) { c.vocab_size = 1LL << 31; }), errc::out_of_range,
              "vocab_size = 2147483648 exceeds 2^31 - 1");
  check_fails(v([](moe_config& c) { c.num_key_value_heads = 3; }), errc::invalid_argument,
              "num_key_value_heads = 3 must divide num_attention_heads = 16");
  check_fails(v([](moe_config& c) { c.num_key_value_heads = 32; }), errc::invalid_argument,
              "num_key_value_heads = 32 must divide num_attention_heads = 16");
  check_fails(v([](moe_config& c) { c.head_dim = 63; }), errc::invalid_argument, "head_dim = 63 must be even");
  check_fails(v([](moe_config& c) { c.rms_norm_eps = 0.0; }), errc::invalid_argument,
              "rms_norm_eps must be a finite positive number");
  check_fails(v([](moe_config& c) { c.rope_theta = std::numeric_limits<double>::quiet_NaN(); }),
              errc::invalid_argument, "rope_theta must be a finite positive number");
  check_fails(v([](moe_config& c) { c.bos_token_id = 151'936; }), errc::out_of_range,
              "bos_token_id = 151936 is outside [0, vocab_size = 151936)");
  check_fails(v([](moe_config& c) { c.eos_token_id = -2; }), errc::out_of_range, "eos_token_id = -2 is outside");
  check_fails(v([](moe_config& c) { c.intermediate_size = 0; }), errc::invalid_argument,
              "intermediate_size must be positive");
  check_fails(v([](moe_config& c) { c.moe_intermediate_size = 0; }), errc::invalid_argument,
              "moe_intermediate_size must be positive");
  check_fails(v([](moe_config& c) { c.num_experts = 0; }), errc::invalid_argument, "num_experts must be positive");
  check_fails(v([](moe_config& c) { c.num_experts_per_tok = 0; }), errc::invalid_argument,
              "num_experts_per_tok must be positive");
  check_fails(v([](moe_config& c) { c.num_experts_per_tok = 9; }), errc::invalid_argument,
              "num_experts_per_tok = 9 exceeds num_experts = 8");
  check_fails(v([](moe_config& c) { c.decoder_sparse_step = 0; }), errc::invalid_argument,
              "decoder_sparse_step must be positive");
  check_fails(v([](moe_config& c) { c.mlp_only_layers = {3, 24}; }), errc::out_of_range,
              "mlp_only_layers contains layer 24, outside [0, num_hidden_layers = 24)");
  check_fails(v([](moe_config& c) { c.mlp_only_layers = {5, 5}; }), errc::invalid_argument,
              "mlp_only_layers lists layer 5 twice");
  check_fails(v([](moe_config& c) { c.router_aux_loss_coef = -0.01; }), errc::invalid_argument,
              "router_aux_loss_coef must be finite and >= 0");
  check_fails(v([](moe_config& c) { c.initializer_range = 0.0; }), errc::invalid_argument,
              "initializer_range must be finite and positive");
  check_fails(v([](moe_config& c) {
                c.vocab_size = 2'000'000'000;
                c.hidden_size = 2'000'000'000;
                c.num_attention_heads = 1;
                c.num_key_value_heads = 1;
                c.head_dim = 2;
              }),
              errc::out_of_range, "more than 4e18 parameters");
  // Allowed: bos/eos -1 (none), decoupled head_dim, router_aux_loss_coef 0.
  CHECK(v([](moe_config& c) {
          c.bos_token_id = -1;
          c.eos_token_id = -1;
          c.head_dim = 128;
          c.router_aux_loss_coef = 0.0;
        }).ok());
}

TEST_CASE("dense_config::validate rejects each broken rule with a message naming it") {
  using kd::errc;
  auto v = [](auto m) { return validate_with(kd::model::seed_student(), m); };
  check_fails(v([](dense_config& c) { c.vocab_size = -5; }), errc::invalid_argument, "vocab_size must be positive");
  check_fails(v([](dense_config& c) { c.intermediate_size = 0; }), errc::invalid_argument,
              "intermediate_size must be positive");
  check_fails(v([](dense_config& c) { c.num_hidden_layers = 0; }), errc::invalid_argument,
              "num_hidden_layers must be positive");
  check_fails(v([](dense_config& c) { c.num_key_value_heads = 2; }), errc::invalid_argument,
              "num_key_value_heads = 2 must divide num_attention_heads = 9");
  check_fails(v([](dense_config& c) {
                c.num_attention_heads = 10;
                c.num_key_value_heads = 5;
                c.head_dim = 58;
              }),
              errc::invalid_argument, "num_attention_heads = 10 must divide hidden_size = 576");
  check_fails(v([](dense_config& c) { c.head_dim = 32; }), errc::invalid_argument,
              "head_dim = 32 must equal hidden_size / num_attention_heads = 64");
  check_fails(v([](dense_config& c) { c.rms_norm_eps = -1e-5; }), errc::invalid_argument,
              "rms_norm_eps must be a finite positive number");
  check_fails(v([](dense_config& c) { c.rope_theta = std::numeric_limits<double>::infinity(); }),
              errc::invalid_argument, "rope_theta must be a finite positive number");
  check_fails(v([](dense_config& c) { c.max_position_embeddings = -1; }), errc::invalid_argument,
              "max_position_embeddings must be positive");
  check_fails(v([](dense_config& c) { c.eos_token_id = 50'304; }), errc::out_of_range,
              "eos_token_id = 50304 is outside [0, vocab_size = 50304)");
  check_fails(v([](dense_config& c) { c.initializer_range = std::nan(""); }), errc::invalid_argument,
              "initializer_range must be finite and positive");
}

// =====================================================================================================
// JSON: writing and round trips
// =====================================================================================================
TEST_CASE("to_json writes the keys transformers needs, sorted, for Qwen3-MoE") {
  std::string text;
  REQUIRE(kd::model::to_json(kd::model::seed_teacher(), text).ok());
  CHECK(text.rfind("{\n  \"architectures\": [\n    \"Qwen3MoeForCausalLM\"\n  ],\n", 0) == 0);
  const json j = json::parse(text);
  CHECK(j["architectures"] == json::array({"Qwen3MoeForCausalLM"}));
  CHECK(j["model_type"] == "qwen3_moe");
  CHECK(j["vocab_size"] == 151936);
  CHECK(j["hidden_size"] == 1024);
  CHECK(j["intermediate_size"] == 2048);  // moe_intermediate_size * num_experts_per_tok (unused: all sparse)
  CHECK(j["num_hidden_layers"] == 24);
  CHECK(j["num_attention_heads"] == 16);
  CHECK(j["num_key_value_heads"] == 4);
  CHECK(j["head_dim"] == 64);
  CHECK(j["moe_intermediate_size"] == 1024);
  CHECK(j["num_experts"] == 8);
  CHECK(j["num_local_experts"] == 8);
  CHECK(j["num_experts_per_tok"] == 2);
  CHECK(j["norm_topk_prob"] == true);
  CHECK(j["decoder_sparse_step"] == 1);
  CHECK(j["mlp_only_layers"] == json::array());
  CHECK(j["rms_norm_eps"] == 1e-6);
  CHECK(j["rope_theta"] == 1000000.0);
  CHECK(j["rope_parameters"] == json{{"rope_type", "default"}, {"rope_theta", 1000000.0}});
  CHECK(j["max_position_embeddings"] == 32768);
  CHECK(j["tie_word_embeddings"] == false);
  CHECK(j["attention_bias"] == false);
  CHECK(j["attention_dropout"] == 0.0);
  CHECK(j["hidden_act"] == "silu");
  CHECK(j["router_aux_loss_coef"] == 0.01);
  CHECK(j["output_router_logits"] == false);
  CHECK(j["use_sliding_window"] == false);
  CHECK(j["sliding_window"].is_null());
  CHECK(j["bos_token_id"] == 151643);
  CHECK(j["eos_token_id"] == 151643);
  CHECK(j["dtype"] == "bfloat16");
  CHECK(j["torch_dtype"] == "bfloat16");
  CHECK(contains(text, "\"rms_norm_eps\": 1e-06"));  // the spelling Python's json writes
  CHECK(text.back() == '\n');
}

TEST_CASE("to_json writes the keys transformers needs for Llama") {
  std::string text;
  REQUIRE(kd::model::to_json(kd::model::seed_student(), text).ok());
  const json j = json::parse(text);
  CHECK(j["architectures"] == json::array({"LlamaForCausalLM"}));
  CHECK(j["model_type"] == "llama");
  CHECK(j["vocab_size"] == 50304);
  CHECK(j["hidden_size"] == 576);
  CHECK(j["intermediate_size"] == 1536);
  CHECK(j["num_hidden_layers"] == 30);
  CHECK(j["num_attention_heads"] == 9);
  CHECK(j["num_key_value_heads"] == 3);
  CHECK(j["head_dim"] == 64);
  CHECK(j["rms_norm_eps"] == 1e-5);
  CHECK(j["rope_theta"] == 10000.0);
  CHECK(j["rope_parameters"] == json{{"rope_type", "default"}, {"rope_theta", 10000.0}});
  CHECK(j["max_position_embeddings"] == 2048);
  CHECK(j["tie_word_embeddings"] == true);
  CHECK(j["attention_bias"] == false);
  CHECK(j["mlp_bias"] == false);
  CHECK(j["attention_dropout"] == 0.0);
  CHECK(j["hidden_act"] == "silu");
  CHECK(j["pretraining_tp"] == 1);
  CHECK(j["bos_token_id"] == 50256);
  CHECK(j["eos_token_id"] == 50256);
  CHECK(j["dtype"] == "bfloat16");
  CHECK(j["torch_dtype"] == "bfloat16");
  CHECK_FALSE(j.contains("num_experts"));
}

TEST_CASE("to_json refuses an invalid configuration and writes null for absent special tokens") {
  moe_config bad = kd::model::tiny_teacher();
  bad.num_experts_per_tok = 5;
  std::string text = "untouched";
  check_fails(kd::model::to_json(bad, text), kd::errc::invalid_argument, "num_experts_per_tok = 5 exceeds");
  CHECK(text == "untouched");

  dense_config s = kd::model::tiny_student();
  s.bos_token_id = -1;
  REQUIRE(kd::model::to_json(s, text).ok());
  CHECK(json::parse(text)["bos_token_id"].is_null());
  dense_config back;
  REQUIRE(kd::model::from_json(text, back).ok());
  CHECK(back == s);
}

TEST_CASE("JSON round trip of every preset is exact") {
  const std::vector<moe_config> teachers{kd::model::seed_teacher(), kd::model::demo_teacher(),
                                         kd::model::tiny_teacher()};
  for (const moe_config& c : teachers) {
    std::string text;
    REQUIRE(kd::model::to_json(c, text).ok());
    moe_config back;
    back.vocab_size = 1;  // must be overwritten
    const kd::status s = kd::model::from_json(text, back);
    REQUIRE_MESSAGE(s.ok(), s.message());
    CHECK(back == c);
    CHECK(back.parameter_count() == c.parameter_count());
    std::string again;
    REQUIRE(kd::model::to_json(back, again).ok());
    CHECK(again == text);
  }
  const std::vector<dense_config> students{kd::model::seed_student(), kd::model::demo_student(),
                                           kd::model::tiny_student()};
  for (const dense_config& c : students) {
    std::string text;
    REQUIRE(kd::model::to_json(c, text).ok());
    dense_config back;
    back.vocab_size = 1;
    const kd::status s = kd::model::from_json(text, back);
    REQUIRE_MESSAGE(s.ok(), s.message());
    CHECK(back == c);
    std::string again;
    REQUIRE(kd::model::to_json(back, again).ok());
    CHECK(again == text);
  }
  // Non-default values survive too: dense layers, other dtype, biases, odd doubles.
  moe_config odd = kd::model::tiny_teacher();
  odd.mlp_only_layers = {1};
  odd.decoder_sparse_step = 1;
  odd.intermediate_size = 48;
  odd.norm_topk_prob = false;
  odd.attention_bias = true;
  odd.rms_norm_eps = 1.0 / 3.0;
  odd.rope_theta = 12345.678;
  odd.router_aux_loss_coef = 1e-4;
  odd.initializer_range = 0.0173;
  odd.dtype = kd::model::weight_dtype::float16;
  odd.eos_token_id = -1;
  std::string text;
  REQUIRE(kd::model::to_json(odd, text).ok());
  moe_config back;
  REQUIRE(kd::model::from_json(text, back).ok());
  CHECK(back == odd);
}

// =====================================================================================================
// JSON: reading configs as transformers writes them
// =====================================================================================================
TEST_CASE("from_json reads a Qwen3-MoE config.json written by transformers 4.x (Qwen3-30B-A3B)") {
  // The layout of Qwen/Qwen3-30B-A3B's config.json (transformers 4.51): top-level rope_theta,
  // rope_scaling null, torch_dtype, max_window_layers (ignored), eos a different id from bos.
  const std::string text = R"({
  "architectures": [
    "Qwen3MoeForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 40960,
  "max_window_layers": 48,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 768,
  "norm_topk_prob": true,
  "num_attention_heads": 32,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 48,
  "num_key_value_heads": 4,
  "output_router_logits": false,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}
)";
  moe_config c;
  const kd::status s = kd::model::from_json(text, c);
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(c.vocab_size == 151936);
  CHECK(c.hidden_size == 2048);
  CHECK(c.intermediate_size == 6144);
  CHECK(c.num_hidden_layers == 48);
  CHECK(c.num_attention_heads == 32);
  CHECK(c.num_key_value_heads == 4);
  CHECK(c.head_dim == 128);
  CHECK(c.moe_intermediate_size == 768);
  CHECK(c.num_experts == 128);
  CHECK(c.num_experts_per_tok == 8);
  CHECK(c.norm_topk_prob);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.max_position_embeddings == 40960);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.router_aux_loss_coef == 0.001);
  CHECK(c.bos_token_id == 151643);
  CHECK(c.eos_token_id == 151645);
  CHECK(c.dtype == kd::model::weight_dtype::bfloat16);
  CHECK(c.parameter_count() == 30'532'122'624LL);  // see the head_dim test above
  CHECK(c.active_parameter_count() == 3'353'032'704LL);
}

TEST_CASE("from_json reads a Qwen3-MoE config.json written by transformers 5 (rope_parameters, dtype)") {
  // As transformers 5.17 saves the seed teacher (checked on the GPU machine): rope_parameters instead of
  // rope_theta, dtype instead of torch_dtype, num_experts stored as num_local_experts (attribute_map),
  // pad_token_id null. Both spellings of each are read.
  const std::string v5 = R"({
  "architectures": ["Qwen3MoeForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "dtype": "bfloat16",
  "eos_token_id": 151643,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 1024,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 32768,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 1024,
  "norm_topk_prob": true,
  "num_attention_heads": 16,
  "num_experts_per_tok": 2,
  "num_hidden_layers": 24,
  "num_key_value_heads": 4,
  "num_local_experts": 8,
  "output_router_logits": false,
  "pad_token_id": null,
  "rms_norm_eps": 1e-06,
  "rope_parameters": {
    "rope_theta": 1000000.0,
    "rope_type": "default"
  },
  "router_aux_loss_coef": 0.01,
  "sliding_window": null,
  "tie_word_embeddings": false,
  "transformers_version": "5.17.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}
)";
  moe_config c;
  const kd::status s = kd::model::from_json(v5, c);
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(c.num_experts == 8);
  CHECK(c.rope_theta == 1e6);
  CHECK(c.intermediate_size == 6144);
  CHECK(c.parameter_count() == 978'309'120);  // the seed teacher, read back from transformers' format
  moe_config expected = kd::model::seed_teacher();
  expected.intermediate_size = 6144;
  CHECK(c == expected);

  // Minimal: only the required keys (head_dim defaults to hidden / heads, intermediate_size to
  // moe_intermediate_size * top-k, router_aux_loss_coef to 0.001, dtype to float32, special tokens to none).
  const std::string minimal = R"({"model_type": "qwen3_moe", "vocab_size": 97, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "moe_intermediate_size": 16,
    "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000, "max_position_embeddings": 64, "tie_word_embeddings": false})";
  moe_config m;
  REQUIRE(kd::model::from_json(minimal, m).ok());
  CHECK(m.head_dim == 8);
  CHECK(m.intermediate_size == 32);
  CHECK(m.router_aux_loss_coef == 0.001);
  CHECK(m.dtype == kd::model::weight_dtype::float32);
  CHECK(m.bos_token_id == -1);
  CHECK(m.eos_token_id == -1);
  CHECK(m.parameter_count() == 25'088);
}

TEST_CASE("from_json reads Llama config.json files (SmolLM-135M as published; transformers 5 layout)") {
  // HuggingFaceTB/SmolLM-135M's config.json (transformers 4.40): no head_dim, rope_scaling null, float32.
  const std::string smollm = R"({
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 0,
  "eos_token_id": 0,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.02,
  "intermediate_size": 1536,
  "max_position_embeddings": 2048,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "float32",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "vocab_size": 49152
}
)";
  dense_config c;
  const kd::status s = kd::model::from_json(smollm, c);
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(c.head_dim == 64);
  CHECK(c.bos_token_id == 0);
  CHECK(c.dtype == kd::model::weight_dtype::float32);
  CHECK(c.parameter_count() == 134'515'008);  // SmolLM-135M's published parameter count

  // transformers 5: rope_parameters only, dtype, head_dim written; eos as a list (the first id is kept).
  const std::string v5 = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 50256,
  "dtype": "bfloat16",
  "eos_token_id": [50256],
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.02,
  "intermediate_size": 1536,
  "max_position_embeddings": 2048,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
  "tie_word_embeddings": true,
  "transformers_version": "5.17.0",
  "use_cache": true,
  "vocab_size": 50304
}
)";
  dense_config d;
  const kd::status s5 = kd::model::from_json(v5, d);
  REQUIRE_MESSAGE(s5.ok(), s5.message());
  CHECK(d == kd::model::seed_student());
  CHECK(d.parameter_count() == 135'178'560);

  // num_key_value_heads absent or null: multi-head attention, as in transformers.
  json mha = json::parse(v5);
  mha["num_key_value_heads"] = nullptr;
  REQUIRE(kd::model::from_json(mha.dump(), d).ok());
  CHECK(d.num_key_value_heads == 9);
  mha.erase("num_key_value_heads");
  REQUIRE(kd::model::from_json(mha.dump(), d).ok());
  CHECK(d.num_key_value_heads == 9);
}

// =====================================================================================================
// JSON: corrupt and unsupported configs
// =====================================================================================================
namespace {

std::string seed_teacher_json() {
  std::string text;
  kd::check(kd::model::to_json(kd::model::seed_teacher(), text));
  return text;
}

std::string seed_student_json() {
  std::string text;
  kd::check(kd::model::to_json(kd::model::seed_student(), text));
  return text;
}

template <class Config, class Mutate>
kd::status read_mutated(const std::string& base, Mutate m, Config& out) {
  json j = json::parse(base);
  m(j);
  return kd::model::from_json(j.dump(), out);
}

}  // namespace

TEST_CASE("from_json rejects corrupt Qwen3-MoE configs, naming the key, and leaves the output untouched") {
  using kd::errc;
  const std::string base = seed_teacher_json();
  moe_config out = kd::model::tiny_teacher();
  const moe_config before = out;
  auto r = [&](auto m) { return read_mutated(base, m, out); };

  check_fails(kd::model::from_json("{\"model_type\": \"qwen3_moe\",", out), errc::io_error, "not valid JSON");
  check_fails(kd::model::from_json("", out), errc::io_error, "not valid JSON");
  check_fails(kd::model::from_json("[1, 2]", out), errc::io_error, "the top level must be a JSON object, got an array");
  check_fails(r([](json& j) { j.erase("model_type"); }), errc::io_error, "required key \"model_type\" is missing");
  check_fails(r([](json& j) { j["model_type"] = "llama"; }), errc::invalid_argument,
              "key \"model_type\" is \"llama\", expected \"qwen3_moe\"");
  check_fails(r([](json& j) { j["architectures"] = json::array({"Qwen3MoeModel"}); }), errc::invalid_argument,
              "key \"architectures\" does not list \"Qwen3MoeForCausalLM\"");
  check_fails(r([](json& j) { j["architectures"] = "Qwen3MoeForCausalLM"; }), errc::io_error,
              "key \"architectures\" must be an array of strings, got a string");
  check_fails(r([](json& j) { j.erase("vocab_size"); }), errc::io_error, "required key \"vocab_size\" is missing");
  check_fails(r([](json& j) { j["vocab_size"] = "151936"; }), errc::io_error,
              "key \"vocab_size\" must be an integer, got a string");
  check_fails(r([](json& j) { j["hidden_size"] = 1024.0; }), errc::io_error,
              "key \"hidden_size\" must be an integer, got a floating-point number");
  check_fails(r([](json& j) { j["num_hidden_layers"] = true; }), errc::io_error,
              "key \"num_hidden_layers\" must be an integer, got a boolean");
  check_fails(r([](json& j) { j["num_attention_heads"] = nullptr; }), errc::io_error,
              "key \"num_attention_heads\" must be an integer, got null");
  check_fails(r([](json& j) { j.erase("num_key_value_heads"); }), errc::io_error,
              "required key \"num_key_value_heads\" is missing");
  check_fails(r([](json& j) { j.erase("moe_intermediate_size"); }), errc::io_error,
              "required key \"moe_intermediate_size\" is missing");
  check_fails(r([](json& j) {
                j.erase("num_experts");
                j.erase("num_local_experts");
              }),
              errc::io_error, "required key \"num_experts\" is missing");
  check_fails(r([](json& j) { j["num_local_experts"] = 16; }), errc::invalid_argument,
              "keys \"num_experts\" (8) and \"num_local_experts\" (16) disagree");
  check_fails(r([](json& j) { j.erase("num_experts_per_tok"); }), errc::io_error,
              "required key \"num_experts_per_tok\" is missing");
  check_fails(r([](json& j) { j.erase("norm_topk_prob"); }), errc::io_error,
              "required key \"norm_topk_prob\" is missing");
  check_fails(r([](json& j) { j["norm_topk_prob"] = "true"; }), errc::io_error,
              "key \"norm_topk_prob\" must be a boolean, got a string");
  check_fails(r([](json& j) { j["tie_word_embeddings"] = 0; }), errc::io_error,
              "key \"tie_word_embeddings\" must be a boolean, got an integer");
  check_fails(r([](json& j) { j.erase("tie_word_embeddings"); }), errc::io_error,
              "required key \"tie_word_embeddings\" is missing");
  check_fails(r([](json& j) { j.erase("rms_norm_eps"); }), errc::io_error, "required key \"rms_norm_eps\" is missing");
  check_fails(r([](json& j) { j["rms_norm_eps"] = "1e-6"; }), errc::io_error,
              "key \"rms_norm_eps\" must be a number, got a string");
  check_fails(r([](json& j) { j.erase("max_position_embeddings"); }), errc::io_error,
              "required key \"max_position_embeddings\" is missing");
  check_fails(r([](json& j) {
                j.erase("rope_theta");
                j.erase("rope_parameters");
              }),
              errc::io_error, "required key \"rope_theta\" is missing");
  check_fails(r([](json& j) { j["rope_theta"] = 10000.0; }), errc::invalid_argument,
              "key \"rope_theta\" (10000.000000) disagrees with rope_parameters.rope_theta (1000000.000000)");
  check_fails(r([](json& j) { j["rope_parameters"]["rope_type"] = "yarn"; }), errc::invalid_argument,
              "key \"rope_parameters.rope_type\": \"yarn\" is not supported");
  check_fails(r([](json& j) { j["rope_scaling"] = json{{"type", "linear"}, {"factor", 2.0}}; }),
              errc::invalid_argument, "key \"rope_scaling.type\": \"linear\" is not supported");
  check_fails(r([](json& j) { j["rope_parameters"]["partial_rotary_factor"] = 0.5; }), errc::invalid_argument,
              "key \"rope_parameters.partial_rotary_factor\": only 1");
  check_fails(r([](json& j) { j["rope_parameters"] = 1000000.0; }), errc::io_error,
              "key \"rope_parameters\" must be an object");
  check_fails(r([](json& j) { j["hidden_act"] = "gelu"; }), errc::invalid_argument,
              "key \"hidden_act\": \"gelu\" is not supported");
  check_fails(r([](json& j) { j["attention_dropout"] = 0.1; }), errc::invalid_argument,
              "key \"attention_dropout\": kd's models have no attention dropout");
  check_fails(r([](json& j) { j["use_sliding_window"] = true; }), errc::invalid_argument,
              "key \"use_sliding_window\": sliding-window attention is not supported");
  check_fails(r([](json& j) { j["mlp_only_layers"] = json::array({1, "2"}); }), errc::io_error,
              "key \"mlp_only_layers\" must be an integer, got a string");
  check_fails(r([](json& j) { j["mlp_only_layers"] = 3; }), errc::io_error,
              "key \"mlp_only_layers\" must be an array of integers, got an integer");
  check_fails(r([](json& j) {
                j["mlp_only_layers"] = json::array({0});
                j.erase("intermediate_size");
              }),
              errc::io_error, "required key \"intermediate_size\" is missing");
  check_fails(r([](json& j) { j["dtype"] = "int8"; }), errc::invalid_argument,
              "key \"dtype\": \"int8\" is not one of");
  check_fails(r([](json& j) { j["torch_dtype"] = "float32"; }), errc::invalid_argument,
              "keys \"dtype\" and \"torch_dtype\" disagree");
  check_fails(r([](json& j) { j["eos_token_id"] = json::array(); }), errc::io_error,
              "key \"eos_token_id\" must be an integer or a non-empty list of integers");
  check_fails(r([](json& j) { j["vocab_size"] = 18446744073709551615ULL; }), errc::out_of_range,
              "key \"vocab_size\" does not fit 64 bits");
  // Values that parse but fail validate(): the message names the key and says it came from config.json.
  check_fails(r([](json& j) { j["num_experts_per_tok"] = 9; }), errc::invalid_argument,
              "config.json (qwen3_moe): num_experts_per_tok = 9 exceeds num_experts = 8");
  check_fails(r([](json& j) { j["vocab_size"] = -151936; }), errc::invalid_argument,
              "vocab_size must be positive, got -151936");
  check_fails(r([](json& j) { j["num_key_value_heads"] = 5; }), errc::invalid_argument,
              "num_key_value_heads = 5 must divide num_attention_heads = 16");
  check_fails(r([](json& j) { j["eos_token_id"] = 200000; }), errc::out_of_range,
              "eos_token_id = 200000 is outside [0, vocab_size = 151936)");
  check_fails(r([](json& j) { j["mlp_only_layers"] = json::array({30}); }), errc::out_of_range,
              "mlp_only_layers contains layer 30");
  CHECK(out == before);

  // Unknown keys are ignored; null special tokens mean none.
  REQUIRE(r([](json& j) {
            j["some_future_key"] = json::array({1, 2, 3});
            j["bos_token_id"] = nullptr;
          }).ok());
  CHECK(out.bos_token_id == -1);
}

TEST_CASE("from_json rejects corrupt Llama configs, naming the key") {
  using kd::errc;
  const std::string base = seed_student_json();
  dense_config out = kd::model::tiny_student();
  const dense_config before = out;
  auto r = [&](auto m) { return read_mutated(base, m, out); };

  check_fails(kd::model::from_json("{\"vocab_size\": 50304", out), errc::io_error, "not valid JSON");
  check_fails(kd::model::from_json("\"llama\"", out), errc::io_error,
              "the top level must be a JSON object, got a string");
  check_fails(r([](json& j) { j["model_type"] = "qwen3_moe"; }), errc::invalid_argument,
              "key \"model_type\" is \"qwen3_moe\", expected \"llama\"");
  check_fails(r([](json& j) { j["architectures"] = json::array({"MistralForCausalLM"}); }), errc::invalid_argument,
              "does not list \"LlamaForCausalLM\"");
  check_fails(r([](json& j) { j.erase("intermediate_size"); }), errc::io_error,
              "required key \"intermediate_size\" is missing");
  check_fails(r([](json& j) { j.erase("hidden_size"); }), errc::io_error, "required key \"hidden_size\" is missing");
  check_fails(r([](json& j) { j["num_hidden_layers"] = 30.5; }), errc::io_error,
              "key \"num_hidden_layers\" must be an integer, got a floating-point number");
  check_fails(r([](json& j) { j["mlp_bias"] = "false"; }), errc::io_error,
              "key \"mlp_bias\" must be a boolean, got a string");
  check_fails(r([](json& j) { j["pretraining_tp"] = 2; }), errc::invalid_argument,
              "key \"pretraining_tp\": only 1 is supported");
  check_fails(r([](json& j) { j["rope_parameters"]["rope_type"] = "llama3"; }), errc::invalid_argument,
              "\"llama3\" is not supported");
  check_fails(r([](json& j) { j["rope_parameters"]["rope_theta"] = "10000"; }), errc::io_error,
              "key \"rope_parameters.rope_theta\" must be a number, got a string");
  check_fails(r([](json& j) { j["head_dim"] = 32; }), errc::invalid_argument,
              "head_dim = 32 must equal hidden_size / num_attention_heads = 64");
  check_fails(r([](json& j) { j["num_attention_heads"] = 0; }), errc::invalid_argument,
              "num_attention_heads must be positive");
  check_fails(r([](json& j) { j["bos_token_id"] = json::array({1, 2.5}); }), errc::io_error,
              "key \"bos_token_id\" must be an integer, got a floating-point number");
  check_fails(r([](json& j) { j["hidden_act"] = 7; }), errc::io_error, "key \"hidden_act\" must be a string");
  CHECK(out == before);
}
