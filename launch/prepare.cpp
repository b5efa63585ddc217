// loom-prepare: text files (plain or gzip) → byte-tokenized llm.c shards for training.
//
//   loom-prepare --out data/demo [--val-fraction 0.05] [--shard-tokens N] [--name demo] FILES...
//   loom-prepare --out data/demo --demo          # the Jargon File (Debian package jargon-text)
//
// Writes DIR/<name>_train_000000.bin ... and DIR/<name>_val_000000.bin ...; a recipe then
// points data.train at "DIR/<name>_train_*.bin" and data.val at "DIR/<name>_val_*.bin".
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "framework/data.h"
#include "framework/tokenizer.h"

int main(int argc, char** argv) {
  CLI::App app{"loom-prepare: tokenize text files (byte-level, vocab 257) into llm.c token shards"};
  std::string out_dir;
  std::string name = "demo";
  double val_fraction = 0.05;
  int64_t shard_tokens = 100'000'000;
  int64_t document_bytes = 8192;
  bool demo = false;
  std::vector<std::string> files;
  app.add_option("--out", out_dir, "output directory (created if missing)")->required();
  app.add_option("--name", name, "shard name prefix")->capture_default_str();
  app.add_option("--val-fraction", val_fraction, "fraction of documents (the last ones) kept for validation")
      ->capture_default_str();
  app.add_option("--shard-tokens", shard_tokens, "maximum tokens per shard")->capture_default_str();
  app.add_option("--document-bytes", document_bytes, "target document size: paragraphs are grouped up to it")
      ->capture_default_str();
  app.add_flag("--demo", demo, "add the Jargon File (Debian package jargon-text) to the inputs");
  app.add_option("files", files, "text files (.gz read through gzip -dc)");
  CLI11_PARSE(app, argc, argv);

  try {
    if (demo) files.insert(files.begin(), loom::find_demo_corpus());
    if (files.empty()) {
      std::fprintf(stderr, "loom-prepare: no input files (give FILES... or --demo)\n%s", app.help().c_str());
      return 2;
    }
    loom::PreparedCorpus corpus =
        loom::prepare_text_corpus(files, out_dir, name, val_fraction, shard_tokens, document_bytes);
    std::printf("read %zu file(s), %lld bytes; byte tokenizer, vocab %lld, end-of-document id %d\n", files.size(),
                static_cast<long long>(corpus.input_bytes), static_cast<long long>(loom::ByteTokenizer::kVocabSize),
                loom::ByteTokenizer::kEndOfDocument);
    std::printf("train: %lld documents, %lld tokens, %zu shard(s)\n", static_cast<long long>(corpus.train_documents),
                static_cast<long long>(corpus.train_tokens), corpus.train_shards.size());
    for (const auto& p : corpus.train_shards) std::printf("  %s\n", p.c_str());
    std::printf("val:   %lld documents, %lld tokens, %zu shard(s)\n", static_cast<long long>(corpus.val_documents),
                static_cast<long long>(corpus.val_tokens), corpus.val_shards.size());
    for (const auto& p : corpus.val_shards) std::printf("  %s\n", p.c_str());
    for (const auto& p : corpus.removed_stale) std::printf("removed stale shard %s\n", p.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "loom-prepare: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
