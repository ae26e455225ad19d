// Tests for kd/io/safetensors.hpp: round trips for every dtype (random bits, random shapes, scalars,
// empty tensors), metadata, byte-level golden files (hand-written here and HF's own published vectors),
// one test per rejection rule of the reader and the writer, atomic writes (kd/io/atomic_file.hpp on its
// own, then through write_safetensors), and a replay of the fuzzing seed corpus (tests/fuzz/corpus).
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <kd/io/atomic_file.hpp>
#include <kd/io/safetensors.hpp>

#if defined(__unix__)
#include <unistd.h>
#endif

#include "test_util.hpp"

namespace fs = std::filesystem;
using kd::errc;
using kd::io::dtype;
using kd::io::safetensors_file;
using kd::io::tensor_to_write;

namespace {

std::vector<std::byte> bytes_of(std::string_view s) {
  std::vector<std::byte> b(s.size());
  if (!s.empty()) std::memcpy(b.data(), s.data(), s.size());
  return b;
}

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file image: size field, header (as given, unpadded), data.
std::vector<std::byte> file_of(std::string_view header, std::string_view data = {}) {
  std::string s = le64(header.size());
  s += header;
  s += data;
  return bytes_of(s);
}

kd::status parse(const std::vector<std::byte>& b, safetensors_file& f) {
  return safetensors_file::parse(b, f, "test.safetensors");
}

// The failure is `code` and its message contains every fragment.
void check_error(const kd::status& s, errc code, std::initializer_list<std::string_view> fragments) {
  CHECK_FALSE(s.ok());
  CHECK(s.code() == code);
  for (std::string_view frag : fragments) {
    INFO("message: " << s.message() << "\nexpected fragment: " << frag);
    CHECK(kdtest::contains(s.message(), frag));
  }
}

kd::status parse_error(std::string_view header, std::string_view data = {}) {
  safetensors_file f;
  return parse(file_of(header, data), f);
}

// A fresh directory under the system temp dir, removed at scope exit.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("kd_safetensors_test_" + std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
};

template <class T>
std::vector<T> random_bits(std::size_t n, kdtest::rng_t& g) {
  std::vector<T> v(n);
  std::vector<unsigned char> raw(n * sizeof(T));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& c : raw) c = static_cast<unsigned char>(byte(g));
  if (!raw.empty()) std::memcpy(v.data(), raw.data(), raw.size());
  return v;
}

std::vector<std::int64_t> random_shape(kdtest::rng_t& g) {
  std::uniform_int_distribution<int> rank(0, 4), dim(0, 5);
  std::vector<std::int64_t> s(static_cast<std::size_t>(rank(g)));
  for (auto& d : s) d = dim(g);
  return s;
}

std::size_t numel(const std::vector<std::int64_t>& s) {
  std::size_t n = 1;
  for (auto d : s) n *= static_cast<std::size_t>(d);
  return n;
}

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------------

TEST_CASE("safetensors: round trip of every dtype, random bits and shapes, scalars and empty tensors") {
  auto g = kdtest::rng(20240611);
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<std::vector<std::int64_t>> shapes;
    for (int i = 0; i < 6; ++i) shapes.push_back(random_shape(g));
    if (trial == 0) {
      shapes[0] = {};      // scalar
      shapes[1] = {0};     // empty
      shapes[2] = {3, 0};  // empty, rank 2
    }
    const auto f32 = random_bits<float>(numel(shapes[0]), g);
    const auto f16 = random_bits<kd::half>(numel(shapes[1]), g);
    const auto bf16 = random_bits<kd::bfloat16>(numel(shapes[2]), g);
    const auto i32 = random_bits<std::int32_t>(numel(shapes[3]), g);
    const auto i64 = random_bits<std::int64_t>(numel(shapes[4]), g);
    const auto f64 = random_bits<double>(numel(shapes[5]), g);
    const std::vector<tensor_to_write> in = {
        kd::io::make_tensor("model.embed_tokens.weight", f32, shapes[0]),
        kd::io::make_tensor("model.layers.0.mlp.gate.weight", f16, shapes[1]),
        kd::io::make_tensor("lm_head.weight", bf16, shapes[2]),
        kd::io::make_tensor("ids", i32, shapes[3]),
        kd::io::make_tensor("step", i64, shapes[4]),
        kd::io::make_tensor("z.f64", f64, shapes[5]),
    };
    std::vector<std::byte> image;
    REQUIRE(kd::io::serialize_safetensors(in, {}, image).ok());
    CHECK(kd::io::detail::load_le<std::uint64_t>(image.data()) % 8 == 0);

    safetensors_file f;
    const auto s = parse(image, f);
    REQUIRE_MESSAGE(s.ok(), s.message());
    REQUIRE(f.tensors().size() == 6);
    CHECK(std::is_sorted(f.tensors().begin(), f.tensors().end(),
                         [](const auto& a, const auto& b) { return a.name < b.name; }));
    CHECK(f.metadata().empty());

    std::vector<std::int64_t> shape;
    std::vector<float> rf32;
    REQUIRE(f.read("model.embed_tokens.weight", rf32, &shape).ok());
    CHECK(same_bytes(rf32, f32));
    CHECK(shape == shapes[0]);
    std::vector<kd::half> rf16;
    REQUIRE(f.read("model.layers.0.mlp.gate.weight", rf16, &shape).ok());
    CHECK(same_bytes(rf16, f16));
    CHECK(shape == shapes[1]);
    std::vector<kd::bfloat16> rbf16;
    REQUIRE(f.read("lm_head.weight", rbf16, &shape).ok());
    CHECK(same_bytes(rbf16, bf16));
    CHECK(shape == shapes[2]);
    std::vector<std::int32_t> ri32;
    REQUIRE(f.read("ids", ri32, &shape).ok());
    CHECK(ri32 == i32);
    CHECK(shape == shapes[3]);
    std::vector<std::int64_t> ri64;
    REQUIRE(f.read("step", ri64, &shape).ok());
    CHECK(ri64 == i64);
    CHECK(shape == shapes[4]);
    std::vector<double> rf64;
    REQUIRE(f.read("z.f64", rf64, &shape).ok());
    CHECK(same_bytes(rf64, f64));
    CHECK(shape == shapes[5]);

    for (const auto& t : f.tensors()) {
      CHECK(t.numel == numel(t.shape));
      CHECK(t.nbytes() == t.numel * kd::io::dtype_size(t.type));
      CHECK(f.data(t).size() == t.nbytes());
      // HF's layout: every tensor is naturally aligned in the file.
      CHECK((8 + kd::io::detail::load_le<std::uint64_t>(image.data()) + t.begin) % kd::io::dtype_size(t.type) == 0);
    }
    // The writer is deterministic and the reader preserves everything: re-serializing what was read
    // reproduces the image byte for byte.
    std::vector<tensor_to_write> again;
    for (const auto& t : f.tensors()) again.push_back({t.name, t.type, t.shape, f.data(t)});
    std::vector<std::byte> image2;
    REQUIRE(kd::io::serialize_safetensors(again, {}, image2).ok());
    CHECK(image2 == image);
  }
}

TEST_CASE("safetensors: file round trip with metadata, every integer and 8-bit dtype") {
  temp_dir dir;
  const std::string path = (dir.path / "model.safetensors").string();
  auto g = kdtest::rng(7);
  const auto u8 = random_bits<std::uint8_t>(5, g);
  const auto i8 = random_bits<std::int8_t>(4, g);
  const auto i16 = random_bits<std::int16_t>(3, g);
  const auto u16 = random_bits<std::uint16_t>(3, g);
  const auto u32 = random_bits<std::uint32_t>(2, g);
  const auto u64 = random_bits<std::uint64_t>(2, g);
  const auto f8 = random_bits<std::uint8_t>(6, g);
  const kd::io::metadata_map meta = {{"format", "pt"}, {"kd.step", "24914"}, {"note", "ünïcödé ✓"}};
  std::vector<tensor_to_write> in = {
      kd::io::make_tensor("u8", u8, {5}),     kd::io::make_tensor("i8", i8, {2, 2}),
      kd::io::make_tensor("i16", i16, {3}),   kd::io::make_tensor("u16", u16, {1, 3}),
      kd::io::make_tensor("u32", u32, {2}),   kd::io::make_tensor("u64", u64, {2, 1}),
      {"f8", dtype::f8_e4m3, {2, 3}, std::as_bytes(std::span(f8))},
      {"mask", dtype::boolean, {2}, std::as_bytes(std::span(f8).first(2))},
  };
  REQUIRE(kd::io::write_safetensors(path, in, meta).ok());
  CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});  // no temp file left behind

  safetensors_file f;
  const auto s = safetensors_file::open(path, f);
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(f.metadata() == meta);
  CHECK(f.source() == path);
  std::vector<std::uint8_t> ru8;
  REQUIRE(f.read("u8", ru8).ok());
  CHECK(ru8 == u8);
  std::vector<std::int8_t> ri8;
  REQUIRE(f.read("i8", ri8).ok());
  CHECK(ri8 == i8);
  std::vector<std::int16_t> ri16;
  REQUIRE(f.read("i16", ri16).ok());
  CHECK(ri16 == i16);
  std::vector<std::uint16_t> ru16;
  REQUIRE(f.read("u16", ru16).ok());
  CHECK(ru16 == u16);
  std::vector<std::uint32_t> ru32;
  REQUIRE(f.read("u32", ru32).ok());
  CHECK(ru32 == u32);
  std::vector<std::uint64_t> ru64;
  REQUIRE(f.read("u64", ru64).ok());
  CHECK(ru64 == u64);
  const auto* f8i = f.find("f8");
  REQUIRE(f8i != nullptr);
  CHECK(f8i->type == dtype::f8_e4m3);
  CHECK(std::equal(f.data(*f8i).begin(), f.data(*f8i).end(), std::as_bytes(std::span(f8)).begin()));
  REQUIRE(f.find("mask") != nullptr);
  CHECK(f.find("mask")->type == dtype::boolean);
  CHECK(f.find("nope") == nullptr);

  // Lossless integer widening is allowed; narrowing or a sign change is not.
  std::vector<std::int64_t> wide;
  REQUIRE(f.read("i16", wide).ok());
  CHECK(std::equal(wide.begin(), wide.end(), i16.begin(), i16.end()));
  std::vector<std::int32_t> from_u16;
  REQUIRE(f.read("u16", from_u16).ok());
  std::vector<std::int16_t> narrow;
  check_error(f.read("u16", narrow), errc::invalid_argument,
              {"tensor 'u16' has dtype U16, which cannot be read as int16_t"});
  std::vector<std::int64_t> from_u64;
  check_error(f.read("u64", from_u64), errc::invalid_argument, {"dtype U64", "int64_t"});

  // Overwriting an existing checkpoint replaces it atomically.
  const std::vector<float> one = {1.5f};
  REQUIRE(kd::io::write_safetensors(path, {kd::io::make_tensor("w", one, {})}).ok());
  REQUIRE(safetensors_file::open(path, f).ok());
  CHECK(f.tensors().size() == 1);
  CHECK(f.metadata().empty());
  CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
}

TEST_CASE("safetensors: float conversions on read") {
  const std::vector<float> v = {0.1f, -3.14159f, 65504.f, 1e-6f, 70000.f, -0.f};
  const std::vector<kd::half> h = {kd::half(1.f), kd::half(-0.5f), kd::half(3.140625f)};
  const std::vector<kd::bfloat16> b = {kd::bfloat16(2.f), kd::bfloat16(-1e30f)};
  const std::vector<double> d = {0.1, 1e300};
  std::vector<std::byte> image;
  REQUIRE(kd::io::serialize_safetensors({kd::io::make_tensor("f32", v, {2, 3}), kd::io::make_tensor("f16", h, {3}),
                                         kd::io::make_tensor("bf16", b, {2}), kd::io::make_tensor("f64", d, {2})},
                                        {}, image)
              .ok());
  safetensors_file f;
  REQUIRE(parse(image, f).ok());

  std::vector<kd::half> as_half;
  REQUIRE(f.read("f32", as_half).ok());
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(as_half[i].bits == kd::half(v[i]).bits);
  std::vector<kd::bfloat16> as_bf16;
  REQUIRE(f.read("f32", as_bf16).ok());
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(as_bf16[i].bits == kd::bfloat16(v[i]).bits);
  std::vector<double> as_double;
  REQUIRE(f.read("f32", as_double).ok());
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(as_double[i] == static_cast<double>(v[i]));

  std::vector<float> out(3);
  REQUIRE(f.read("f16", std::span<float>(out)).ok());
  CHECK(out == std::vector<float>{1.f, -0.5f, 3.140625f});
  REQUIRE(f.read("bf16", std::span<float>(out).first(2)).ok());
  CHECK(out[0] == 2.f);
  CHECK(out[1] == static_cast<float>(kd::bfloat16(-1e30f)));
  std::vector<kd::bfloat16> h_as_bf16;
  REQUIRE(f.read("f16", h_as_bf16).ok());
  CHECK(static_cast<float>(h_as_bf16[2]) == static_cast<float>(kd::bfloat16(3.140625f)));
  std::vector<float> d_as_float;
  REQUIRE(f.read("f64", d_as_float).ok());
  CHECK(d_as_float[0] == 0.1f);
  CHECK(d_as_float[1] == std::numeric_limits<float>::infinity());
}

TEST_CASE("safetensors: read errors name the tensor, the dtype and the destination") {
  const std::vector<std::int32_t> ids = {1, 2, 3};
  const std::vector<float> w = {1, 2, 3, 4};
  std::vector<std::byte> image;
  REQUIRE(kd::io::serialize_safetensors({kd::io::make_tensor("ids", ids, {3}), kd::io::make_tensor("w", w, {2, 2})},
                                        {}, image)
              .ok());
  safetensors_file f;
  REQUIRE(parse(image, f).ok());
  std::vector<float> out;
  check_error(f.read("ids", out), errc::invalid_argument,
              {"test.safetensors: tensor 'ids' has dtype I32, which cannot be read as float", "F64, F32, F16, BF16"});
  std::vector<std::int32_t> iout;
  check_error(f.read("w", iout), errc::invalid_argument, {"tensor 'w' has dtype F32", "int32_t"});
  check_error(f.read("missing.weight", out), errc::io_error, {"test.safetensors: no tensor 'missing.weight'"});
  std::vector<float> small(3);
  check_error(f.read("w", std::span<float>(small)), errc::shape_mismatch,
              {"tensor 'w' has shape [2, 2] (4 elements) but the destination holds 3"});
  // A failed read leaves the destination untouched.
  out = {42.f};
  CHECK_FALSE(f.read("ids", out).ok());
  CHECK(out == std::vector<float>{42.f});
}

// ---------------------------------------------------------------------------------------------------
// Golden files
// ---------------------------------------------------------------------------------------------------

TEST_CASE("safetensors: golden bytes of a hand-written file") {
  // Written by hand from the format description: size field (144 = 0x90, little-endian), the JSON
  // header ("__metadata__" first, then tensors in data order: F32 before F16, HF's alignment order),
  // 7 spaces of padding to a multiple of 8, then 0.5f, half(1), half(-2) little-endian.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
      R"("b":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}})";
  REQUIRE(header.size() == 137);
  std::string golden = std::string("\x90\x00\x00\x00\x00\x00\x00\x00", 8) + header + std::string(7, ' ');
  golden += std::string("\x00\x00\x00\x3f", 4);  // 0.5f
  golden += std::string("\x00\x3c", 2);          // half 1.0
  golden += std::string("\x00\xc0", 2);          // half -2.0
  REQUIRE(golden.size() == 8 + 144 + 8);

  const std::vector<float> a = {0.5f};
  const std::vector<kd::half> b = {kd::half(1.f), kd::half(-2.f)};
  std::vector<std::byte> image;
  REQUIRE(kd::io::serialize_safetensors({kd::io::make_tensor("b", b, {2}), kd::io::make_tensor("a", a, {})},
                                        {{"format", "pt"}}, image)
              .ok());
  CHECK(image == bytes_of(golden));

  safetensors_file f;
  REQUIRE(parse(bytes_of(golden), f).ok());
  CHECK(f.metadata().at("format") == "pt");
  const auto* ai = f.find("a");
  REQUIRE(ai != nullptr);
  CHECK(ai->shape.empty());
  CHECK(ai->numel == 1);
  CHECK(ai->begin == 0);
  CHECK(ai->end == 4);
  std::vector<float> v;
  REQUIRE(f.read("a", v).ok());
  CHECK(v == std::vector<float>{0.5f});
  REQUIRE(f.read("b", v).ok());
  CHECK(v == std::vector<float>{1.f, -2.f});
}

TEST_CASE("safetensors: HF's published serialization vectors") {
  // From huggingface/safetensors' own tests (tensor.rs): an empty file, with and without metadata, and a
  // [1, 2, 3] F32 tensor "attn.0" holding 0..5.
  std::vector<std::byte> image;
  REQUIRE(kd::io::serialize_safetensors({}, {}, image).ok());
  CHECK(image == bytes_of(std::string("\x08\0\0\0\0\0\0\0{}      ", 16)));
  REQUIRE(kd::io::serialize_safetensors({}, {{"framework", "pt"}}, image).ok());
  CHECK(image == bytes_of(std::string("\x28\0\0\0\0\0\0\0", 8) + R"({"__metadata__":{"framework":"pt"}})" + "     "));

  const std::vector<float> v = {0, 1, 2, 3, 4, 5};
  REQUIRE(kd::io::serialize_safetensors({kd::io::make_tensor("attn.0", v, {1, 2, 3})}, {}, image).ok());
  std::string expected = std::string("\x40\0\0\0\0\0\0\0", 8) +
                         R"({"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}})";
  for (float x : v) {
    const auto u = std::bit_cast<std::uint32_t>(x);
    for (int i = 0; i < 4; ++i) expected += static_cast<char>((u >> (8 * i)) & 0xff);
  }
  CHECK(image == bytes_of(expected));

  safetensors_file f;
  REQUIRE(parse(bytes_of(std::string("\x08\0\0\0\0\0\0\0{}      ", 16)), f).ok());
  CHECK(f.tensors().empty());
}

// ---------------------------------------------------------------------------------------------------
// Reader rejection rules (one test each)
// ---------------------------------------------------------------------------------------------------

TEST_CASE("safetensors reject: file shorter than the 8-byte size field") {
  safetensors_file f;
  check_error(parse(bytes_of(std::string("\x02\0\0", 3)), f), errc::io_error,
              {"test.safetensors: file is 3 bytes, too short for the 8-byte header size"});
  check_error(parse({}, f), errc::io_error, {"file is 0 bytes"});
}

TEST_CASE("safetensors reject: corrupt header size") {
  safetensors_file f;
  std::string big = le64(0xffffffffffffffffull) + "{}";
  check_error(parse(bytes_of(big), f), errc::io_error,
              {"header size 18446744073709551615 exceeds the 100000000-byte limit"});
  std::string over = le64(100000001) + "{}";
  check_error(parse(bytes_of(over), f), errc::io_error, {"exceeds the 100000000-byte limit"});
  std::string past = le64(30) + "{}      ";
  check_error(parse(bytes_of(past), f), errc::io_error,
              {"header size 30 exceeds the 8 bytes after the size field", "truncated file or corrupt header size"});
}

TEST_CASE("safetensors reject: truncated file") {
  const std::vector<float> v(16, 1.f);
  std::vector<std::byte> image;
  REQUIRE(kd::io::serialize_safetensors({kd::io::make_tensor("model.norm.weight", v, {16})}, {}, image).ok());
  safetensors_file f;
  REQUIRE(parse(image, f).ok());
  const auto header = kd::io::detail::load_le<std::uint64_t>(image.data());
  // Cut inside the data: the tensor's range runs past the end.
  auto cut = image;
  cut.resize(cut.size() - 5);
  check_error(parse(cut, f), errc::io_error,
              {"tensor 'model.norm.weight': data_offsets [0, 64] exceed the 59-byte data buffer", "truncated"});
  // Cut inside the header.
  cut.resize(static_cast<std::size_t>(8 + header / 2));
  check_error(parse(cut, f), errc::io_error, {"exceeds the", "bytes after the size field"});
  // Every prefix fails cleanly (and the whole file parses).
  for (std::size_t n = 0; n < image.size(); ++n) {
    CAPTURE(n);
    CHECK_FALSE(safetensors_file::parse(std::span(image).first(n), f).ok());
  }
}

TEST_CASE("safetensors reject: header that is not JSON, not an object, or not UTF-8") {
  check_error(parse_error(R"({"a":{"dtype":"F32",)"), errc::io_error, {"test.safetensors: header is not valid JSON"});
  check_error(parse_error(""), errc::io_error, {"header is not valid JSON"});
  check_error(parse_error("{} x"), errc::io_error, {"header is not valid JSON"});
  check_error(parse_error("[1, 2]"), errc::io_error, {"header is a JSON array, not an object"});
  check_error(parse_error("\"str\""), errc::io_error, {"header is a JSON string, not an object"});
  check_error(parse_error(std::string("{\"a\xff\":1}")), errc::io_error, {"header is not valid JSON", "UTF-8"});
  check_error(parse_error(std::string("{}\0", 3)), errc::io_error, {"header is not valid JSON"});
}

TEST_CASE("safetensors reject: unknown dtype") {
  check_error(parse_error(R"({"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", std::string(16, '\0')),
              errc::io_error, {"tensor 'w': unknown dtype 'F128' (known: BOOL, U8,", "BF16", "U64)"});
  check_error(parse_error(R"({"w":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", "abcd"), errc::io_error,
              {"unknown dtype 'f32'"});
  check_error(parse_error(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "abcd"), errc::io_error,
              {"tensor 'w': \"dtype\" is a JSON number, not a string"});
}

TEST_CASE("safetensors reject: shape does not match the byte range") {
  check_error(parse_error(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", std::string(24, '\0')),
              errc::shape_mismatch, {"tensor 'w': shape [2, 3] of F32 needs 24 bytes but data_offsets [0, 20] span 20"});
  check_error(parse_error(R"({"s":{"dtype":"BF16","shape":[],"data_offsets":[0,4]}})", "abcd"), errc::shape_mismatch,
              {"tensor 's': shape [] of BF16 needs 2 bytes"});
  check_error(parse_error(R"({"e":{"dtype":"F32","shape":[0,5],"data_offsets":[0,4]}})", "abcd"),
              errc::shape_mismatch, {"shape [0, 5] of F32 needs 0 bytes"});
}

TEST_CASE("safetensors reject: malformed shape") {
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[2,-1],"data_offsets":[0,2]}})", "ab"), errc::io_error,
              {"tensor 'w': shape has a negative dimension -1"});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}})", "ab"), errc::io_error,
              {"shape entries must be non-negative integers, found 2.0"});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":["2"],"data_offsets":[0,2]}})", "ab"), errc::io_error,
              {"found \"2\""});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":2,"data_offsets":[0,2]}})", "ab"), errc::io_error,
              {"\"shape\" is a JSON number, not an array"});
  check_error(parse_error(R"({"w":{"dtype":"U8","data_offsets":[0,2]}})", "ab"), errc::io_error,
              {"tensor 'w': missing \"shape\""});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,2]}})", "ab"),
              errc::io_error, {"shape dimension 18446744073709551615 is too large"});
}

TEST_CASE("safetensors reject: element count or byte size overflowing 64 bits") {
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
              errc::io_error, {"tensor 'w': element count of shape [4294967296, 4294967296] overflows 64 bits"});
  // Wraps to 0 without the check (2^62 * 4 = 2^64).
  check_error(parse_error(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})"),
              errc::io_error, {"tensor 'w': byte size of shape [4611686018427387904] overflows 64 bits"});
  // 2^32 * 2^32 * 0 overflows before the 0 (as HF's reader, which checks each product).
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})"),
              errc::io_error, {"overflows 64 bits"});
}

TEST_CASE("safetensors reject: data_offsets out of range, reversed or malformed") {
  // The example from the format's error catalogue.
  check_error(parse_error(R"({"model.layers.0.mlp.gate.weight":{"dtype":"U8","shape":[10],"data_offsets":[10,20]}})",
                          std::string(16, '\0')),
              errc::io_error,
              {"test.safetensors: tensor 'model.layers.0.mlp.gate.weight': data_offsets [10, 20] exceed the 16-byte "
               "data buffer"});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[17,17]}})", std::string(16, '\0')),
              errc::io_error, {"data_offsets [17, 17] exceed the 16-byte data buffer"});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", std::string(16, '\0')),
              errc::io_error, {"tensor 'w': data_offsets [8, 4] are reversed (begin > end)"});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "a"), errc::io_error,
              {"\"data_offsets\" must be two non-negative integers, found a JSON array of 1 element"});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", "a"), errc::io_error,
              {"must be two non-negative integers, found -1"});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":"0,1"}})", "a"), errc::io_error,
              {"must be two non-negative integers, found \"0,1\""});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[1]}})", "a"), errc::io_error, {"missing \"data_offsets\""});
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551616]}})", "a"),
              errc::io_error, {"must be two non-negative integers"});
}

TEST_CASE("safetensors reject: overlapping tensors") {
  check_error(parse_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                          std::string(12, '\0')),
              errc::io_error, {"tensors 'a' [0, 8] and 'b' [4, 12] overlap in the data buffer"});
  check_error(parse_error(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                          R"("b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
                          std::string(4, '\0')),
              errc::io_error, {"tensors 'a' [0, 4] and 'b' [0, 4] overlap"});
  // Contained in a range that is not the previous one.
  check_error(parse_error(R"({"big":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},)"
                          R"("c":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},)"
                          R"("d":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                          std::string(10, '\0')),
              errc::io_error, {"tensors 'big' [0, 10] and 'c' [2, 4] overlap"});
  // Touching ranges, gaps and empty tensors anywhere are fine.
  safetensors_file f;
  REQUIRE(parse(file_of(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},)"
                        R"("c":{"dtype":"U8","shape":[0],"data_offsets":[2,2]},)"
                        R"("d":{"dtype":"U8","shape":[1],"data_offsets":[8,9]}})",
                        std::string(10, 'x')),
                f)
            .ok());
  CHECK(f.tensors().size() == 4);
}

TEST_CASE("safetensors reject: duplicate names and keys") {
  check_error(parse_error(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                          R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                          "ab"),
              errc::io_error, {"tensor 'w': listed twice in the header (duplicate name)"});
  check_error(parse_error(R"({"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}})", "a"),
              errc::io_error, {"tensor 'w': duplicate key 'dtype' in its entry"});
  check_error(parse_error(R"({"__metadata__":{"k":"a","k":"b"}})"), errc::io_error,
              {"__metadata__ has duplicate key 'k'"});
  check_error(parse_error(R"({"__metadata__":{},"__metadata__":{}})"), errc::io_error,
              {"header has two \"__metadata__\" entries"});
}

TEST_CASE("safetensors reject: metadata that is not string -> string") {
  check_error(parse_error(R"({"__metadata__":{"format":"pt","step":100}})"), errc::io_error,
              {"test.safetensors: __metadata__ value of key 'step' is a JSON number, not a string"});
  check_error(parse_error(R"({"__metadata__":{"nested":{"a":"b"}}})"), errc::io_error,
              {"value of key 'nested' is a JSON object, not a string"});
  check_error(parse_error(R"({"__metadata__":["a"]})"), errc::io_error, {"__metadata__ is a JSON array, not an object"});
}

TEST_CASE("safetensors reject: tensor entry that is not an object") {
  check_error(parse_error(R"({"w":[1,2]})"), errc::io_error, {"tensor 'w': entry is a JSON array, not an object"});
  check_error(parse_error(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", "a"), errc::io_error,
              {"tensor 'w': missing \"dtype\""});
}

TEST_CASE("safetensors: hostile nesting neither crashes nor is dumped into messages") {
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  // In an unknown key of an entry: ignored, the file is valid.
  safetensors_file f;
  auto s = parse(file_of(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":)" + deep + "}}", "a"), f);
  CHECK_MESSAGE(s.ok(), s.message());
  // As a shape entry: rejected with a short message.
  s = parse(file_of(R"({"w":{"dtype":"U8","shape":[)" + deep + R"(],"data_offsets":[0,1]}})", "a"), f);
  check_error(s, errc::io_error, {"shape entries must be non-negative integers, found a JSON array of 1 element"});
  CHECK(s.message().size() < 200);
  // Unknown keys in an entry are ignored (as HF's reader does).
  REQUIRE(parse(file_of(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":"x"}})", "a"), f).ok());
}

TEST_CASE("safetensors: a failed parse leaves the destination unchanged") {
  safetensors_file f;
  REQUIRE(parse(file_of(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "a"), f).ok());
  CHECK_FALSE(parse(file_of("[]"), f).ok());
  CHECK(f.find("w") != nullptr);
}

TEST_CASE("safetensors: open() errors") {
  temp_dir dir;
  safetensors_file f;
  check_error(safetensors_file::open((dir.path / "absent.safetensors").string(), f), errc::io_error,
              {"cannot read '", "absent.safetensors'"});
  check_error(safetensors_file::open(dir.path.string(), f), errc::io_error, {"cannot read '"});
  const std::string path = (dir.path / "short.safetensors").string();
  std::ofstream(path, std::ios::binary) << "abc";
  check_error(safetensors_file::open(path, f), errc::io_error, {path + ": file is 3 bytes"});
}

// ---------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------

TEST_CASE("safetensors writer: invalid arguments create nothing") {
  temp_dir dir;
  const std::string path = (dir.path / "out.safetensors").string();
  const std::vector<float> v = {1, 2, 3, 4};
  check_error(kd::io::write_safetensors(path, {kd::io::make_tensor("w", v, {2, 3})}), errc::shape_mismatch,
              {"tensor 'w': shape [2, 3] of F32 needs 6 x 4 bytes but 16 were given"});
  check_error(kd::io::write_safetensors(path, {kd::io::make_tensor("w", v, {-4})}), errc::shape_mismatch,
              {"tensor 'w': shape [-4] has a negative dimension"});
  check_error(kd::io::write_safetensors(path, {kd::io::make_tensor("w", v, {4}), kd::io::make_tensor("w", v, {2, 2})}),
              errc::invalid_argument, {"tensor 'w': given twice"});
  check_error(kd::io::write_safetensors(path, {kd::io::make_tensor("__metadata__", v, {4})}), errc::invalid_argument,
              {"reserved"});
  check_error(kd::io::write_safetensors(path, {kd::io::make_tensor("bad\xff", v, {4})}), errc::invalid_argument,
              {"valid UTF-8"});
  check_error(kd::io::write_safetensors(path, {}, {{"k", "bad\xc3"}}), errc::invalid_argument, {"valid UTF-8"});
  check_error(kd::io::write_safetensors(
                  path, {kd::io::make_tensor("w", v, {4294967296, 4294967296, 4294967296, 0})}),
              errc::shape_mismatch, {"overflows 64 bits"});
  CHECK(dir.entries().empty());
}

TEST_CASE("safetensors writer: a failed write leaves no file and keeps the old checkpoint") {
  temp_dir dir;
  const std::vector<float> v = {1, 2, 3, 4};
  const std::vector<tensor_to_write> t = {kd::io::make_tensor("w", v, {4})};

  // The directory does not exist: the temporary file cannot be created.
  const std::string missing = (dir.path / "no" / "such" / "dir" / "model.safetensors").string();
  check_error(kd::io::write_safetensors(missing, t), errc::io_error,
              {"cannot write '" + missing + "'", "cannot create", "No such file or directory"});
  CHECK_FALSE(fs::exists(dir.path / "no"));

  // A read-only directory (meaningless for root, who may write anyway).
#if defined(__unix__)
  if (::geteuid() != 0) {
    fs::create_directory(dir.path / "ro");
    fs::permissions(dir.path / "ro", fs::perms::owner_read | fs::perms::owner_exec);
    check_error(kd::io::write_safetensors((dir.path / "ro" / "model.safetensors").string(), t), errc::io_error,
                {"cannot create", "Permission denied"});
    fs::permissions(dir.path / "ro", fs::perms::owner_all);
    CHECK(fs::is_empty(dir.path / "ro"));
    fs::remove(dir.path / "ro");
  }
#endif

  // The target is a directory: everything is written, the final rename fails, and the temporary file
  // is removed again.
  fs::create_directory(dir.path / "model.safetensors");
  check_error(kd::io::write_safetensors((dir.path / "model.safetensors").string(), t), errc::io_error,
              {"renaming", "over it failed"});
  CHECK(dir.entries() == std::vector<std::string>{"model.safetensors"});
  CHECK(fs::is_directory(dir.path / "model.safetensors"));

  // A rejected write leaves an existing checkpoint as it was.
  const std::string path = (dir.path / "good.safetensors").string();
  REQUIRE(kd::io::write_safetensors(path, t, {{"step", "1"}}).ok());
  std::ifstream in(path, std::ios::binary);
  const std::string before((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK_FALSE(kd::io::write_safetensors(path, {kd::io::make_tensor("w", v, {5})}).ok());
  std::ifstream in2(path, std::ios::binary);
  const std::string after((std::istreambuf_iterator<char>(in2)), std::istreambuf_iterator<char>());
  CHECK(before == after);
  CHECK(dir.entries() == std::vector<std::string>{"good.safetensors", "model.safetensors"});
}

// ---------------------------------------------------------------------------------------------------
// kd/io/atomic_file.hpp, the writer under write_safetensors and the checkpoint's config.json
// ---------------------------------------------------------------------------------------------------

namespace {
std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
}  // namespace

TEST_CASE("atomic_file: contents round trip, text and streamed binary with every byte value") {
  temp_dir dir;
  const fs::path text = dir.path / "config.json";
  REQUIRE(kd::io::write_file_atomic(text.string(), std::string("{\"a\": 1}\n")).ok());
  CHECK(slurp(text) == "{\"a\": 1}\n");

  std::string bin;
  for (int r = 0; r < 300; ++r)
    for (int b = 0; b < 256; ++b) bin.push_back(static_cast<char>(b ^ r));
  const fs::path streamed = dir.path / "blob.bin";
  REQUIRE(kd::io::write_file_atomic(streamed.string(), [&](auto&& sink) {
            for (std::size_t off = 0; off < bin.size(); off += 1000)
              if (!sink(bin.data() + off, std::min<std::size_t>(1000, bin.size() - off))) return false;
            return sink(bin.data(), 0);  // an empty write is fine
          }).ok());
  CHECK(slurp(streamed) == bin);

  const fs::path empty = dir.path / "empty";
  REQUIRE(kd::io::write_file_atomic(empty.string(), std::string()).ok());
  CHECK(fs::exists(empty));
  CHECK(fs::file_size(empty) == 0);
  CHECK(dir.entries() == std::vector<std::string>{"blob.bin", "config.json", "empty"});
}

TEST_CASE("atomic_file: an existing target is replaced whole, never appended to or left longer") {
  temp_dir dir;
  const fs::path p = dir.path / "f.txt";
  REQUIRE(kd::io::write_file_atomic(p.string(), std::string(10000, 'x')).ok());
  REQUIRE(kd::io::write_file_atomic(p.string(), std::string("short")).ok());
  CHECK(slurp(p) == "short");
  CHECK(dir.entries() == std::vector<std::string>{"f.txt"});
}

TEST_CASE("atomic_file: failures leave the target untouched and remove the temporary file") {
  temp_dir dir;

  // Missing directory: the temporary cannot be created, nothing appears.
  const std::string missing = (dir.path / "no" / "such" / "f.txt").string();
  check_error(kd::io::write_file_atomic(missing, std::string("x")), errc::io_error,
              {"cannot write '" + missing + "'", "cannot create", "No such file or directory"});
  CHECK(dir.entries().empty());

  // A regular file where the directory should be (unwritable for root too).
  std::ofstream(dir.path / "plain") << "keep";
  const std::string under_file = (dir.path / "plain" / "f.txt").string();
  check_error(kd::io::write_file_atomic(under_file, std::string("x")), errc::io_error,
              {"cannot write '" + under_file + "'", "cannot create", "Not a directory"});
  CHECK(slurp(dir.path / "plain") == "keep");

#if defined(__unix__)
  if (::geteuid() != 0) {  // root writes into read-only directories anyway
    fs::create_directory(dir.path / "ro");
    fs::permissions(dir.path / "ro", fs::perms::owner_read | fs::perms::owner_exec);
    check_error(kd::io::write_file_atomic((dir.path / "ro" / "f.txt").string(), std::string("x")), errc::io_error,
                {"cannot create", "Permission denied"});
    fs::permissions(dir.path / "ro", fs::perms::owner_all);
    CHECK(fs::is_empty(dir.path / "ro"));
    fs::remove(dir.path / "ro");
  }
#endif

  // The target is a non-empty directory: the contents are written, the rename fails, the temporary goes.
  fs::create_directory(dir.path / "target");
  std::ofstream(dir.path / "target" / "inside") << "kept";
  check_error(kd::io::write_file_atomic((dir.path / "target").string(), std::string("x")), errc::io_error,
              {"cannot write '" + (dir.path / "target").string() + "'", "renaming", "over it failed"});
  CHECK(slurp(dir.path / "target" / "inside") == "kept");

  // The producer fails half-way: the old contents stay and the partial temporary is removed.
  const fs::path p = dir.path / "f.txt";
  REQUIRE(kd::io::write_file_atomic(p.string(), std::string("old contents")).ok());
  const auto gives_up = [](auto&& sink) {
    (void)sink("new", 3);
    return false;
  };
  check_error(kd::io::write_file_atomic(p.string(), gives_up), errc::io_error,
              {"cannot write '" + p.string() + "'", "writing", "failed"});
  CHECK(slurp(p) == "old contents");
  CHECK(dir.entries() == std::vector<std::string>{"f.txt", "plain", "target"});
}

// ---------------------------------------------------------------------------------------------------
// Fuzzing corpus replay (tests/fuzz/corpus, written by scripts/make_fuzz_corpus.py): every file goes
// through parse() as is and, when it holds a 0xFF byte, in the fuzzer's framed form ("<header> 0xFF
// <data>", size field computed). valid_* files parse as is, framed_valid_* parse framed, the others
// are rejected as is. Nothing may crash.
// ---------------------------------------------------------------------------------------------------

#ifndef KD_FUZZ_CORPUS_DIR
#define KD_FUZZ_CORPUS_DIR ""
#endif

namespace {

// Parses and, on success, reads every tensor as the fuzzer does.
kd::status replay(const std::vector<std::byte>& image) {
  safetensors_file f;
  KD_TRY(parse(image, f));
  for (const auto& t : f.tensors()) {
    CHECK(f.data(t).size() == t.nbytes());
    std::vector<double> d;
    std::vector<std::int64_t> i;
    const bool is_float = t.type == dtype::f64 || t.type == dtype::f32 || t.type == dtype::f16 || t.type == dtype::bf16;
    const bool is_int = t.type == dtype::u8 || t.type == dtype::i8 || t.type == dtype::u16 || t.type == dtype::i16 ||
                        t.type == dtype::u32 || t.type == dtype::i32 || t.type == dtype::i64;
    CHECK(f.read(t.name, d).ok() == is_float);
    CHECK(f.read(t.name, i).ok() == is_int);
  }
  return {};
}

}  // namespace

TEST_CASE("safetensors: fuzzing seed corpus replays") {
  fs::path dir = KD_FUZZ_CORPUS_DIR;
  if (dir.empty()) dir = fs::path(__FILE__).parent_path() / "fuzz" / "corpus";
  REQUIRE_MESSAGE(fs::is_directory(dir), "corpus directory " << dir << " not found");
  int files = 0, valid = 0, framed_valid = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    ++files;
    const std::string name = e.path().filename().string();
    CAPTURE(name);
    std::ifstream in(e.path(), std::ios::binary);
    const std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const auto as_is = replay(bytes_of(raw));
    if (name.rfind("valid_", 0) == 0) {
      ++valid;
      CHECK_MESSAGE(as_is.ok(), as_is.message());
    } else if (name.rfind("framed_", 0) != 0) {
      CHECK_FALSE(as_is.ok());
      CHECK_FALSE(as_is.message().empty());
    }
    const auto sep = raw.find('\xff');
    if (sep != std::string::npos) {
      const auto framed = replay(file_of(std::string_view(raw).substr(0, sep), std::string_view(raw).substr(sep + 1)));
      if (name.rfind("framed_valid_", 0) == 0) {
        ++framed_valid;
        CHECK_MESSAGE(framed.ok(), framed.message());
      }
    }
  }
  CHECK(files >= 3);
  CHECK(valid >= 1);
  CHECK(framed_valid >= 1);
}
