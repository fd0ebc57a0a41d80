// Word-level tokenizer: splitting, vocabulary order, sticky EOS, padding, truncation, UNK, JSON round trip.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "limoe/data/tokenizer.hpp"

using limoe::data::WordTokenizer;
using Ids = std::vector<std::int32_t>;

TEST_CASE("split lowercases and cuts on non-alphanumerics") {
  CHECK(WordTokenizer::split("A T-shirt, size 42!") == std::vector<std::string>{"a", "t", "shirt", "size", "42"});
  CHECK(WordTokenizer::split("  ").empty());
  CHECK(WordTokenizer::split("caf\xc3\xa9 au lait") == std::vector<std::string>{"caf\xc3\xa9", "au", "lait"});
}

TEST_CASE("vocabulary: specials first, then by frequency, ties alphabetical") {
  const std::vector<std::string> corpus = {"b a c", "a b", "a", "d"};
  const auto t = WordTokenizer::build(corpus, 6);
  CHECK(t.vocab_size() == 7);
  CHECK(t.words() == std::vector<std::string>{"<pad>", "<unk>", "<eos>", "a", "b", "c", "d"});
  CHECK(WordTokenizer::build(corpus, 6, 2).vocab_size() == 5);         // min_count 2: a, b
  CHECK(WordTokenizer::build(corpus, 6, 1, 4).words().back() == "a");  // max_vocab 4 counts the specials
}

TEST_CASE("encode: sticky EOS, padding, truncation, unknown words") {
  const auto t = WordTokenizer::build(std::vector<std::string>{"a photo of a sneaker", "a bag"}, 6);
  const auto a = t.id("a"), photo = t.id("photo"), of = t.id("of"), sneaker = t.id("sneaker");
  CHECK(a == 3);  // most frequent word
  CHECK(t.encode("A photo of a sneaker.") == Ids{a, photo, of, a, sneaker, WordTokenizer::kEos});
  CHECK(t.encode("a sneaker") == Ids{a, sneaker, 2, 0, 0, 0});
  CHECK(t.encode("") == Ids{2, 0, 0, 0, 0, 0});
  CHECK(t.encode("a zebra") == Ids{a, WordTokenizer::kUnk, 2, 0, 0, 0});
  // Longer than T - 1 words: the first T - 1 are kept and EOS takes the last slot.
  const auto long_ids = t.encode("a photo of a sneaker of a bag");
  CHECK(long_ids == Ids{a, photo, of, a, sneaker, 2});
  CHECK(WordTokenizer::eos_position(long_ids) == 5);
  CHECK(WordTokenizer::eos_position(t.encode("a bag")) == 2);
  for (const char* s : {"", "a", "a photo of a sneaker of a bag again and again"}) {
    const auto ids = t.encode(s);
    CHECK(ids.size() == 6);
    CHECK(std::count(ids.begin(), ids.end(), WordTokenizer::kEos) == 1);
  }
  CHECK(t.decode(t.encode("A sneaker, a zebra")) == "a sneaker a <unk>");
  WordTokenizer one(1);
  CHECK(one.encode("anything at all") == Ids{2});
}

TEST_CASE("JSON round trip and malformed JSON") {
  const auto t = WordTokenizer::build(std::vector<std::string>{"a small red circle on the left", "a big box"}, 16);
  const std::string js = t.to_json();
  const auto u = WordTokenizer::from_json(js);
  CHECK(u == t);
  CHECK(u.text_len() == 16);
  CHECK(u.encode("a red box on the right") == t.encode("a red box on the right"));
  CHECK_THROWS_AS(WordTokenizer::from_json("{not json"), limoe::Error);
  // A NUL would end the JSON reader's input, the rest unread; a text_len no model has is refused before use.
  CHECK_THROWS_WITH_AS(WordTokenizer::from_json(js + std::string(1, '\0') + "garbage"), doctest::Contains("NUL"), limoe::Error);
  CHECK_THROWS_WITH_AS(WordTokenizer::from_json(R"({"type":"word","version":1,"text_len":1099511627776,"vocab":["<pad>","<unk>","<eos>"]})"),
                       doctest::Contains("outside [1, 65536]"), limoe::Error);
  CHECK_THROWS_WITH_AS(WordTokenizer::from_json(R"({"type":"sentencepiece","version":1})"),
                       doctest::Contains("\"type\" must be \"word\""), limoe::Error);
  CHECK_THROWS_AS(WordTokenizer::from_json(R"({"type":"word","version":1,"text_len":4,"vocab":["x"]})"),
                  limoe::Error);
}
