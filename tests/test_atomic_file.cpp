// Tests for kd/io/atomic_file.hpp: contents round trip (text and streamed binary), an existing target
// replaced whole, and every failure (missing directory, a file where the directory should be, a target
// that cannot be replaced, a producer that fails) leaves the target as it was and no temporary file.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <kd/io/atomic_file.hpp>

#if defined(__unix__)
#include <unistd.h>
#endif

#include "test_util.hpp"

namespace fs = std::filesystem;
using kd::errc;

namespace {

struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("kd_atomic_file_test_" + std::to_string(rd()) + std::to_string(rd()));
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

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void check_io_error(const kd::status& s, std::initializer_list<std::string> fragments) {
  CHECK_FALSE(s.ok());
  CHECK(s.code() == errc::io_error);
  for (const auto& frag : fragments) {
    INFO("message: " << s.message() << "\nexpected fragment: " << frag);
    CHECK(kdtest::contains(s.message(), frag));
  }
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
  check_io_error(kd::io::write_file_atomic(missing, std::string("x")),
                 {"cannot write '" + missing + "'", "cannot create", "No such file or directory"});
  CHECK(dir.entries().empty());

  // A regular file where the directory should be (unwritable for root too).
  std::ofstream(dir.path / "plain") << "keep";
  const std::string under_file = (dir.path / "plain" / "f.txt").string();
  check_io_error(kd::io::write_file_atomic(under_file, std::string("x")),
                 {"cannot write '" + under_file + "'", "cannot create", "Not a directory"});
  CHECK(slurp(dir.path / "plain") == "keep");

#if defined(__unix__)
  if (::geteuid() != 0) {  // root writes into read-only directories anyway
    fs::create_directory(dir.path / "ro");
    fs::permissions(dir.path / "ro", fs::perms::owner_read | fs::perms::owner_exec);
    check_io_error(kd::io::write_file_atomic((dir.path / "ro" / "f.txt").string(), std::string("x")),
                   {"cannot create", "Permission denied"});
    fs::permissions(dir.path / "ro", fs::perms::owner_all);
    CHECK(fs::is_empty(dir.path / "ro"));
    fs::remove(dir.path / "ro");
  }
#endif

  // The target is a non-empty directory: the contents are written, the rename fails, the temporary goes.
  fs::create_directory(dir.path / "target");
  std::ofstream(dir.path / "target" / "inside") << "kept";
  check_io_error(kd::io::write_file_atomic((dir.path / "target").string(), std::string("x")),
                 {"cannot write '" + (dir.path / "target").string() + "'", "renaming", "over it failed"});
  CHECK(slurp(dir.path / "target" / "inside") == "kept");

  // The producer fails half-way: the old contents stay and the partial temporary is removed.
  const fs::path p = dir.path / "f.txt";
  REQUIRE(kd::io::write_file_atomic(p.string(), std::string("old contents")).ok());
  check_io_error(kd::io::write_file_atomic(p.string(),
                                           [](auto&& sink) {
                                             (void)sink("new", 3);
                                             return false;
                                           }),
                 {"cannot write '" + p.string() + "'", "writing", "failed"});
  CHECK(slurp(p) == "old contents");
  CHECK(dir.entries() == std::vector<std::string>{"f.txt", "plain", "target"});
}
