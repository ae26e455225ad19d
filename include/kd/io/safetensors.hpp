// kd/io/safetensors.hpp: read and write safetensors checkpoints (HF transformers' model.safetensors).
//
// Format: an 8-byte little-endian u64 N, then N bytes of UTF-8 JSON, then the data buffer. The JSON is an
// object mapping each tensor name to {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} (byte
// offsets relative to the start of the data buffer, little-endian, row-major), plus an optional
// "__metadata__" object of string -> string.
//
// Reading (kd::io::safetensors_file) validates the whole header before anything is handed out, so a
// tensor's bytes are never read out of bounds:
//   - the file holds at least the 8-byte size field; N <= 100,000,000 (max_header_size) and N fits in the
//     file; the header is a JSON object (nlohmann/json validates the UTF-8) without duplicate keys;
//   - every tensor has a known dtype, a shape of non-negative integers whose element count times the
//     dtype size (overflow-checked) equals end - begin, 0 <= begin <= end <= data-buffer size, and no two
//     tensors' byte ranges overlap (gaps and trailing bytes are allowed);
//   - "__metadata__" is an object whose values are all strings.
// Unknown keys inside a tensor entry are ignored (HF's reader does the same).
// Every failure is a kd::status: errc::io_error for a corrupt or truncated file, errc::shape_mismatch
// when a shape disagrees with its byte range, with a message naming the source, the tensor and the
// problem: "model.safetensors: tensor 'model.layers.0.mlp.gate.weight': data_offsets [10, 20] exceed the
// 16-byte data buffer". Nothing here throws (except std::bad_alloc).
//
// read<T>() converts F64/F32/F16/BF16 to T in {float, double, kd::half, kd::bfloat16}, and integer dtypes
// to a standard integer type T when every value of the stored type fits in T (I32 -> int64_t, U8 ->
// int32_t, ...). Other combinations fail with errc::invalid_argument.
//
// Writing (kd::io::write_safetensors) lays the file out as HF's safetensors does: data ordered by dtype
// (widest first, HF's dtype order) then by name, so every tensor is naturally aligned; "__metadata__"
// first in the header, then the tensors in data order, each as {"dtype", "shape", "data_offsets"}; the
// header padded with spaces to a multiple of 8 bytes. The file is written to a temporary file in the
// same directory, flushed to disk and renamed over the target: an interrupted write never leaves a
// partial checkpoint at `path` (at worst a stray "<path>.tmp-*" file).
//
// Needs nlohmann/json (Debian: nlohmann-json3-dev); link kd::io.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <kd/core/numeric.hpp>
#include <kd/io/atomic_file.hpp>
#include <kd/core/status.hpp>


namespace kd::io {

// ---------------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------------

// In HF's order (increasing alignment); the writer sorts by this order, descending.
enum class dtype : std::uint8_t { boolean, u8, i8, f8_e5m2, f8_e4m3, i16, u16, f16, bf16, i32, u32, f32, f64, i64, u64 };

inline constexpr dtype all_dtypes[] = {dtype::boolean, dtype::u8,  dtype::i8,  dtype::f8_e5m2, dtype::f8_e4m3,
                                       dtype::i16,     dtype::u16, dtype::f16, dtype::bf16,    dtype::i32,
                                       dtype::u32,     dtype::f32, dtype::f64, dtype::i64,     dtype::u64};

// The name used in the header ("F32", "BF16", ...).
constexpr std::string_view to_string(dtype d) noexcept {
  switch (d) {
    case dtype::boolean: return "BOOL";
    case dtype::u8: return "U8";
    case dtype::i8: return "I8";
    case dtype::f8_e5m2: return "F8_E5M2";
    case dtype::f8_e4m3: return "F8_E4M3";
    case dtype::i16: return "I16";
    case dtype::u16: return "U16";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::i32: return "I32";
    case dtype::u32: return "U32";
    case dtype::f32: return "F32";
    case dtype::f64: return "F64";
    case dtype::i64: return "I64";
    case dtype::u64: return "U64";
  }
  return "?";
}

// Bytes per element.
constexpr std::size_t dtype_size(dtype d) noexcept {
  switch (d) {
    case dtype::boolean:
    case dtype::u8:
    case dtype::i8:
    case dtype::f8_e5m2:
    case dtype::f8_e4m3: return 1;
    case dtype::i16:
    case dtype::u16:
    case dtype::f16:
    case dtype::bf16: return 2;
    case dtype::i32:
    case dtype::u32:
    case dtype::f32: return 4;
    case dtype::f64:
    case dtype::i64:
    case dtype::u64: return 8;
  }
  return 0;
}

// Header name -> dtype; false for an unknown name.
constexpr bool parse_dtype(std::string_view s, dtype& out) noexcept {
  for (dtype d : all_dtypes)
    if (to_string(d) == s) {
      out = d;
      return true;
    }
  return false;
}

// The dtype that stores a C++ element type (for make_tensor); void for a type safetensors cannot store.
template <class T>
struct dtype_of {
  static constexpr bool known = false;
};
#define KD_IO_DTYPE_OF(T, D)              \
  template <>                             \
  struct dtype_of<T> {                    \
    static constexpr bool known = true;   \
    static constexpr dtype value = D;     \
  }
KD_IO_DTYPE_OF(float, dtype::f32);
KD_IO_DTYPE_OF(double, dtype::f64);
KD_IO_DTYPE_OF(kd::half, dtype::f16);
KD_IO_DTYPE_OF(kd::bfloat16, dtype::bf16);
KD_IO_DTYPE_OF(std::int8_t, dtype::i8);
KD_IO_DTYPE_OF(std::uint8_t, dtype::u8);
KD_IO_DTYPE_OF(std::int16_t, dtype::i16);
KD_IO_DTYPE_OF(std::uint16_t, dtype::u16);
KD_IO_DTYPE_OF(std::int32_t, dtype::i32);
KD_IO_DTYPE_OF(std::uint32_t, dtype::u32);
KD_IO_DTYPE_OF(std::int64_t, dtype::i64);
KD_IO_DTYPE_OF(std::uint64_t, dtype::u64);
#undef KD_IO_DTYPE_OF

// Header "__metadata__": string -> string, sorted.
using metadata_map = std::map<std::string, std::string, std::less<>>;

inline constexpr std::uint64_t max_header_size = 100'000'000;  // as HF's reader

// One tensor of a parsed file.
struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;  // [] for a scalar
  std::uint64_t numel = 0;          // product of shape (1 for a scalar)
  std::uint64_t begin = 0;          // byte range [begin, end) in the data buffer
  std::uint64_t end = 0;
  [[nodiscard]] std::uint64_t nbytes() const noexcept { return end - begin; }
};

namespace detail {

template <class U>
U load_le(const std::byte* p) noexcept {
  U v = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) v |= static_cast<U>(std::to_integer<U>(p[i]) << (8 * i));
  return v;
}

template <class U>
void store_le(std::byte* p, U v) noexcept {
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xffu);
}

inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s;
  s += '[';
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += ']';
  return s;
}

inline std::string range_string(std::uint64_t b, std::uint64_t e) {
  std::string s;
  s += '[';
  s += std::to_string(b);
  s += ", ";
  s += std::to_string(e);
  s += ']';
  return s;
}

inline std::string quote_name(std::string_view name) {
  std::string s;
  s += '\'';
  s += name;
  s += '\'';
  return s;
}

inline std::string known_dtypes() {
  std::string s;
  for (dtype d : all_dtypes) {
    if (!s.empty()) s += ", ";
    s += to_string(d);
  }
  return s;
}

inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

inline std::string json_type(const nlohmann::json& j) { return j.type_name(); }

// A short description of a JSON value for a message: its text when it is a short scalar, else its type.
// (Never dumps a container: a hostile header may nest arrays a million levels deep.)
inline std::string describe(const nlohmann::json& j) {
  if (j.is_primitive()) {
    std::string s = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > 40) {
      s.resize(37);
      s += "...";
    }
    return s;
  }
  std::string s = "a JSON ";
  s += j.type_name();
  s += " of ";
  s += std::to_string(j.size());
  s += j.size() == 1 ? " element" : " elements";
  return s;
}

template <class T>
constexpr const char* dest_name() noexcept {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, kd::half>) return "kd::half";
  else if constexpr (std::is_same_v<T, kd::bfloat16>) return "kd::bfloat16";
  else if constexpr (std::is_same_v<T, std::int8_t>) return "int8_t";
  else if constexpr (std::is_same_v<T, std::uint8_t>) return "uint8_t";
  else if constexpr (std::is_same_v<T, std::int16_t>) return "int16_t";
  else if constexpr (std::is_same_v<T, std::uint16_t>) return "uint16_t";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "int32_t";
  else if constexpr (std::is_same_v<T, std::uint32_t>) return "uint32_t";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "int64_t";
  else if constexpr (std::is_same_v<T, std::uint64_t>) return "uint64_t";
  else return "?";
}

template <class T>
inline constexpr bool is_float_dest_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                        kd::is_16bit_float_v<T>;
template <class T>
inline constexpr bool is_int_dest_v = std::is_integral_v<T> && !std::is_same_v<T, bool> && dtype_of<T>::known;

// Every value of S is representable in T.
template <class S, class T>
inline constexpr bool int_fits_v =
    (std::is_signed_v<S> ? (std::is_signed_v<T> && sizeof(T) >= sizeof(S))
                         : (std::is_signed_v<T> ? sizeof(T) > sizeof(S) : sizeof(T) >= sizeof(S)));

template <class U>
using uint_of_size = std::conditional_t<
    sizeof(U) == 1, std::uint8_t,
    std::conditional_t<sizeof(U) == 2, std::uint16_t, std::conditional_t<sizeof(U) == 4, std::uint32_t, std::uint64_t>>>;

// Element i of a little-endian buffer of S.
template <class S>
S load_elem(const std::byte* base, std::size_t i) noexcept {
  using U = uint_of_size<S>;
  const U bits = load_le<U>(base + i * sizeof(S));
  if constexpr (kd::is_16bit_float_v<S>)
    return S::from_bits(bits);
  else
    return std::bit_cast<S>(bits);
}

// Converts n little-endian elements of S at src into T.
template <class T, class S>
void convert(const std::byte* src, std::size_t n, T* dst) noexcept {
  if constexpr (std::is_same_v<S, T> && std::endian::native == std::endian::little) {
    if (n) std::memcpy(dst, src, n * sizeof(T));
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const S v = load_elem<S>(src, i);
      if constexpr (std::is_same_v<S, T>)
        dst[i] = v;
      else if constexpr (is_float_dest_v<T>) {
        if constexpr (std::is_same_v<S, double>)
          dst[i] = kd::store_as<T>(v);  // double -> T (via float for half / bfloat16)
        else
          dst[i] = kd::store_as<T>(kd::load_as<float>(v));
      } else {
        dst[i] = static_cast<T>(v);
      }
    }
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------------

class safetensors_file {
 public:
  safetensors_file() = default;

  // Reads and validates the whole file at `path`. On failure `out` is left unchanged.
  static status open(const std::string& path, safetensors_file& out) {
    std::error_code ec;
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    if (ec) return {errc::io_error, "cannot read '" + path + "': " + ec.message()};
    if (size > std::numeric_limits<std::size_t>::max())
      return {errc::io_error, "'" + path + "' is too large to load (" + std::to_string(size) + " bytes)"};
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) return {errc::io_error, "cannot open '" + path + "': " + detail::errno_message(errno)};
    std::vector<std::byte> bytes(static_cast<std::size_t>(size));
    const std::size_t got = bytes.empty() ? 0 : std::fread(bytes.data(), 1, bytes.size(), f);
    const bool read_error = std::ferror(f) != 0;
    const int read_errno = errno;
    std::fclose(f);
    if (read_error) return {errc::io_error, "cannot read '" + path + "': " + detail::errno_message(read_errno)};
    if (got != bytes.size())
      return {errc::io_error, "'" + path + "' shrank while being read (" + std::to_string(got) + " of " +
                                  std::to_string(bytes.size()) + " bytes)"};
    return parse_owned(std::move(bytes), path, out);
  }

  // Validates a whole file image held in memory (copied). `source` names it in error messages.
  static status parse(std::span<const std::byte> bytes, safetensors_file& out,
                      std::string_view source = "safetensors buffer") {
    return parse_owned(std::vector<std::byte>(bytes.begin(), bytes.end()), std::string(source), out);
  }

  // The tensor called `name`, or nullptr.
  [[nodiscard]] const tensor_info* find(std::string_view name) const noexcept {
    auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                               [](const tensor_info& t, std::string_view n) { return t.name < n; });
    return it != tensors_.end() && it->name == name ? &*it : nullptr;
  }

  // Every tensor, sorted by name.
  [[nodiscard]] std::span<const tensor_info> tensors() const noexcept { return tensors_; }

  // The header's "__metadata__" (empty when absent).
  [[nodiscard]] const metadata_map& metadata() const noexcept { return metadata_; }

  // The path (or the `source` given to parse) used in messages.
  [[nodiscard]] const std::string& source() const noexcept { return source_; }

  // The raw little-endian bytes of a tensor of this file (validated to lie inside the file).
  [[nodiscard]] std::span<const std::byte> data(const tensor_info& t) const noexcept {
    return std::span<const std::byte>(bytes_).subspan(data_start_ + static_cast<std::size_t>(t.begin),
                                                      static_cast<std::size_t>(t.nbytes()));
  }

  // Reads tensor `name` into `out`, which must hold exactly numel elements (errc::shape_mismatch
  // otherwise). A missing tensor is errc::io_error; a dtype that cannot be converted to T without loss
  // of meaning is errc::invalid_argument.
  template <class T>
  status read(std::string_view name, std::span<T> out) const {
    static_assert(detail::is_float_dest_v<T> || detail::is_int_dest_v<T>,
                  "kd::io: read<T> supports float, double, kd::half, kd::bfloat16 and the fixed-width integers");
    const tensor_info* t = find(name);
    if (t == nullptr) return {errc::io_error, source_ + ": no tensor " + detail::quote_name(name)};
    if (out.size() != t->numel)
      return {errc::shape_mismatch, source_ + ": tensor " + detail::quote_name(name) + " has shape " +
                                        detail::shape_string(t->shape) + " (" + std::to_string(t->numel) +
                                        " elements) but the destination holds " + std::to_string(out.size())};
    return read_into(*t, out.data());
  }

  // Reads tensor `name` into `out` (resized to its element count) and, if `shape` is given, its shape.
  template <class T>
  status read(std::string_view name, std::vector<T>& out, std::vector<std::int64_t>* shape = nullptr) const {
    static_assert(detail::is_float_dest_v<T> || detail::is_int_dest_v<T>,
                  "kd::io: read<T> supports float, double, kd::half, kd::bfloat16 and the fixed-width integers");
    const tensor_info* t = find(name);
    if (t == nullptr) return {errc::io_error, source_ + ": no tensor " + detail::quote_name(name)};
    std::vector<T> tmp(static_cast<std::size_t>(t->numel));
    KD_TRY(read_into(*t, tmp.data()));
    out = std::move(tmp);
    if (shape != nullptr) *shape = t->shape;
    return {};
  }

 private:
  template <class T>
  status read_into(const tensor_info& t, T* dst) const {
    const std::byte* src = bytes_.data() + data_start_ + static_cast<std::size_t>(t.begin);
    const auto n = static_cast<std::size_t>(t.numel);
    auto mismatch = [&](const char* accepted) {
      return status{errc::invalid_argument, source_ + ": tensor " + detail::quote_name(t.name) + " has dtype " +
                                                std::string(to_string(t.type)) + ", which cannot be read as " +
                                                detail::dest_name<T>() + " (accepted: " + accepted + ")"};
    };
    if constexpr (detail::is_float_dest_v<T>) {
      switch (t.type) {
        case dtype::f64: detail::convert<T, double>(src, n, dst); return {};
        case dtype::f32: detail::convert<T, float>(src, n, dst); return {};
        case dtype::f16: detail::convert<T, kd::half>(src, n, dst); return {};
        case dtype::bf16: detail::convert<T, kd::bfloat16>(src, n, dst); return {};
        default: return mismatch("F64, F32, F16, BF16");
      }
    } else {
      auto as_int = [&]<class S>(S*) -> status {
        if constexpr (detail::int_fits_v<S, T>) {
          detail::convert<T, S>(src, n, dst);
          return {};
        } else {
          return mismatch("integer dtypes whose every value fits the destination");
        }
      };
      switch (t.type) {
        case dtype::u8: return as_int(static_cast<std::uint8_t*>(nullptr));
        case dtype::i8: return as_int(static_cast<std::int8_t*>(nullptr));
        case dtype::u16: return as_int(static_cast<std::uint16_t*>(nullptr));
        case dtype::i16: return as_int(static_cast<std::int16_t*>(nullptr));
        case dtype::u32: return as_int(static_cast<std::uint32_t*>(nullptr));
        case dtype::i32: return as_int(static_cast<std::int32_t*>(nullptr));
        case dtype::u64: return as_int(static_cast<std::uint64_t*>(nullptr));
        case dtype::i64: return as_int(static_cast<std::int64_t*>(nullptr));
        default: return mismatch("integer dtypes whose every value fits the destination");
      }
    }
  }

  static status parse_owned(std::vector<std::byte> bytes, std::string source, safetensors_file& out) {
    using nlohmann::json;
    const std::string& src = source;
    auto fail = [&](errc code, const std::string& what) { return status{code, src + ": " + what}; };
    auto tensor_fail = [&](errc code, const std::string& name, const std::string& what) {
      return status{code, src + ": tensor " + detail::quote_name(name) + ": " + what};
    };

    const std::uint64_t file_size = bytes.size();
    if (file_size < 8)
      return fail(errc::io_error, "file is " + std::to_string(file_size) +
                                      " bytes, too short for the 8-byte header size (truncated file)");
    const std::uint64_t n = detail::load_le<std::uint64_t>(bytes.data());
    if (n > max_header_size)
      return fail(errc::io_error, "header size " + std::to_string(n) + " exceeds the " +
                                      std::to_string(max_header_size) + "-byte limit (corrupt header size field)");
    if (n > file_size - 8)
      return fail(errc::io_error, "header size " + std::to_string(n) + " exceeds the " +
                                      std::to_string(file_size - 8) +
                                      " bytes after the size field (truncated file or corrupt header size)");
    const std::uint64_t data_size = file_size - 8 - n;
    // JSON text never holds a raw NUL, and nlohmann/json would stop at one (ignoring what follows).
    if (n > 0) {
      const void* nul = std::memchr(bytes.data() + 8, 0, static_cast<std::size_t>(n));
      if (nul != nullptr)
        return fail(errc::io_error, "header is not valid JSON: NUL byte at offset " +
                                        std::to_string(static_cast<const std::byte*>(nul) - bytes.data() - 8) +
                                        " of the header");
    }

    // Parse, recording the first duplicate key of any object (nlohmann keeps the last one silently).
    std::vector<std::set<std::string, std::less<>>> open_objects;
    std::string top_key, dup_key, dup_owner;
    bool has_dup = false;
    bool dup_top = false;
    json::parser_callback_t cb = [&](int /*depth*/, json::parse_event_t ev, json& parsed) {
      switch (ev) {
        case json::parse_event_t::object_start: open_objects.emplace_back(); break;
        case json::parse_event_t::object_end:
          if (!open_objects.empty()) open_objects.pop_back();
          break;
        case json::parse_event_t::key: {
          if (open_objects.empty() || !parsed.is_string()) break;
          const auto& k = parsed.get_ref<const std::string&>();
          if (open_objects.size() == 1) top_key = k;
          if (!open_objects.back().insert(k).second && !has_dup) {
            has_dup = true;
            dup_key = k;
            dup_top = open_objects.size() == 1;
            dup_owner = top_key;
          }
          break;
        }
        default: break;
      }
      return true;
    };
    json header;
    try {
      const char* first = reinterpret_cast<const char*>(bytes.data()) + 8;
      header = json::parse(first, first + n, cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
    } catch (const json::exception& e) {
      return fail(errc::io_error, std::string("header is not valid JSON: ") + e.what());
    }
    open_objects.clear();
    if (!header.is_object())
      return fail(errc::io_error, "header is a JSON " + detail::json_type(header) + ", not an object");
    if (has_dup) {
      if (dup_top)
        return dup_key == "__metadata__"
                   ? fail(errc::io_error, "header has two \"__metadata__\" entries")
                   : tensor_fail(errc::io_error, dup_key, "listed twice in the header (duplicate name)");
      if (dup_owner == "__metadata__")
        return fail(errc::io_error, "__metadata__ has duplicate key " + detail::quote_name(dup_key));
      return tensor_fail(errc::io_error, dup_owner, "duplicate key " + detail::quote_name(dup_key) + " in its entry");
    }

    safetensors_file f;
    f.tensors_.reserve(header.size());
    for (auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object())
          return fail(errc::io_error, "__metadata__ is a JSON " + detail::json_type(entry) + ", not an object");
        for (auto& [k, v] : entry.items()) {
          if (!v.is_string())
            return fail(errc::io_error, "__metadata__ value of key " + detail::quote_name(k) + " is a JSON " +
                                            detail::json_type(v) + ", not a string");
          f.metadata_.emplace(k, v.get<std::string>());
        }
        continue;
      }
      if (!entry.is_object())
        return tensor_fail(errc::io_error, name, "entry is a JSON " + detail::json_type(entry) + ", not an object");
      tensor_info t;
      t.name = name;

      auto dt = entry.find("dtype");
      if (dt == entry.end()) return tensor_fail(errc::io_error, name, "missing \"dtype\"");
      if (!dt->is_string())
        return tensor_fail(errc::io_error, name, "\"dtype\" is a JSON " + detail::json_type(*dt) + ", not a string");
      const auto& dts = dt->get_ref<const std::string&>();
      if (!parse_dtype(dts, t.type))
        return tensor_fail(errc::io_error, name, "unknown dtype " + detail::quote_name(dts) + " (known: " +
                                                     detail::known_dtypes() + ")");

      auto sh = entry.find("shape");
      if (sh == entry.end()) return tensor_fail(errc::io_error, name, "missing \"shape\"");
      if (!sh->is_array())
        return tensor_fail(errc::io_error, name, "\"shape\" is a JSON " + detail::json_type(*sh) + ", not an array");
      t.shape.reserve(sh->size());
      for (const auto& d : *sh) {
        if (d.is_number_unsigned()) {
          const auto v = d.get<std::uint64_t>();
          if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
            return tensor_fail(errc::io_error, name, "shape dimension " + std::to_string(v) + " is too large");
          t.shape.push_back(static_cast<std::int64_t>(v));
        } else if (d.is_number_integer()) {  // signed: negative (non-negative ones parse as unsigned)
          const auto v = d.get<std::int64_t>();
          if (v < 0)
            return tensor_fail(errc::io_error, name, "shape has a negative dimension " + std::to_string(v));
          t.shape.push_back(v);
        } else {
          return tensor_fail(errc::io_error, name, "shape entries must be non-negative integers, found " +
                                                       detail::describe(d));
        }
      }

      auto off = entry.find("data_offsets");
      if (off == entry.end()) return tensor_fail(errc::io_error, name, "missing \"data_offsets\"");
      if (!off->is_array() || off->size() != 2)
        return tensor_fail(errc::io_error, name,
                           "\"data_offsets\" must be two non-negative integers, found " + detail::describe(*off));
      for (const auto& o : *off)
        if (!o.is_number_unsigned())
          return tensor_fail(errc::io_error, name,
                             "\"data_offsets\" must be two non-negative integers, found " + detail::describe(o));
      t.begin = (*off)[0].get<std::uint64_t>();
      t.end = (*off)[1].get<std::uint64_t>();
      const std::string offs = "data_offsets " + detail::range_string(t.begin, t.end);
      if (t.begin > t.end) return tensor_fail(errc::io_error, name, offs + " are reversed (begin > end)");
      if (t.end > data_size)
        return tensor_fail(errc::io_error, name,
                           offs + " exceed the " + std::to_string(data_size) + "-byte data buffer (truncated file?)");

      std::uint64_t numel = 1;
      for (std::int64_t d : t.shape)
        if (!detail::checked_mul(numel, static_cast<std::uint64_t>(d), numel))
          return tensor_fail(errc::io_error, name,
                             "element count of shape " + detail::shape_string(t.shape) + " overflows 64 bits");
      std::uint64_t nbytes = 0;
      if (!detail::checked_mul(numel, dtype_size(t.type), nbytes))
        return tensor_fail(errc::io_error, name,
                           "byte size of shape " + detail::shape_string(t.shape) + " overflows 64 bits");
      if (nbytes != t.end - t.begin)
        return tensor_fail(errc::shape_mismatch, name,
                           "shape " + detail::shape_string(t.shape) + " of " + std::string(to_string(t.type)) +
                               " needs " + std::to_string(nbytes) + " bytes but " + offs + " span " +
                               std::to_string(t.end - t.begin));
      t.numel = numel;
      f.tensors_.push_back(std::move(t));
    }
    header = json();  // release the DOM before sorting

    // Overlap: sort by begin; every non-empty range must start at or after the furthest end so far.
    std::vector<const tensor_info*> by_offset;
    by_offset.reserve(f.tensors_.size());
    for (const auto& t : f.tensors_)
      if (t.nbytes() > 0) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const tensor_info* a, const tensor_info* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    const tensor_info* furthest = nullptr;
    for (const tensor_info* t : by_offset) {
      if (furthest != nullptr && t->begin < furthest->end)
        return fail(errc::io_error, "tensors " + detail::quote_name(furthest->name) + " " +
                                        detail::range_string(furthest->begin, furthest->end) + " and " +
                                        detail::quote_name(t->name) + " " + detail::range_string(t->begin, t->end) +
                                        " overlap in the data buffer");
      if (furthest == nullptr || t->end > furthest->end) furthest = t;
    }

    std::sort(f.tensors_.begin(), f.tensors_.end(),
              [](const tensor_info& a, const tensor_info& b) { return a.name < b.name; });
    f.bytes_ = std::move(bytes);
    f.data_start_ = static_cast<std::size_t>(8 + n);
    f.source_ = std::move(source);
    out = std::move(f);
    return {};
  }

  std::vector<std::byte> bytes_;  // the whole file
  std::size_t data_start_ = 0;    // 8 + header size
  std::vector<tensor_info> tensors_;
  metadata_map metadata_;
  std::string source_;
};

// ---------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------

// One tensor to write: `data` holds numel * dtype_size(type) bytes, elements in host byte order
// (converted to little-endian on write). The bytes must stay alive during the call.
struct tensor_to_write {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;  // [] for a scalar
  std::span<const std::byte> data;
};

// A tensor_to_write viewing `values` (dtype from the element type).
template <class T>
tensor_to_write make_tensor(std::string name, std::span<const T> values, std::vector<std::int64_t> shape) {
  static_assert(dtype_of<T>::known, "kd::io::make_tensor: no safetensors dtype stores this element type");
  return {std::move(name), dtype_of<T>::value, std::move(shape), std::as_bytes(values)};
}
template <class T>
tensor_to_write make_tensor(std::string name, const std::vector<T>& values, std::vector<std::int64_t> shape) {
  return make_tensor(std::move(name), std::span<const T>(values), std::move(shape));
}

namespace detail {

struct write_plan {
  std::string header;               // padded JSON header
  std::vector<std::size_t> order;   // indices into the tensors, in data order
  std::uint64_t data_size = 0;
};

inline status plan_write(const std::vector<tensor_to_write>& tensors, const metadata_map& meta, write_plan& plan) {
  using ojson = nlohmann::ordered_json;
  std::vector<std::size_t> order(tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return tensors[a].name < tensors[b].name; });
  for (std::size_t i = 0; i < order.size(); ++i) {
    const tensor_to_write& t = tensors[order[i]];
    const std::string tn = "tensor " + quote_name(t.name) + ": ";
    if (t.name == "__metadata__")
      return {errc::invalid_argument, "a tensor cannot be called \"__metadata__\" (reserved by the format)"};
    if (i > 0 && tensors[order[i - 1]].name == t.name)
      return {errc::invalid_argument, tn + "given twice (tensor names must be unique)"};
    if (dtype_size(t.type) == 0) return {errc::invalid_argument, tn + "invalid dtype"};
    std::uint64_t numel = 1;
    for (std::int64_t d : t.shape) {
      if (d < 0) return {errc::shape_mismatch, tn + "shape " + shape_string(t.shape) + " has a negative dimension"};
      if (!checked_mul(numel, static_cast<std::uint64_t>(d), numel))
        return {errc::shape_mismatch, tn + "element count of shape " + shape_string(t.shape) + " overflows 64 bits"};
    }
    std::uint64_t nbytes = 0;
    if (!checked_mul(numel, dtype_size(t.type), nbytes) || nbytes != t.data.size())
      return {errc::shape_mismatch, tn + "shape " + shape_string(t.shape) + " of " + std::string(to_string(t.type)) +
                                        " needs " + std::to_string(numel) + " x " +
                                        std::to_string(dtype_size(t.type)) + " bytes but " +
                                        std::to_string(t.data.size()) + " were given"};
  }
  // Data order: widest dtype first (HF's order), then name.
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return tensors[a].type > tensors[b].type; });

  ojson h = ojson::object();
  if (!meta.empty()) {
    ojson m = ojson::object();
    for (const auto& [k, v] : meta) m[k] = v;
    h["__metadata__"] = std::move(m);
  }
  std::uint64_t offset = 0;
  for (std::size_t i : order) {
    const tensor_to_write& t = tensors[i];
    ojson e = ojson::object();
    e["dtype"] = std::string(to_string(t.type));
    e["shape"] = t.shape;
    e["data_offsets"] = ojson::array({offset, offset + t.data.size()});
    offset += t.data.size();
    h[t.name] = std::move(e);
  }
  try {
    plan.header = h.dump(-1, ' ', false, ojson::error_handler_t::strict);
  } catch (const ojson::exception& e) {
    return {errc::invalid_argument, std::string("tensor names and metadata must be valid UTF-8: ") + e.what()};
  }
  plan.header.append((8 - plan.header.size() % 8) % 8, ' ');
  plan.order = std::move(order);
  plan.data_size = offset;
  return {};
}

// Streams the file through sink(const std::byte*, std::size_t) -> bool (false: stop, write failed).
template <class Sink>
bool emit(const std::vector<tensor_to_write>& tensors, const write_plan& plan, Sink&& sink) {
  std::byte size_field[8];
  store_le<std::uint64_t>(size_field, plan.header.size());
  if (!sink(size_field, 8)) return false;
  if (!sink(reinterpret_cast<const std::byte*>(plan.header.data()), plan.header.size())) return false;
  for (std::size_t i : plan.order) {
    const tensor_to_write& t = tensors[i];
    const std::size_t es = dtype_size(t.type);
    if (std::endian::native == std::endian::little || es == 1) {
      if (!t.data.empty() && !sink(t.data.data(), t.data.size())) return false;
    } else {
      std::byte buf[4096];
      for (std::size_t off = 0; off < t.data.size();) {
        const std::size_t chunk = std::min(sizeof(buf) / es * es, t.data.size() - off);
        for (std::size_t e = 0; e < chunk; e += es)
          for (std::size_t b = 0; b < es; ++b) buf[e + b] = t.data[off + e + es - 1 - b];
        if (!sink(buf, chunk)) return false;
        off += chunk;
      }
    }
  }
  return true;
}

}  // namespace detail

// The complete file image in memory.
inline status serialize_safetensors(const std::vector<tensor_to_write>& tensors, const metadata_map& meta,
                                    std::vector<std::byte>& out) {
  detail::write_plan plan;
  KD_TRY(detail::plan_write(tensors, meta, plan));
  std::vector<std::byte> buf;
  buf.reserve(static_cast<std::size_t>(8 + plan.header.size() + plan.data_size));
  (void)detail::emit(tensors, plan, [&](const std::byte* p, std::size_t n) {
    buf.insert(buf.end(), p, p + n);
    return true;
  });
  out = std::move(buf);
  return {};
}

// Writes `path` atomically (kd/io/atomic_file.hpp): a temporary file next to it, flushed to disk, then
// renamed over `path`. Nothing is created or replaced when the arguments are invalid; on an I/O failure
// the temporary file is removed and `path` keeps its previous contents (or stays absent).
inline status write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors,
                                const metadata_map& meta = {}) {
  detail::write_plan plan;
  KD_TRY(detail::plan_write(tensors, meta, plan));

  return write_file_atomic(path, [&](auto&& sink) { return detail::emit(tensors, plan, sink); });
}

}  // namespace kd::io
