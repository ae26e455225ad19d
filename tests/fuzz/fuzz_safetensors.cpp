// libFuzzer target for kd::io::safetensors_file::parse (see README.md in this folder).
//
// Arbitrary bytes go through parse(); whatever parses must be fully readable: every tensor's raw bytes
// lie inside the file (ASan checks), and read<T>() succeeds for the float and integer dtypes with
// destinations that accept them. Re-serializing what was read and parsing it again must give the same
// tensors, metadata and bytes (writer/reader agreement).
//
// Framed inputs: a mutated header rarely keeps the 8-byte size field in step with its length, which
// would confine the fuzzer to the JSON parser. So an input holding a 0xFF byte (never part of UTF-8
// JSON) is also tried as "<header JSON> 0xFF <data>", with the size field computed here; that reaches
// the tensor validation (dtype, shape, offsets, overlap, duplicates) with every mutation.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <span>
#include <vector>

#include <kd/io/safetensors.hpp>

namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

std::uint64_t check_image(std::span<const std::byte> bytes) {
  using namespace kd::io;
  safetensors_file f;
  const auto st = safetensors_file::parse(bytes, f, "fuzz");
  if (!st.ok()) {
    require(!st.message().empty());
    return 0;
  }

  std::uint64_t checksum = 0;
  std::vector<tensor_to_write> again;
  for (const tensor_info& t : f.tensors()) {
    require(f.find(t.name) == &t);
    const auto raw = f.data(t);
    require(raw.size() == t.nbytes());
    for (std::byte b : raw) checksum += std::to_integer<unsigned>(b);  // touches every byte (ASan)
    switch (t.type) {
      case dtype::f64:
      case dtype::f32:
      case dtype::f16:
      case dtype::bf16: {
        std::vector<float> v;
        std::vector<kd::half> h;
        require(f.read(t.name, v).ok() && v.size() == t.numel);
        require(f.read(t.name, h).ok() && h.size() == t.numel);
        std::vector<std::int32_t> wrong;
        require(!f.read(t.name, wrong).ok());
        break;
      }
      case dtype::u8:
      case dtype::i8:
      case dtype::u16:
      case dtype::i16:
      case dtype::u32:
      case dtype::i32:
      case dtype::i64: {
        std::vector<std::int64_t> v;
        require(f.read(t.name, v).ok() && v.size() == t.numel);
        std::vector<double> wrong;
        require(!f.read(t.name, wrong).ok());
        break;
      }
      default: break;
    }
    again.push_back({t.name, t.type, t.shape, raw});
  }

  // Writer/reader agreement: re-serialize, parse again, same tensors and bytes.
  std::vector<std::byte> image;
  if (serialize_safetensors(again, f.metadata(), image).ok()) {
    safetensors_file g;
    require(safetensors_file::parse(image, g, "fuzz-reserialized").ok());
    require(g.tensors().size() == f.tensors().size());
    require(g.metadata() == f.metadata());
    for (const tensor_info& t : f.tensors()) {
      const tensor_info* u = g.find(t.name);
      require(u != nullptr && u->type == t.type && u->shape == t.shape);
      const auto a = f.data(t);
      const auto b = g.data(*u);
      require(a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin()));
    }
  }
  return checksum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto bytes = std::as_bytes(std::span<const std::uint8_t>(data, size));
  std::uint64_t checksum = check_image(bytes);

  const auto* sep = static_cast<const std::uint8_t*>(std::memchr(data, 0xff, size));
  if (sep != nullptr) {
    const std::size_t n = static_cast<std::size_t>(sep - data);
    std::vector<std::byte> framed(8);
    kd::io::detail::store_le<std::uint64_t>(framed.data(), n);
    framed.insert(framed.end(), bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(n));
    framed.insert(framed.end(), bytes.begin() + static_cast<std::ptrdiff_t>(n) + 1, bytes.end());
    checksum += check_image(framed);
  }
  return checksum == 0xdeadbeefdeadbeefull ? 1 : 0;  // keeps the checksum observable
}
