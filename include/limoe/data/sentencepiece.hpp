// limoe/data/sentencepiece.hpp: a SentencePiece tokenizer (the subword tokenizer of the paper's text side)
// behind the same Tokenizer concept as the word-level one (data/tokenizer.hpp). Optional component: it needs
// Debian's libsentencepiece-dev and the CMake target limoe::sentencepiece (defined when the library is found);
// <limoe/limoe.hpp> does not include it.
//
// Encoding, as WordTokenizer's: exactly text_len() ids, the pieces' ids, then EOS right after the last piece,
// then PAD to the end ("sticky EOS"); a text of more than T - 1 pieces keeps its first T - 1 and EOS takes the
// last slot, so every encoding holds exactly one EOS and the `last` text pooling reads it. The model must
// define a pad and an EOS piece (train it with e.g. --pad_id=0 --unk_id=1 --eos_id=2 --bos_id=-1, the word
// tokenizer's layout); a model without them is rejected when loaded, naming the missing piece.
//
// Serialised as the model's own bytes (serialized() / from_serialized()), so a checkpoint can carry it as the
// word tokenizer's JSON is carried.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <sentencepiece_processor.h>

#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/data/tokenizer.hpp"

namespace limoe::data {

class SentencePieceTokenizer {
 public:
  // From a .model file written by the SentencePiece trainer.
  static SentencePieceTokenizer load(const std::string& path, index_t text_len = 16) {
    auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto st = sp->Load(path);
    LIMOE_CHECK(st.ok(), "SentencePieceTokenizer: cannot load the model \"", path, "\": ", st.ToString());
    return SentencePieceTokenizer(std::move(sp), text_len, path);
  }
  // From the bytes of a model (as serialized() returns them).
  static SentencePieceTokenizer from_serialized(std::string_view bytes, index_t text_len = 16) {
    auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
    const auto st = sp->LoadFromSerializedProto(bytes);
    LIMOE_CHECK(st.ok(), "SentencePieceTokenizer: the ", bytes.size(), " bytes given are not a SentencePiece model: ",
                st.ToString());
    return SentencePieceTokenizer(std::move(sp), text_len, "<serialized>");
  }

  index_t text_len() const { return text_len_; }
  index_t vocab_size() const { return static_cast<index_t>(sp_->GetPieceSize()); }
  std::int32_t pad_id() const { return pad_; }
  std::int32_t eos_id() const { return eos_; }
  std::int32_t unk_id() const { return sp_->unk_id(); }
  const std::string& piece(std::int32_t id) const {
    LIMOE_CHECK(id >= 0 && id < vocab_size(), "SentencePieceTokenizer: id ", id, " out of range 0..", vocab_size() - 1);
    return sp_->IdToPiece(id);
  }

  // Exactly text_len() ids: pieces, EOS, PAD... (see the top of this file).
  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<std::int32_t> out(static_cast<std::size_t>(text_len_));
    encode_into(text, out.data());
    return out;
  }
  void encode_into(std::string_view text, std::int32_t* out) const {
    std::vector<int> pieces;
    const auto st = sp_->Encode(text, &pieces);
    LIMOE_CHECK(st.ok(), "SentencePieceTokenizer: cannot encode the text: ", st.ToString());
    const auto n = std::min<index_t>(static_cast<index_t>(pieces.size()), text_len_ - 1);
    for (index_t i = 0; i < n; ++i) out[i] = static_cast<std::int32_t>(pieces[static_cast<std::size_t>(i)]);
    out[n] = eos_;
    for (index_t i = n + 1; i < text_len_; ++i) out[i] = pad_;
  }
  // The text of the pieces before the EOS.
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::vector<int> pieces;
    for (std::int32_t id : ids) {
      if (id == eos_) break;
      if (id == pad_) continue;
      LIMOE_CHECK(id >= 0 && id < vocab_size(), "SentencePieceTokenizer::decode: id ", id, " out of range 0..",
                  vocab_size() - 1);
      pieces.push_back(id);
    }
    std::string text;
    const auto st = sp_->Decode(pieces, &text);
    LIMOE_CHECK(st.ok(), "SentencePieceTokenizer: cannot decode: ", st.ToString());
    return text;
  }
  std::string serialized() const { return sp_->serialized_model_proto(); }

 private:
  SentencePieceTokenizer(std::shared_ptr<sentencepiece::SentencePieceProcessor> sp, index_t text_len,
                         const std::string& what)
      : sp_(std::move(sp)), text_len_(text_len), pad_(sp_->pad_id()), eos_(sp_->eos_id()) {
    LIMOE_CHECK(text_len >= 1, "SentencePieceTokenizer: text_len must be >= 1, got ", text_len);
    LIMOE_CHECK(pad_ >= 0, "SentencePieceTokenizer: the model ", what, " defines no pad piece; train it with "
                "--pad_id=0 (limoe pads every text to text_len ids)");
    LIMOE_CHECK(eos_ >= 0, "SentencePieceTokenizer: the model ", what, " defines no EOS piece; train it with "
                "--eos_id=2 (limoe ends every text with EOS, which the `last` pooling reads)");
  }

  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;  // immutable once loaded: copies share it
  index_t text_len_;
  std::int32_t pad_, eos_;
};

static_assert(Tokenizer<SentencePieceTokenizer>);

}  // namespace limoe::data
