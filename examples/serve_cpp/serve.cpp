// hamur_serve: score raw rows with an AOTInductor package written by
//   hamur-fast export --checkpoint CHECKPOINT --format aoti --output model_aoti.pt2
//
//   hamur_serve PACKAGE ROWS.csv [--batch N]            one probability per row on stdout (%.9g)
//   hamur_serve PACKAGE ROWS.csv --time CALLS --batch N  p50 and p99 microseconds of CALLS calls of N rows
//
// ROWS.csv is in the training data's raw layout: UTF-8 CSV, a header line, then one row per line (RFC 4180
// quoting; Parquet input is for `hamur-fast predict --model`).
// The package carries its feature map as the JSON metadata entry "hamur_fast.serving" (see
// hamur_fast/inference/serving.py); this program does the documented encoding step with it:
//   sparse column, text vocabulary:    id = position of the cell's text in the vocabulary + 1, else 0
//   sparse column, integer vocabulary: id = position of the cell's integer value + 1, else 0 (not a whole number: 0)
//   domain column:                     domain id from "domain_mapping" (whole numbers match as integers); a
//                                      value outside the mapping is an error, as in Python
//   dense column:                      the raw number (the graph scales it); not a finite number is an error
//   prepare "movielens":               cate_id = the text of "genres" up to its first '|'
// The graph takes (ids (B, S) int64, dense (B, Dn) float32, domain (B,) int64) and returns probabilities (B,).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// ------------------------------------------------------------------ a small JSON reader (the metadata)
struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  std::string text;  // a string's value, or a number's literal (kept whole: ids may exceed 2^53)
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json& at(const std::string& key) const {
    for (const auto& field : fields)
      if (field.first == key) return field.second;
    throw std::runtime_error("feature map JSON has no key '" + key + "'");
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  Json parse() {
    Json value = parse_value();
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters");
    return value;
  }

 private:
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("feature map JSON: " + what + " at offset " + std::to_string(pos_));
  }
  void skip_space() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool take(char c) {
    skip_space();
    if (pos_ < s_.size() && s_[pos_] == c) return ++pos_, true;
    return false;
  }
  Json parse_value() {
    skip_space();
    if (pos_ >= s_.size()) fail("unexpected end");
    Json value;
    char c = s_[pos_];
    if (c == '{') {
      value.kind = Json::Object, ++pos_;
      if (take('}')) return value;
      do {
        skip_space();
        std::string key = parse_string();
        if (!take(':')) fail("':' expected");
        value.fields.emplace_back(key, parse_value());
      } while (take(','));
      if (!take('}')) fail("'}' expected");
    } else if (c == '[') {
      value.kind = Json::Array, ++pos_;
      if (take(']')) return value;
      do value.items.push_back(parse_value());
      while (take(','));
      if (!take(']')) fail("']' expected");
    } else if (c == '"') {
      value.kind = Json::String, value.text = parse_string();
    } else if (s_.compare(pos_, 4, "null") == 0) {
      pos_ += 4;
    } else if (s_.compare(pos_, 4, "true") == 0 || s_.compare(pos_, 5, "false") == 0) {
      value.kind = Json::Bool, value.text = s_[pos_] == 't' ? "true" : "false";
      pos_ += value.text.size();
    } else {
      size_t end = s_.find_first_not_of("+-0123456789.eE", pos_);
      if (end == pos_) fail("unexpected character");
      value.kind = Json::Number, value.text = s_.substr(pos_, end - pos_), pos_ = end;
    }
    return value;
  }
  std::string parse_string() {
    if (pos_ >= s_.size() || s_[pos_] != '"') fail("string expected");
    std::string out;
    for (++pos_; pos_ < s_.size() && s_[pos_] != '"'; ++pos_) {
      if (s_[pos_] != '\\') {
        out += s_[pos_];
        continue;
      }
      if (++pos_ >= s_.size()) fail("unfinished escape");
      char e = s_[pos_];
      const char* simple = "\"\\/bfnrt";
      const char* meaning = "\"\\/\b\f\n\r\t";
      if (const char* p = std::strchr(simple, e); p && e) {
        out += meaning[p - simple];
      } else if (e == 'u') {
        unsigned code = hex4();
        if (code >= 0xD800 && code < 0xDC00 && s_.compare(pos_ + 1, 2, "\\u") == 0) {
          pos_ += 2;
          code = 0x10000 + ((code - 0xD800) << 10) + (hex4() - 0xDC00);
        }
        append_utf8(out, code);
      } else {
        fail("bad escape");
      }
    }
    if (pos_ >= s_.size()) fail("unterminated string");
    ++pos_;
    return out;
  }
  unsigned hex4() {
    if (pos_ + 4 >= s_.size()) fail("short \\u escape");
    unsigned code = std::stoul(s_.substr(pos_ + 1, 4), nullptr, 16);
    pos_ += 4;
    return code;
  }
  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += char(code);
    } else if (code < 0x800) {
      out += char(0xC0 | (code >> 6)), out += char(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += char(0xE0 | (code >> 12)), out += char(0x80 | ((code >> 6) & 0x3F)), out += char(0x80 | (code & 0x3F));
    } else {
      out += char(0xF0 | (code >> 18)), out += char(0x80 | ((code >> 12) & 0x3F));
      out += char(0x80 | ((code >> 6) & 0x3F)), out += char(0x80 | (code & 0x3F));
    }
  }
};

// ------------------------------------------------------------------ CSV (RFC 4180: quotes, "" inside quotes)
std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::stringstream buffer;
  buffer << file.rdbuf();
  std::string data = buffer.str();
  if (data.rfind("\xEF\xBB\xBF", 0) == 0) data.erase(0, 3);  // a UTF-8 byte-order mark, as pandas skips it
  std::vector<std::vector<std::string>> rows(1);
  std::string cell;
  bool quoted = false;
  for (size_t i = 0; i < data.size(); ++i) {
    char c = data[i];
    if (quoted) {
      if (c == '"' && i + 1 < data.size() && data[i + 1] == '"') cell += '"', ++i;
      else if (c == '"') quoted = false;
      else cell += c;
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      rows.back().push_back(cell), cell.clear();
    } else if (c == '\n' || c == '\r') {
      if (c == '\r' && i + 1 < data.size() && data[i + 1] == '\n') ++i;
      rows.back().push_back(cell), cell.clear();
      rows.emplace_back();
    } else {
      cell += c;
    }
  }
  if (!cell.empty() || !rows.back().empty()) rows.back().push_back(cell);
  rows.erase(std::remove_if(rows.begin(), rows.end(), [](const auto& r) { return r.empty(); }), rows.end());
  return rows;
}

// A whole number written in a cell ("7", "7.0", "1e3"), as pandas reads numbers.
bool whole_number(const std::string& text, long long* value) {
  if (text.empty()) return false;
  char* end = nullptr;
  long long integer = std::strtoll(text.c_str(), &end, 10);
  if (*end == '\0') return *value = integer, true;
  double real = std::strtod(text.c_str(), &end);
  if (*end != '\0' || !std::isfinite(real) || real != std::floor(real) || std::fabs(real) > 9.2e18) return false;
  return *value = static_cast<long long>(real), true;
}

// ------------------------------------------------------------------ the encoding step
class Encoder {
 public:
  explicit Encoder(const std::string& document) {
    Json root = JsonParser(document).parse();
    const Json& map = root.at("feature_map");
    const Json& schema = map.at("schema");
    domain_column_ = schema.at("domain").text;
    const Json& prepare = map.at("prepare");
    prepare_ = prepare.kind == Json::String ? prepare.text : "";
    if (!prepare_.empty() && prepare_ != "movielens")
      throw std::runtime_error("unknown prepare step '" + prepare_ + "' (this runner knows movielens)");
    for (const Json& column : root.at("inputs").at("ids").items) {
      Vocabulary vocabulary{column.text};
      const Json& values = map.at("vocabularies").at(column.text);
      for (size_t i = 0; i < values.items.size(); ++i) {
        const Json& v = values.items[i];
        vocabulary.numeric = v.kind == Json::Number;
        long long id = static_cast<long long>(i) + 1;
        if (vocabulary.numeric) vocabulary.by_number[std::stoll(v.text)] = id;
        else vocabulary.by_text[v.text] = id;
      }
      vocabularies_.push_back(std::move(vocabulary));
    }
    for (const Json& column : root.at("inputs").at("dense").items) dense_.push_back(column.text);
    for (const auto& field : map.at("domain_mapping").fields) domains_[field.first] = std::stoll(field.second.text);
  }

  // (ids, dense, domain) for every data row of a CSV whose first row is the header.
  std::vector<torch::Tensor> encode(const std::vector<std::vector<std::string>>& rows) const {
    if (rows.size() < 2) throw std::runtime_error("the rows file has a header but no rows");
    const auto& header = rows[0];
    auto column = [&](const std::string& name) -> size_t {
      auto it = std::find(header.begin(), header.end(), name);
      if (it == header.end()) throw std::runtime_error("the rows file has no column '" + name + "'");
      return it - header.begin();
    };
    std::vector<size_t> sparse_at, dense_at;
    const size_t genres = prepare_ == "movielens" ? column("genres") : 0;
    for (const auto& v : vocabularies_)
      sparse_at.push_back(prepare_ == "movielens" && v.column == "cate_id" ? SIZE_MAX : column(v.column));
    for (const auto& name : dense_) dense_at.push_back(column(name));
    const size_t domain_at = column(domain_column_);
    const int64_t n = rows.size() - 1, s = vocabularies_.size(), dn = dense_.size();
    auto ids = torch::zeros({n, s}, torch::kInt64);
    auto dense = torch::zeros({n, dn}, torch::kFloat32);
    auto domain = torch::zeros({n}, torch::kInt64);
    auto id = ids.accessor<int64_t, 2>();
    auto value = dense.accessor<float, 2>();
    auto dom = domain.accessor<int64_t, 1>();
    for (int64_t r = 0; r < n; ++r) {
      const auto& row = rows[r + 1];
      if (row.size() != header.size())
        throw std::runtime_error("line " + std::to_string(r + 2) + " has " + std::to_string(row.size()) +
                                 " cells, the header " + std::to_string(header.size()));
      for (int64_t j = 0; j < s; ++j) {
        std::string cell = sparse_at[j] == SIZE_MAX ? row[genres].substr(0, row[genres].find('|')) : row[sparse_at[j]];
        id[r][j] = vocabularies_[j].id(cell);
      }
      for (int64_t j = 0; j < dn; ++j) {
        char* end = nullptr;
        const std::string& cell = row[dense_at[j]];
        double x = std::strtod(cell.c_str(), &end);
        if (cell.empty() || *end != '\0' || !std::isfinite(x))
          throw std::runtime_error("line " + std::to_string(r + 2) + ": dense column '" + dense_[j] +
                                   "' needs a finite number, got '" + cell + "'");
        value[r][j] = static_cast<float>(x);
      }
      dom[r] = domain_id(row[domain_at], r + 2);
    }
    return {ids, dense, domain};
  }

 private:
  struct Vocabulary {
    std::string column;
    bool numeric = false;
    std::unordered_map<long long, long long> by_number;
    std::unordered_map<std::string, long long> by_text;

    long long id(const std::string& cell) const {
      if (!numeric) {
        auto it = by_text.find(cell.empty() ? "nan" : cell);  // pandas reads an empty text cell as NaN
        return it == by_text.end() ? 0 : it->second;
      }
      long long number;
      if (!whole_number(cell, &number)) return 0;
      auto it = by_number.find(number);
      return it == by_number.end() ? 0 : it->second;
    }
  };

  long long domain_id(const std::string& cell, int64_t line) const {
    long long number;
    auto it = domains_.find(whole_number(cell, &number) ? std::to_string(number) : cell);
    if (it == domains_.end())
      throw std::runtime_error("line " + std::to_string(line) + ": domain value '" + cell + "' of column '" +
                               domain_column_ + "' is outside the domain mapping");
    return it->second;
  }

  std::string domain_column_, prepare_;
  std::vector<Vocabulary> vocabularies_;
  std::vector<std::string> dense_;
  std::map<std::string, long long> domains_;
};

// Rows [start, start + count) of the inputs, on the package's device.
std::vector<torch::Tensor> rows_slice(const std::vector<torch::Tensor>& inputs, int64_t start, int64_t count,
                                      const torch::Device& device) {
  std::vector<torch::Tensor> out;
  for (const auto& t : inputs) out.push_back(t.narrow(0, start, count).contiguous().to(device));
  return out;
}

// CALLS timed calls of `batch` rows (the rows repeated as needed); prints "p50_us p99_us".
void time_calls(torch::inductor::AOTIModelPackageLoader& loader, const std::vector<torch::Tensor>& inputs,
                int64_t batch, int calls, const torch::Device& device) {
  const int64_t n = inputs[0].size(0);
  auto index = torch::arange(batch, torch::kInt64).remainder(n);
  std::vector<torch::Tensor> call;
  for (const auto& t : inputs) call.push_back(t.index_select(0, index).to(device));
  auto run = [&] {
    loader.run(call);
    if (device.is_cuda()) torch::cuda::synchronize();  // the call ends when its kernels have run
  };
  for (int i = 0; i < std::max(10, calls / 10); ++i) run();  // warm-up
  std::vector<double> us;
  for (int i = 0; i < calls; ++i) {
    auto start = std::chrono::steady_clock::now();
    run();
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(us.begin(), us.end());
  auto at = [&](double q) { return us[std::min(us.size() - 1, static_cast<size_t>(q * us.size()))]; };
  std::printf("%.2f %.2f\n", at(0.5), at(0.99));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PACKAGE ROWS.csv [--batch N] [--time CALLS]\n", argv[0]);
    return 2;
  }
  int64_t batch = 0;
  int calls = 0;
  for (int i = 3; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    if (flag == "--batch") batch = std::atoll(argv[i + 1]);
    else if (flag == "--time") calls = std::atoi(argv[i + 1]);
    else return std::fprintf(stderr, "unknown option %s\n", argv[i]), 2;
  }
  try {
    torch::NoGradGuard no_grad;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    auto metadata = loader.get_metadata();
    auto document = metadata.find("hamur_fast.serving");
    if (document == metadata.end())
      throw std::runtime_error(std::string(argv[1]) + " has no hamur_fast.serving metadata: not a whole-model export");
    Encoder encoder(document->second);
    // "cpu" or "cuda": what the package was compiled for (hamur-fast export --device).
    const torch::Device device(metadata.count("AOTI_DEVICE_KEY") ? metadata["AOTI_DEVICE_KEY"] : "cpu");
    auto inputs = encoder.encode(read_csv(argv[2]));
    const int64_t n = inputs[0].size(0);
    if (calls > 0) {
      time_calls(loader, inputs, batch > 0 ? batch : n, calls, device);
      return 0;
    }
    const int64_t step = batch > 0 ? batch : n;
    for (int64_t start = 0; start < n; start += step) {
      auto probability = loader.run(rows_slice(inputs, start, std::min(step, n - start), device))[0].cpu();
      auto p = probability.accessor<float, 1>();
      for (int64_t i = 0; i < p.size(0); ++i) std::printf("%.9g\n", p[i]);
    }
  } catch (const std::exception& err) {
    std::fprintf(stderr, "hamur_serve: error: %s\n", err.what());
    return 1;
  }
  return 0;
}
