// Byte-level tokenizer: ids 0-255 are the bytes of the text, id 256 marks the end of a
// document (vocabulary 257). Any byte string round-trips, UTF-8 or not, so decode(encode(s))
// == s exactly. encode never emits 256 (the text "<|endoftext|>" is just its 13 bytes); the
// data preparation appends it between documents. decode renders 256 as a visible marker,
// "<|endoftext|>" by default (GPT-2's spelling), so samples show where documents end.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace loom {

class ByteTokenizer {
 public:
  static constexpr int32_t kEndOfDocument = 256;
  static constexpr int64_t kVocabSize = 257;
  static constexpr std::string_view kEndOfDocumentText = "<|endoftext|>";

  int64_t vocab_size() const { return kVocabSize; }
  int32_t end_of_document() const { return kEndOfDocument; }

  std::vector<int32_t> encode(std::string_view text) const;
  void encode_append(std::string_view text, std::vector<int32_t>& ids) const;  // appends to ids
  // Throws naming the id and its position when an id is outside [0, 257).
  std::string decode(std::span<const int32_t> ids, std::string_view end_of_document_text = kEndOfDocumentText) const;
  std::string decode(std::span<const int64_t> ids, std::string_view end_of_document_text = kEndOfDocumentText) const;
};

}  // namespace loom
