// limoe/data/tokenizer.hpp: the Tokenizer concept and a word-level tokenizer.
//
// A tokenizer maps a text to exactly `text_len()` ids (spec section 1: text length 16 by default).
//
// WordTokenizer:
//  - Words: the text is lowercased (ASCII) and split on every byte that is not an ASCII letter or digit; bytes
//    >= 0x80 count as letters, so UTF-8 words stay whole. "A T-shirt, size 42!" -> [a, t, shirt, size, 42].
//  - Special ids: 0 = PAD "<pad>", 1 = UNK "<unk>" (a word not in the vocabulary), 2 = EOS "<eos>". Words take ids
//    3, 4, ... in order of decreasing corpus frequency (ties alphabetical), so a vocabulary is a pure function of
//    its corpus.
//  - Sticky EOS: the words' ids, then EOS right after the last word, then PAD to the end. A text longer than
//    T - 1 words keeps its first T - 1 words and EOS still takes the last slot: every encoding holds exactly one
//    EOS, at eos_position() = min(#words, T - 1). (The model's `last` text pooling should read that position,
//    which is the last non-PAD one.) An empty text is [EOS, PAD, ...].
//  - Serialised as a JSON string (to_json / from_json); a checkpoint stores it in the safetensors `__metadata__`
//    under the key "tokenizer".
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"

namespace limoe::data {

// Whether s is well-formed UTF-8 (RFC 3629: shortest forms only, no surrogates, nothing above U+10FFFF). Texts
// must be: a vocabulary is stored as JSON in a checkpoint.
inline bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) { ++i; continue; }
    int n;
    unsigned lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) n = 1;
    else if (c >= 0xE0 && c <= 0xEF) n = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) n = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return false;
    if (i + static_cast<std::size_t>(n) >= s.size()) return false;  // cut short
    for (int k = 1; k <= n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return false;
    }
    i += static_cast<std::size_t>(n) + 1;
  }
  return true;
}

template <class T>
concept Tokenizer = requires(const T& t, std::string_view s) {
  { t.encode(s) } -> std::same_as<std::vector<std::int32_t>>;
  { t.vocab_size() } -> std::convertible_to<index_t>;
  { t.text_len() } -> std::convertible_to<index_t>;
};

class WordTokenizer {
 public:
  static constexpr std::int32_t kPad = 0;
  static constexpr std::int32_t kUnk = 1;
  static constexpr std::int32_t kEos = 2;
  static constexpr std::int32_t kNumSpecial = 3;

  // An empty vocabulary (every word UNK); build() or from_json() make a useful one.
  explicit WordTokenizer(index_t text_len = 16) : text_len_(text_len) {
    LIMOE_CHECK(text_len >= 1, "WordTokenizer: text_len must be >= 1, got ", text_len);
    words_ = {"<pad>", "<unk>", "<eos>"};
  }

  // Builds a vocabulary from `corpus`: words seen at least `min_count` times, the `max_vocab` most frequent
  // (0 = no limit; max_vocab counts the 3 special ids too).
  template <class Range>
  static WordTokenizer build(const Range& corpus, index_t text_len = 16, index_t min_count = 1,
                             index_t max_vocab = 0) {
    LIMOE_CHECK(max_vocab == 0 || max_vocab > kNumSpecial, "WordTokenizer::build: max_vocab must be 0 or > ",
                kNumSpecial, ", got ", max_vocab);
    std::map<std::string, index_t> counts;
    for (const auto& text : corpus) {
      LIMOE_CHECK(valid_utf8(text), "WordTokenizer::build: a text of the corpus is not valid UTF-8 (texts are UTF-8)");
      for (auto& w : split(std::string_view(text))) ++counts[w];
    }
    std::vector<std::pair<std::string, index_t>> ranked(counts.begin(), counts.end());  // alphabetical
    std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
    WordTokenizer t(text_len);
    for (const auto& [w, c] : ranked) {
      if (c < min_count) break;
      if (max_vocab > 0 && t.vocab_size() >= max_vocab) break;
      t.add_word(w);
    }
    return t;
  }

  // Lowercased words of `text` (the rule in the header comment).
  static std::vector<std::string> split(std::string_view text) {
    std::vector<std::string> out;
    std::string cur;
    for (char ch : text) {
      const auto u = static_cast<unsigned char>(ch);
      const bool word = (u >= '0' && u <= '9') || (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || u >= 0x80;
      if (word) {
        cur.push_back(u >= 'A' && u <= 'Z' ? static_cast<char>(u - 'A' + 'a') : ch);
      } else if (!cur.empty()) {
        out.push_back(std::move(cur));
        cur.clear();
      }
    }
    if (!cur.empty()) out.push_back(std::move(cur));
    return out;
  }

  index_t text_len() const { return text_len_; }
  index_t vocab_size() const { return static_cast<index_t>(words_.size()); }
  const std::vector<std::string>& words() const { return words_; }  // id -> word (specials first)

  std::int32_t id(std::string_view word) const {
    auto it = index_.find(std::string(word));
    return it == index_.end() ? kUnk : it->second;
  }
  const std::string& word(std::int32_t id) const {
    LIMOE_CHECK(id >= 0 && id < vocab_size(), "WordTokenizer: id ", id, " out of range 0..", vocab_size() - 1);
    return words_[static_cast<std::size_t>(id)];
  }

  // Exactly text_len() ids: words, EOS, PAD... (sticky EOS, see the header comment).
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> ids(static_cast<std::size_t>(text_len_), kPad);
    const auto words = split(text);
    const std::size_t keep = std::min(words.size(), static_cast<std::size_t>(text_len_ - 1));
    for (std::size_t k = 0; k < keep; ++k) ids[k] = id(words[k]);
    ids[keep] = kEos;
    return ids;
  }
  // Writes the encoding into out[0 .. text_len()).
  void encode_into(std::string_view text, std::int32_t* out) const {
    const auto ids = encode(text);
    std::copy(ids.begin(), ids.end(), out);
  }

  // The position of EOS in an encoding (the last non-PAD position); -1 when there is none.
  static index_t eos_position(const std::vector<std::int32_t>& ids) {
    for (std::size_t k = 0; k < ids.size(); ++k)
      if (ids[k] == kEos) return static_cast<index_t>(k);
    return -1;
  }

  // Words joined by single spaces up to the first EOS; PAD skipped, UNK shown as "<unk>".
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string s;
    for (std::int32_t i : ids) {
      if (i == kEos) break;
      if (i == kPad) continue;
      if (!s.empty()) s += ' ';
      s += word(i);
    }
    return s;
  }

  std::string to_json() const {
    nlohmann::json j;
    j["type"] = "word";
    j["version"] = 1;
    j["text_len"] = text_len_;
    j["lowercase"] = true;
    j["split"] = "non-alphanumeric ASCII";
    j["pad_id"] = kPad;
    j["unk_id"] = kUnk;
    j["eos_id"] = kEos;
    j["eos"] = "sticky";
    j["vocab"] = words_;
    return j.dump();
  }

  static WordTokenizer from_json(const std::string& text) {
    // The JSON reader would stop at a NUL as at the end of its input, ignoring what follows.
    LIMOE_CHECK(text.find('\0') == std::string::npos, "WordTokenizer::from_json: not valid JSON (a NUL character)");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      fail("WordTokenizer::from_json: not valid JSON: ", e.what());
    }
    try {
      LIMOE_CHECK(j.value("type", std::string()) == "word", "WordTokenizer::from_json: \"type\" must be \"word\", got ",
                  j.value("type", std::string("(missing)")));
      LIMOE_CHECK(j.value("version", 0) == 1, "WordTokenizer::from_json: unsupported version ", j.value("version", 0));
      const index_t text_len = j.at("text_len").get<index_t>();
      LIMOE_CHECK(text_len >= 1 && text_len <= (index_t{1} << 16), "WordTokenizer::from_json: text_len ", text_len,
                  " is outside [1, 65536] (a model's text_len)");
      WordTokenizer t(text_len);
      const auto vocab = j.at("vocab").get<std::vector<std::string>>();
      LIMOE_CHECK(vocab.size() >= kNumSpecial && vocab[0] == "<pad>" && vocab[1] == "<unk>" && vocab[2] == "<eos>",
                  "WordTokenizer::from_json: the vocabulary must start with <pad>, <unk>, <eos>");
      for (std::size_t k = kNumSpecial; k < vocab.size(); ++k) {
        LIMOE_CHECK(!t.index_.count(vocab[k]), "WordTokenizer::from_json: duplicate word \"", vocab[k], "\"");
        t.add_word(vocab[k]);
      }
      return t;
    } catch (const nlohmann::json::exception& e) {
      fail("WordTokenizer::from_json: malformed tokenizer JSON: ", e.what());
    }
  }

  friend bool operator==(const WordTokenizer& a, const WordTokenizer& b) {
    return a.text_len_ == b.text_len_ && a.words_ == b.words_;
  }

 private:
  void add_word(const std::string& w) {
    index_[w] = static_cast<std::int32_t>(words_.size());
    words_.push_back(w);
  }

  index_t text_len_;
  std::vector<std::string> words_;                       // id -> word
  std::unordered_map<std::string, std::int32_t> index_;  // word -> id (specials are not looked up)
};

static_assert(Tokenizer<WordTokenizer>);

}  // namespace limoe::data
