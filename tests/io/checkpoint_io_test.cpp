// HDF5 tensor files (every dtype bit for bit, scalar and zero-sized shapes,
// awkward names, the attribute JSON, corrupt and truncated files) and the
// checkpoint directory lifecycle: commits, interrupted and broken checkpoints
// that find_latest_checkpoint must skip, pruning, replacing a step.
#include <gtest/gtest.h>
#include <hdf5.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "framework/checkpoint_io.h"
#include "tests/testing.h"

namespace loom {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;

std::string raw_bytes(const Tensor& t) {
  Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.raw_data()), c.nbytes());
}

void expect_same_tensor(const Tensor& actual, const Tensor& expected, const std::string& name) {
  EXPECT_EQ(actual.dtype(), expected.dtype()) << name;
  EXPECT_EQ(actual.shape(), expected.shape()) << name;
  EXPECT_TRUE(actual.device().is_cpu()) << name;
  EXPECT_TRUE(raw_bytes(actual) == raw_bytes(expected)) << name << ": bytes differ";  // bit for bit, NaN included
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}
std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Runs `fn`, expecting a loom::Error whose message contains every `needle`.
template <typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    for (const auto& needle : needles)
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "'" << needle << "' not in: " << e.what();
  }
}

std::map<std::string, Tensor> all_dtype_tensors() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<bf16> b;
  std::vector<f16> h;
  for (float v : {1.0f, -2.5f, 0.0f, -0.0f, inf, -inf, nan, 3.1415926f, 1e-30f, 65504.0f, 1e6f, -7.0f}) {
    b.emplace_back(v);
    h.emplace_back(v);
  }
  std::map<std::string, Tensor> tensors;
  tensors["blocks.0.mixer.q_proj.weight"] = testing::random_tensor({3, 5}, 1);  // f64
  tensors["blocks.0.norm.weight"] = testing::random_tensor({7}, 2).to(DType::f32);
  tensors["bf16.values"] = Tensor::from_vector(b, {3, 4});
  tensors["f16.values"] = Tensor::from_vector(h, {2, 3, 2});
  tensors["i64"] = Tensor::from_vector(std::vector<int64_t>{std::numeric_limits<int64_t>::min(), -1, 0, 1LL << 62}, {4});
  tensors["i32"] = Tensor::from_vector(std::vector<int32_t>{-2147483647 - 1, -5, 7}, {3, 1});
  tensors["u8"] = Tensor::from_vector(std::vector<uint8_t>{0, 1, 128, 255, 9}, {5});
  tensors["scalar.f32"] = Tensor::scalar(2.75, DType::f32);
  tensors["scalar.i64"] = Tensor::scalar(-9, DType::i64);
  tensors["scalar.bf16"] = Tensor::scalar(0.3, DType::bf16);
  tensors["empty.f32"] = Tensor::empty({0, 3}, DType::f32);
  tensors["empty.bf16"] = Tensor::empty({2, 0, 4}, DType::bf16);
  tensors["odd/name with %2F and spaces"] = Tensor::ones({2}, DType::u8);
  tensors["."] = Tensor::zeros({1}, DType::i32);
  return tensors;
}

TEST(Hdf5, RoundTripEveryDtypeShapeAndName) {
  TempDir dir;
  std::string path = (dir.path() / "t.h5").string();
  std::map<std::string, Tensor> tensors = all_dtype_tensors();
  write_tensors_h5(path, tensors);
  nlohmann::json attributes;
  std::map<std::string, Tensor> back = read_tensors_h5(path, &attributes);
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    ASSERT_TRUE(back.count(name)) << "missing " << name;
    expect_same_tensor(back.at(name), tensor, name);
  }
  EXPECT_EQ(attributes, nlohmann::json::object());
  EXPECT_EQ(back.at("scalar.f32").dim(), 0);
  EXPECT_EQ(back.at("scalar.f32").item(), 2.75);
}

TEST(Hdf5, NonContiguousInputIsStoredByValue) {
  TempDir dir;
  std::string path = (dir.path() / "t.h5").string();
  Tensor base = testing::random_tensor({4, 6}, 3);
  Tensor transposed = base.transpose(0, 1);                 // (6, 4), non-contiguous
  Tensor strided = testing::non_contiguous(base);           // every other slot
  Tensor sliced = base.slice(1, 1, 6, 2).to(DType::f32);    // (4, 3)
  write_tensors_h5(path, {{"t", transposed}, {"s", strided}, {"c", base.slice(1, 1, 6, 2)}, {"f", sliced}});
  auto back = read_tensors_h5(path);
  EXPECT_TENSOR_CLOSE(back.at("t"), transposed, 0, 0);
  EXPECT_TENSOR_CLOSE(back.at("s"), base, 0, 0);
  EXPECT_TENSOR_CLOSE(back.at("c"), base.slice(1, 1, 6, 2), 0, 0);
  EXPECT_EQ(back.at("f").dtype(), DType::f32);
  EXPECT_TRUE(back.at("t").is_contiguous());
}

TEST(Hdf5, AttributesJsonRoundTripIncludingLargeOnes) {
  TempDir dir;
  std::string path = (dir.path() / "t.h5").string();
  nlohmann::json attributes = {{"step", 1234},
                               {"config", {{"model", {{"width", 512}, {"layers", 8}}}, {"lr", 3e-4}}},
                               {"rng", {1u, 2u, 18446744073709551615ull}},
                               {"text", "ünïcödé \"quoted\" \n newline"},
                               {"empty", nlohmann::json::object()}};
  attributes["big"] = std::string(300000, 'x');  // above HDF5's 64 KiB compact attribute limit
  write_tensors_h5(path, {{"w", Tensor::ones({2})}}, attributes);
  nlohmann::json back;
  read_tensors_h5(path, &back);
  EXPECT_EQ(back, attributes);
  // No tensors at all is a valid file too.
  write_tensors_h5(path, {}, {{"only", "attributes"}});
  EXPECT_TRUE(read_tensors_h5(path, &back).empty());
  EXPECT_EQ(back["only"], "attributes");
}

TEST(Hdf5, OverwriteTruncates) {
  TempDir dir;
  std::string path = (dir.path() / "t.h5").string();
  write_tensors_h5(path, {{"a", Tensor::ones({3})}, {"b", Tensor::ones({3})}});
  write_tensors_h5(path, {{"c", Tensor::zeros({2})}});
  auto back = read_tensors_h5(path);
  ASSERT_EQ(back.size(), 1u);
  EXPECT_TRUE(back.count("c"));
}

TEST(Hdf5, DatasetsFromOtherToolsGetAnInferredDtype) {
  TempDir dir;
  std::string path = (dir.path() / "external.h5").string();
  // A file written with plain HDF5 calls, without loom's attributes.
  hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hsize_t dims[2] = {2, 2};
  hid_t space = H5Screate_simple(2, dims, nullptr);
  int16_t values[4] = {-3, 4, 5, -6};
  hid_t dataset = H5Dcreate2(file, "int16", H5T_STD_I16BE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  H5Dwrite(dataset, H5T_NATIVE_INT16, H5S_ALL, H5S_ALL, H5P_DEFAULT, values);
  H5Dclose(dataset);
  H5Sclose(space);
  H5Fclose(file);
  nlohmann::json attributes;
  auto back = read_tensors_h5(path, &attributes);
  EXPECT_EQ(back.at("int16").dtype(), DType::i32);
  EXPECT_EQ(back.at("int16").to_vector<int32_t>(), (std::vector<int32_t>{-3, 4, 5, -6}));
  EXPECT_EQ(attributes, nlohmann::json::object());
}

TEST(Hdf5, MissingCorruptAndTruncatedFilesNameTheFile) {
  TempDir dir;
  std::string missing = (dir.path() / "missing.h5").string();
  expect_error([&] { read_tensors_h5(missing); }, {missing, "does not exist"});

  std::string garbage = (dir.path() / "garbage.h5").string();
  std::string bytes;
  for (int i = 0; i < 5000; ++i) bytes += static_cast<char>((i * 7919 + 13) & 0xff);
  write_text(garbage, bytes);
  expect_error([&] { read_tensors_h5(garbage); }, {garbage, "opening the file"});

  std::string good = (dir.path() / "good.h5").string();
  write_tensors_h5(good, {{"w", testing::random_tensor({64, 64}, 5)}}, {{"a", 1}});
  std::string contents = read_text(good);
  for (size_t keep : {contents.size() / 2, size_t{100}, size_t{0}}) {
    std::string truncated = (dir.path() / ("truncated_" + std::to_string(keep) + ".h5")).string();
    write_text(truncated, contents.substr(0, keep));
    expect_error([&] { read_tensors_h5(truncated); }, {truncated});
  }

  // Garbage over the root group's header, right after the superblock: HDF5's
  // metadata checksum catches it.
  std::string corrupt = (dir.path() / "corrupt.h5").string();
  std::string damaged = contents;
  for (size_t i = 96; i < 160; ++i) damaged[i] = static_cast<char>((i * 37) & 0xff);
  write_text(corrupt, damaged);
  expect_error([&] { read_tensors_h5(corrupt); }, {corrupt, "checksum"});
}

TEST(Hdf5, WriteRejectsUndefinedTensorsAndEmptyNames) {
  TempDir dir;
  std::string path = (dir.path() / "t.h5").string();
  expect_error([&] { write_tensors_h5(path, {{"w", Tensor()}}); }, {path, "'w' is undefined"});
  expect_error([&] { write_tensors_h5(path, {{"", Tensor::ones({1})}}); }, {path, "empty tensor name"});
  expect_error([&] { write_tensors_h5((dir.path() / "no/such/dir/t.h5").string(), {}); }, {"no/such/dir/t.h5"});
}

TEST(Hdf5, CudaTensorsAreCopiedToHost) {
  LOOM_SKIP_WITHOUT_GPU();
  TempDir dir;
  std::string path = (dir.path() / "t.h5").string();
  Tensor host = testing::random_tensor({5, 4}, 8).to(DType::f32);
  Tensor device = host.to(Device::cuda(0));
  write_tensors_h5(path, {{"w", device}, {"wt", device.transpose(0, 1)}, {"b", device.to(DType::bf16)}});
  auto back = read_tensors_h5(path);
  expect_same_tensor(back.at("w"), host, "w");
  expect_same_tensor(back.at("wt"), host.transpose(0, 1).contiguous(), "wt");
  expect_same_tensor(back.at("b"), host.to(DType::bf16), "b");
}

// ---- checkpoint directories ----

TEST(CheckpointDir, Names) {
  EXPECT_EQ(checkpoint_step_name(0), "step_00000000");
  EXPECT_EQ(checkpoint_step_name(100), "step_00000100");
  EXPECT_EQ(checkpoint_step_name(123456789), "step_123456789");
  EXPECT_EQ(parse_checkpoint_step_name("step_00000100"), 100);
  EXPECT_EQ(parse_checkpoint_step_name("step_123456789"), 123456789);
  EXPECT_EQ(parse_checkpoint_step_name("step_00000100.tmp"), std::nullopt);
  EXPECT_EQ(parse_checkpoint_step_name("step_100"), std::nullopt);
  EXPECT_EQ(parse_checkpoint_step_name("step_0000010x"), std::nullopt);
  EXPECT_EQ(parse_checkpoint_step_name("export"), std::nullopt);
  EXPECT_EQ(checkpoint_rank_file(3), "rank_00000003.h5");
  EXPECT_EQ(checkpoint_dir("/r", 5), fs::path("/r/step_00000005"));
  EXPECT_EQ(checkpoint_tmp_dir("/r", 5), fs::path("/r/step_00000005.tmp"));
  EXPECT_THROW(checkpoint_step_name(-1), Error);
}

// Writes a complete checkpoint of `ranks` rank files the way the trainer does.
fs::path save_checkpoint(const fs::path& root, int64_t step, int ranks) {
  fs::path tmp = begin_checkpoint(root, step);
  nlohmann::json rank_files = nlohmann::json::array();
  for (int rank = 0; rank < ranks; ++rank) {
    Tensor w = Tensor::full({2, 3}, static_cast<double>(step * 10 + rank));
    write_tensors_h5((tmp / checkpoint_rank_file(rank)).string(), {{"w", w}}, {{"rank", rank}});
    rank_files.push_back(checkpoint_rank_file(rank));
  }
  nlohmann::json index = {{"step", step},
                          {"rank_files", rank_files},
                          {"data", {{"position", step * 4096}}},
                          {"world", {{"size", ranks}}},
                          {"config", {{"lr", 1e-3}}}};
  write_checkpoint_index(tmp, index);
  commit_checkpoint(tmp, checkpoint_dir(root, step));
  return checkpoint_dir(root, step);
}

TEST(CheckpointDir, LifecycleSkipsIncompleteAndPrunes) {
  TempDir dir;
  fs::path root = dir.path() / "checkpoints";
  EXPECT_EQ(find_latest_checkpoint(root), std::nullopt);  // no root yet
  for (int64_t step : {100, 200, 300}) save_checkpoint(root, step, 2);
  EXPECT_FALSE(fs::exists(checkpoint_tmp_dir(root, 300)));

  // Killed while writing step 400: the tmp dir has a rank file but no index.
  fs::path killed = begin_checkpoint(root, 400);
  write_tensors_h5((killed / checkpoint_rank_file(0)).string(), {{"w", Tensor::ones({1})}});
  // Broken step directories: no index; truncated index; index naming a missing rank file.
  fs::path no_index = checkpoint_dir(root, 500);
  fs::create_directories(no_index);
  write_tensors_h5((no_index / checkpoint_rank_file(0)).string(), {{"w", Tensor::ones({1})}});
  fs::path truncated = checkpoint_dir(root, 600);
  fs::copy(checkpoint_dir(root, 300), truncated);
  std::string index_text = read_text(truncated / "index.json");
  write_text(truncated / "index.json", index_text.substr(0, index_text.size() / 2));
  fs::path missing_rank = checkpoint_dir(root, 700);
  fs::copy(checkpoint_dir(root, 300), missing_rank);
  nlohmann::json index = read_checkpoint_index(checkpoint_dir(root, 300));
  index["step"] = 700;
  write_text(missing_rank / "index.json", index.dump());
  fs::remove(missing_rank / checkpoint_rank_file(1));
  fs::create_directories(root / "not_a_checkpoint");

  std::vector<std::string> skipped;
  std::optional<fs::path> latest = find_latest_checkpoint(root, &skipped);
  ASSERT_TRUE(latest);
  EXPECT_EQ(*latest, checkpoint_dir(root, 300));
  EXPECT_EQ(skipped.size(), 4u);  // 400.tmp, 500, 600, 700
  std::string all_skipped;
  for (const auto& s : skipped) all_skipped += s + "\n";
  for (const char* needle : {"step_00000400.tmp", "step_00000500", "step_00000600", "step_00000700", "missing"})
    EXPECT_NE(all_skipped.find(needle), std::string::npos) << needle << " not in:\n" << all_skipped;

  // What resume reads back.
  nlohmann::json latest_index = read_checkpoint_index(*latest);
  EXPECT_EQ(latest_index["step"], 300);
  EXPECT_EQ(latest_index["data"]["position"], 300 * 4096);
  nlohmann::json attributes;
  auto rank1 = read_tensors_h5((*latest / latest_index["rank_files"][1].get<std::string>()).string(), &attributes);
  EXPECT_EQ(rank1.at("w").to_vector<float>(), std::vector<float>(6, 3001.0f));
  EXPECT_EQ(attributes["rank"], 1);

  // The broken ones give errors naming the index file and what is wrong.
  expect_error([&] { read_checkpoint_index(no_index); }, {(no_index / "index.json").string(), "missing"});
  expect_error([&] { read_checkpoint_index(truncated); }, {(truncated / "index.json").string(), "not valid JSON"});
  expect_error([&] { read_checkpoint_index(missing_rank); }, {"rank_00000001.h5", "missing"});

  // Keep the newest two complete ones; the stale tmp dir goes, broken step dirs stay.
  std::vector<fs::path> removed = prune_checkpoints(root, 2);
  EXPECT_EQ(removed.size(), 2u);
  EXPECT_FALSE(fs::exists(checkpoint_dir(root, 100)));
  EXPECT_FALSE(fs::exists(killed));
  for (int64_t step : {200, 300, 500, 600, 700}) EXPECT_TRUE(fs::exists(checkpoint_dir(root, step))) << step;
  std::vector<CheckpointEntry> complete = list_checkpoints(root);
  ASSERT_EQ(complete.size(), 2u);
  EXPECT_EQ(complete[0].step, 200);
  EXPECT_EQ(complete[1].step, 300);
  EXPECT_TRUE(prune_checkpoints(root, 0).empty());  // 0 keeps all
  save_checkpoint(root, 800, 1);
  EXPECT_EQ(prune_checkpoints(root, 1).size(), 2u);  // 200 and 300
  EXPECT_EQ(find_latest_checkpoint(root), checkpoint_dir(root, 800));
  EXPECT_THROW(prune_checkpoints(root, -1), Error);
}

TEST(CheckpointDir, StepsCompareAsNumbersPastEightDigits) {
  TempDir dir;
  save_checkpoint(dir.path(), 99999999, 1);
  save_checkpoint(dir.path(), 100000000, 1);
  save_checkpoint(dir.path(), 5, 1);
  EXPECT_EQ(find_latest_checkpoint(dir.path()), checkpoint_dir(dir.path(), 100000000));
}

TEST(CheckpointDir, IndexIsValidatedBeforeWritingAndCommitting) {
  TempDir dir;
  fs::path tmp = begin_checkpoint(dir.path(), 10);
  write_tensors_h5((tmp / checkpoint_rank_file(0)).string(), {{"w", Tensor::ones({1})}});
  std::string file = (tmp / "index.json").string();
  expect_error([&] { write_checkpoint_index(tmp, {{"step", 10}}); }, {file, "rank_files"});
  expect_error([&] { write_checkpoint_index(tmp, {{"rank_files", {"rank_00000000.h5"}}}); }, {file, "step"});
  expect_error([&] { write_checkpoint_index(tmp, {{"step", 10}, {"rank_files", {"rank_00000001.h5"}}}); },
               {file, "rank_00000001.h5", "missing"});
  expect_error([&] { write_checkpoint_index(tmp, {{"step", 11}, {"rank_files", {"rank_00000000.h5"}}}); },
               {"step 11", "step 10"});
  // Committing without an index fails and leaves the tmp dir where it is.
  expect_error([&] { commit_checkpoint(tmp, checkpoint_dir(dir.path(), 10)); }, {file, "missing"});
  EXPECT_TRUE(fs::exists(tmp));
  EXPECT_FALSE(fs::exists(checkpoint_dir(dir.path(), 10)));
  write_checkpoint_index(tmp, {{"step", 10}, {"rank_files", {"rank_00000000.h5"}}});
  expect_error([&] { commit_checkpoint(tmp, checkpoint_dir(dir.path(), 11)); }, {"step_00000011"});
  commit_checkpoint(tmp, checkpoint_dir(dir.path(), 10));
  EXPECT_EQ(find_latest_checkpoint(dir.path()), checkpoint_dir(dir.path(), 10));
}

TEST(CheckpointDir, SavingTheSameStepAgainReplacesIt) {
  TempDir dir;
  save_checkpoint(dir.path(), 50, 2);
  // After a resume from step 50 the run may save step 50 again, with one rank now.
  save_checkpoint(dir.path(), 50, 1);
  nlohmann::json index = read_checkpoint_index(checkpoint_dir(dir.path(), 50));
  EXPECT_EQ(index["rank_files"].size(), 1u);
  EXPECT_FALSE(fs::exists(checkpoint_dir(dir.path(), 50) / checkpoint_rank_file(1)));
  size_t entries = 0;
  for (const auto& entry : fs::directory_iterator(dir.path())) entries += entry.is_directory() ? 1 : 0;
  EXPECT_EQ(entries, 1u);  // no *.old.tmp left behind
}

TEST(CheckpointDir, BeginReplacesALeftoverTmpDir) {
  TempDir dir;
  fs::path tmp = begin_checkpoint(dir.path(), 7);
  write_text(tmp / "junk", "from a killed run");
  EXPECT_EQ(begin_checkpoint(dir.path(), 7), tmp);
  EXPECT_TRUE(fs::is_empty(tmp));
}

}  // namespace
}  // namespace loom
