// kd_jsonl_close A B REL [ABS]: exit 0 when two JSON Lines files hold the same records, line by line, with
// every number within REL relative or ABS absolute (default 0) of its counterpart, every other value equal. The trainer's tests use it to
// compare the logs of runs that differ only in float rounding (data-parallel ranks against one process).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace {

double abs_tol = 0.0;

bool close(const nlohmann::json& a, const nlohmann::json& b, double rel, const std::string& at, std::string& why) {
  if (a.is_number() && b.is_number()) {
    const double x = a.get<double>(), y = b.get<double>();
    if (std::abs(x - y) <= rel * std::max(std::abs(x), std::abs(y)) + abs_tol || x == y) return true;
    char buf[96];
    std::snprintf(buf, sizeof buf, ": %.9g vs %.9g", x, y);
    why = at + buf;
    return false;
  }
  if (a.type() != b.type()) {
    why = at + ": different types";
    return false;
  }
  if (a.is_object()) {
    if (a.size() != b.size()) {
      why = at + ": different keys";
      return false;
    }
    for (auto it = a.begin(); it != a.end(); ++it) {
      if (!b.contains(it.key())) {
        why = at + "." + it.key() + ": missing";
        return false;
      }
      if (!close(it.value(), b.at(it.key()), rel, at + "." + it.key(), why)) return false;
    }
    return true;
  }
  if (a.is_array()) {
    if (a.size() != b.size()) {
      why = at + ": different lengths";
      return false;
    }
    for (std::size_t i = 0; i < a.size(); ++i)
      if (!close(a[i], b[i], rel, at + "[" + std::to_string(i) + "]", why)) return false;
    return true;
  }
  if (a != b) why = at + ": " + a.dump() + " vs " + b.dump();
  return a == b;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: kd_jsonl_close A.jsonl B.jsonl REL [ABS]\n");
    return 64;
  }
  std::ifstream a(argv[1]), b(argv[2]);
  if (!a || !b) {
    std::fprintf(stderr, "kd_jsonl_close: cannot read %s\n", !a ? argv[1] : argv[2]);
    return 66;
  }
  const double rel = std::atof(argv[3]);
  if (argc == 5) abs_tol = std::atof(argv[4]);
  std::string la, lb;
  for (int line = 1;; ++line) {
    const bool ga = static_cast<bool>(std::getline(a, la)), gb = static_cast<bool>(std::getline(b, lb));
    if (!ga && !gb) return 0;
    if (ga != gb) {
      std::fprintf(stderr, "kd_jsonl_close: %s has more lines (from line %d)\n", ga ? argv[1] : argv[2], line);
      return 1;
    }
    try {
      std::string why;
      if (!close(nlohmann::json::parse(la), nlohmann::json::parse(lb), rel, "line " + std::to_string(line), why)) {
        std::fprintf(stderr, "kd_jsonl_close: %s\n", why.c_str());
        return 1;
      }
    } catch (const nlohmann::json::exception& e) {
      std::fprintf(stderr, "kd_jsonl_close: line %d: %s\n", line, e.what());
      return 1;
    }
  }
}
