// Byte-level tokenizer (see tokenizer.h for the id layout and the end-of-document marker).
#include "framework/tokenizer.h"

#include "framework/error.h"

namespace loom {
namespace {

template <typename Id>
std::string decode_ids(std::span<const Id> ids, std::string_view end_of_document_text) {
  std::string text;
  text.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const Id id = ids[i];
    if (id >= 0 && id < 256) {
      text.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    } else {
      LOOM_CHECK(id == ByteTokenizer::kEndOfDocument)
          << "ByteTokenizer::decode: id " << static_cast<int64_t>(id) << " at position " << i
          << " is outside the vocabulary [0, " << ByteTokenizer::kVocabSize << ")";
      text.append(end_of_document_text);
    }
  }
  return text;
}

}  // namespace

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  encode_append(text, ids);
  return ids;
}

void ByteTokenizer::encode_append(std::string_view text, std::vector<int32_t>& ids) const {
  ids.reserve(ids.size() + text.size());
  for (char c : text) ids.push_back(static_cast<int32_t>(static_cast<unsigned char>(c)));
}

std::string ByteTokenizer::decode(std::span<const int32_t> ids, std::string_view end_of_document_text) const {
  return decode_ids(ids, end_of_document_text);
}

std::string ByteTokenizer::decode(std::span<const int64_t> ids, std::string_view end_of_document_text) const {
  return decode_ids(ids, end_of_document_text);
}

}  // namespace loom
