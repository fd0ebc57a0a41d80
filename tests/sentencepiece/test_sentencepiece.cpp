// The SentencePiece tokenizer (data/sentencepiece.hpp) on a small model trained here with the SentencePiece
// trainer: the sticky-EOS layout, truncation, round trips, serialisation, the error paths, and the model
// embedding texts it encoded.
#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limoe/data/loader.hpp>
#include <limoe/data/sentencepiece.hpp>
#include <limoe/model/model.hpp>
#include <sentencepiece_trainer.h>
#include <string>
#include <vector>

#include <unistd.h>

using namespace limoe;
using data::SentencePieceTokenizer;

namespace {

const std::vector<std::string> kColours = {"red", "blue", "green", "black", "white", "yellow"};
const std::vector<std::string> kItems = {"shirt", "sandal", "sneaker", "trouser", "pullover", "dress", "coat", "bag"};

std::vector<std::string> corpus() {
  std::vector<std::string> lines;
  for (const auto& c : kColours)
    for (const auto& i : kItems) {
      lines.push_back("a photo of a " + c + " " + i);
      lines.push_back("a small " + c + " " + i + " left of a large " + i);
      lines.push_back("the " + i + " is " + c);
    }
  return lines;
}

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string name = "limoe_spm_";
    name += std::to_string(reinterpret_cast<std::uintptr_t>(this));
    name += '_';
    name += std::to_string(::getpid());
    path = std::filesystem::temp_directory_path() / name;
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

// Trains a unigram model of `vocab` pieces on corpus(); returns the .model path.
std::string train(const TempDir& dir, int vocab, const std::string& extra) {
  const auto input = dir.path / "corpus.txt";
  {
    std::ofstream f(input);
    for (const auto& l : corpus()) f << l << "\n";
  }
  std::string stem = std::to_string(vocab);
  stem.insert(stem.begin(), 'm');
  const auto prefix = dir.path / stem;
  std::string args = "--input=";
  args += input.string();
  args += " --model_prefix=";
  args += prefix.string();
  args += " --vocab_size=";
  args += std::to_string(vocab);
  args += " --model_type=unigram --character_coverage=1.0 --minloglevel=2 ";
  args += extra;
  const auto st = sentencepiece::SentencePieceTrainer::Train(args);
  REQUIRE_MESSAGE(st.ok(), st.ToString());
  return prefix.string() + ".model";
}

const std::string kLayout = "--pad_id=0 --unk_id=1 --eos_id=2 --bos_id=-1";

}  // namespace

TEST_CASE("sentencepiece: a trained model gives text_len ids: pieces, one EOS, then PAD; decode inverts encode") {
  TempDir dir;
  const auto tok = SentencePieceTokenizer::load(train(dir, 40, kLayout), 16);
  CHECK(tok.vocab_size() == 40);
  CHECK(tok.pad_id() == 0);
  CHECK(tok.eos_id() == 2);
  CHECK(tok.unk_id() == 1);
  CHECK(tok.text_len() == 16);
  for (const auto& text : corpus()) {
    CAPTURE(text);
    const auto ids = tok.encode(text);
    REQUIRE(ids.size() == 16);
    int eos = 0;
    std::size_t eos_at = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      CHECK(ids[i] >= 0);
      CHECK(ids[i] < tok.vocab_size());
      if (ids[i] == tok.eos_id()) ++eos, eos_at = i;
    }
    REQUIRE(eos == 1);
    for (std::size_t i = eos_at + 1; i < ids.size(); ++i) CHECK(ids[i] == tok.pad_id());
    for (std::size_t i = 0; i < eos_at; ++i) CHECK(ids[i] != tok.pad_id());
    // The pieces before EOS spell the text ("\u2581" marks a word start).
    std::string spelled;
    for (std::size_t i = 0; i < eos_at; ++i) spelled += tok.piece(ids[i]);
    std::string expect = "\xe2\x96\x81" + text;
    for (std::size_t p = 0; (p = expect.find(' ', p)) != std::string::npos;) expect.replace(p, 1, "\xe2\x96\x81");
    if (eos_at < 15) CHECK(spelled == expect);
    if (eos_at < 15) CHECK(tok.decode(ids) == text);
  }
}

TEST_CASE("sentencepiece: a long text keeps its first T-1 pieces and EOS takes the last slot") {
  TempDir dir;
  const auto tok = SentencePieceTokenizer::load(train(dir, 40, kLayout), 6);
  const auto ids = tok.encode("a small red shirt left of a large blue coat and a green bag");
  REQUIRE(ids.size() == 6);
  CHECK(ids[5] == tok.eos_id());
  for (int i = 0; i < 5; ++i) CHECK(ids[static_cast<std::size_t>(i)] != tok.eos_id());
  // An empty text is [EOS, PAD, ...].
  const auto e = tok.encode("");
  CHECK(e[0] == tok.eos_id());
  for (std::size_t i = 1; i < e.size(); ++i) CHECK(e[i] == tok.pad_id());
}

TEST_CASE("sentencepiece: serialized bytes load back to the same tokenizer; bad input is named") {
  TempDir dir;
  const auto path = train(dir, 40, kLayout);
  const auto a = SentencePieceTokenizer::load(path, 12);
  const auto b = SentencePieceTokenizer::from_serialized(a.serialized(), 12);
  for (const auto& text : corpus()) CHECK(a.encode(text) == b.encode(text));

  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  const auto missing = (dir.path / "nope.model").string();
  CHECK(message([&] { (void)SentencePieceTokenizer::load(missing); }).find(missing) != std::string::npos);
  CHECK(message([&] { (void)SentencePieceTokenizer::from_serialized("not a model at all"); })
            .find("not a SentencePiece model") != std::string::npos);
  CHECK(message([&] { (void)SentencePieceTokenizer::load(path, 0); }).find("text_len") != std::string::npos);
  // A model trained without a pad piece cannot pad to text_len: rejected, naming the piece.
  TempDir dir2;
  const auto no_pad = train(dir2, 40, "--pad_id=-1 --unk_id=0 --bos_id=1 --eos_id=2");
  CHECK(message([&] { (void)SentencePieceTokenizer::load(no_pad); }).find("no pad piece") != std::string::npos);
  CHECK(message([&] { (void)a.decode({1000}); }).find("out of range") != std::string::npos);
}

TEST_CASE("sentencepiece: a model embeds the texts it encodes; `last` pooling reads the EOS") {
  TempDir dir;
  const auto tok = SentencePieceTokenizer::load(train(dir, 40, kLayout), 8);
  ModelConfig c;
  c.image_size = {8, 8};
  c.channels = 1;
  c.patch = 4;
  c.width = 16;
  c.depth = 2;
  c.heads = 2;
  c.mlp_dim = 32;
  c.experts = 4;
  c.moe_blocks = {1};
  c.proj_dim = 8;
  c.vocab_size = static_cast<int>(tok.vocab_size());
  c.text_len = static_cast<int>(tok.text_len());
  c.pad_id = tok.pad_id();
  c.text_mask = true;
  c.pool_txt = Pooling::Last;
  Limoe<float> m(c);
  m.init(1);
  const std::vector<std::string> texts = {"a photo of a red shirt", "a photo of a red shirt", "the bag is blue"};
  const auto ids = data::encode_texts(tok, texts);
  const auto out = m.forward(CView<float>{}, ids.cview(), Mode::Eval);
  REQUIRE(out.txt_emb.shape() == (Shape{3, 8}));
  double same = 0, differ = 0;
  for (index_t p = 0; p < 8; ++p) {
    CHECK(std::isfinite(out.txt_emb[p]));
    same = std::max(same, std::abs(static_cast<double>(out.txt_emb[p] - out.txt_emb[8 + p])));
    differ = std::max(differ, std::abs(static_cast<double>(out.txt_emb[p] - out.txt_emb[16 + p])));
  }
  CHECK(same == 0);     // the same text, the same embedding
  CHECK(differ > 1e-3);  // another text, another embedding
}
