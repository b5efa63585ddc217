// HDF5 tensor files (C API: the Debian 1.10 and the GPU machine's HDF5 both
// have it) and the checkpoint directory protocol described in checkpoint_io.h.
// HDF5's automatic error printing is switched off (for the process) on first
// use; a failed call becomes a loom::Error naming the file, the object, the step that
// failed and the messages from HDF5's error stack.
#include "framework/checkpoint_io.h"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace loom {

namespace fs = std::filesystem;

namespace {

// ---- HDF5 plumbing ----

// Switches HDF5's automatic error printing off: every failure here becomes a
// loom::Error instead. It stays off (it is process-wide HDF5 state, and loom
// reports HDF5 errors only this way): with printing restored, HDF5 1.10 prints
// "infinite loop closing library" at exit after it has met corrupt metadata.
void silence_hdf5_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

// The innermost messages of HDF5's current error stack ("file signature not found").
std::string h5_error_messages() {
  std::vector<std::string> messages;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* entry, void* data) -> herr_t {
        if (entry->desc != nullptr && entry->desc[0] != '\0')
          static_cast<std::vector<std::string>*>(data)->push_back(entry->desc);
        return 0;
      },
      &messages);
  if (messages.empty()) return "no HDF5 error message";
  // The outer entries repeat "unable to open file"; the last ones say why.
  std::string out;
  size_t first = messages.size() > 3 ? messages.size() - 3 : 0;
  for (size_t i = first; i < messages.size(); ++i) out += (out.empty() ? "" : "; ") + messages[i];
  return out;
}

// An HDF5 identifier closed by `close` when the handle goes out of scope.
class H5Handle {
 public:
  H5Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5Handle() {
    if (id_ >= 0) close_(id_);
  }
  H5Handle(const H5Handle&) = delete;
  H5Handle& operator=(const H5Handle&) = delete;
  hid_t get() const { return id_; }
  // Closes now and reports failure (flushing a file happens here).
  herr_t close() {
    herr_t status = id_ >= 0 ? close_(id_) : 0;
    id_ = -1;
    return status;
  }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

// Every HDF5 call goes through one of these: `what` names the step and object.
hid_t h5_check_id(hid_t id, const std::string& path, const std::string& what) {
  if (id < 0) LOOM_FAIL() << "HDF5 file '" << path << "': " << what << " failed: " << h5_error_messages();
  return id;
}
void h5_check(herr_t status, const std::string& path, const std::string& what) {
  if (status < 0) LOOM_FAIL() << "HDF5 file '" << path << "': " << what << " failed: " << h5_error_messages();
}

// Type used in the file for each dtype (16-bit floats as their raw bits).
hid_t h5_file_type(DType dtype) {
  switch (dtype) {
    case DType::f64: return H5T_IEEE_F64LE;
    case DType::f32: return H5T_IEEE_F32LE;
    case DType::bf16: case DType::f16: return H5T_STD_U16LE;
    case DType::i64: return H5T_STD_I64LE;
    case DType::i32: return H5T_STD_I32LE;
    case DType::u8: return H5T_STD_U8LE;
  }
  LOOM_FAIL() << "unknown dtype " << static_cast<int>(dtype);
}
hid_t h5_memory_type(DType dtype) {
  switch (dtype) {
    case DType::f64: return H5T_NATIVE_DOUBLE;
    case DType::f32: return H5T_NATIVE_FLOAT;
    case DType::bf16: case DType::f16: return H5T_NATIVE_UINT16;
    case DType::i64: return H5T_NATIVE_INT64;
    case DType::i32: return H5T_NATIVE_INT32;
    case DType::u8: return H5T_NATIVE_UINT8;
  }
  LOOM_FAIL() << "unknown dtype " << static_cast<int>(dtype);
}

// '/' separates groups in HDF5 and "." names the current group, so keys are
// percent-escaped ('%' -> %25, '/' -> %2F, a key "." -> %2E); dots inside
// names such as "blocks.0.weight" are fine as they are.
std::string escape_key(const std::string& key) {
  if (key == ".") return "%2E";
  std::string out;
  for (char c : key) {
    if (c == '%') out += "%25";
    else if (c == '/') out += "%2F";
    else out += c;
  }
  return out;
}
std::string unescape_key(const std::string& name) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  std::string out;
  for (size_t i = 0; i < name.size(); ++i) {
    if (name[i] == '%' && i + 2 < name.size() && hex(name[i + 1]) >= 0 && hex(name[i + 2]) >= 0) {
      out += static_cast<char>(hex(name[i + 1]) * 16 + hex(name[i + 2]));
      i += 2;
    } else {
      out += name[i];
    }
  }
  return out;
}

void write_string_attribute(hid_t object, const char* name, const std::string& value, const std::string& path,
                            const std::string& object_name) {
  std::string what = "writing attribute '" + std::string(name) + "' of " + object_name;
  H5Handle type(h5_check_id(H5Tcopy(H5T_C_S1), path, what), H5Tclose);
  h5_check(H5Tset_size(type.get(), std::max<size_t>(value.size(), 1)), path, what);
  h5_check(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), path, what);
  h5_check(H5Tset_cset(type.get(), H5T_CSET_UTF8), path, what);  // JSON text is UTF-8
  H5Handle space(h5_check_id(H5Screate(H5S_SCALAR), path, what), H5Sclose);
  H5Handle attr(h5_check_id(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), path, what),
                H5Aclose);
  std::string buffer = value.empty() ? std::string(1, '\0') : value;
  h5_check(H5Awrite(attr.get(), type.get(), buffer.data()), path, what);
}

// nullopt when the attribute does not exist.
std::optional<std::string> read_string_attribute(hid_t object, const char* name, const std::string& path,
                                                 const std::string& object_name) {
  std::string what = "reading attribute '" + std::string(name) + "' of " + object_name;
  htri_t exists = H5Aexists(object, name);
  h5_check(exists, path, what);
  if (exists == 0) return std::nullopt;
  H5Handle attr(h5_check_id(H5Aopen(object, name, H5P_DEFAULT), path, what), H5Aclose);
  H5Handle type(h5_check_id(H5Aget_type(attr.get()), path, what), H5Tclose);
  LOOM_CHECK(H5Tget_class(type.get()) == H5T_STRING)
      << "HDF5 file '" << path << "': attribute '" << name << "' of " << object_name << " is not a string";
  if (H5Tis_variable_str(type.get()) > 0) {  // written by h5py, for example
    H5Handle memory(h5_check_id(H5Tcopy(H5T_C_S1), path, what), H5Tclose);
    h5_check(H5Tset_size(memory.get(), H5T_VARIABLE), path, what);
    char* text = nullptr;
    h5_check(H5Aread(attr.get(), memory.get(), &text), path, what);
    std::string value = text != nullptr ? text : "";
    H5free_memory(text);
    return value;
  }
  size_t size = H5Tget_size(type.get());
  std::string value(size, '\0');
  h5_check(H5Aread(attr.get(), type.get(), value.data()), path, what);
  value.resize(std::strlen(value.c_str()));  // drop the padding
  return value;
}

// The dtype of a dataset written without "loom_dtype" (by another tool).
DType infer_dtype(hid_t type, const std::string& path, const std::string& key) {
  H5T_class_t type_class = H5Tget_class(type);
  size_t size = H5Tget_size(type);
  if (type_class == H5T_FLOAT && size == 8) return DType::f64;
  if (type_class == H5T_FLOAT && size == 4) return DType::f32;
  if (type_class == H5T_INTEGER) {
    bool is_signed = H5Tget_sign(type) == H5T_SGN_2;
    if (!is_signed && size == 1) return DType::u8;
    if (size < 4 || (size == 4 && is_signed)) return DType::i32;
    return DType::i64;
  }
  LOOM_FAIL() << "HDF5 file '" << path << "': dataset '" << key << "' has an HDF5 type (class "
              << static_cast<int>(type_class) << ", " << size << " bytes) that loom cannot read";
}

}  // namespace

// ---- tensors in one HDF5 file ----

void write_tensors_h5(const std::string& path, const std::map<std::string, Tensor>& tensors,
                      const nlohmann::json& attributes) {
  silence_hdf5_errors();
  H5Handle fapl(h5_check_id(H5Pcreate(H5P_FILE_ACCESS), path, "creating file access properties"), H5Pclose);
  // The 1.8 format stores large attributes densely (the JSON may exceed 64 KiB).
  h5_check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST), path, "setting format bounds");
  H5Handle file(h5_check_id(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), path, "creating the file"),
                H5Fclose);
  for (const auto& [key, tensor] : tensors) {
    LOOM_CHECK(!key.empty()) << "HDF5 file '" << path << "': empty tensor name";
    LOOM_CHECK(tensor.defined()) << "HDF5 file '" << path << "': tensor '" << key << "' is undefined";
    std::string what = "writing dataset '" + key + "' " + shape_str(tensor.shape()) + " " + dtype_name(tensor.dtype());
    Tensor host = tensor.to(Device::cpu()).contiguous();
    std::vector<hsize_t> dims(host.shape().begin(), host.shape().end());
    hid_t space_id = dims.empty() ? H5Screate(H5S_SCALAR)
                                  : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
    H5Handle space(h5_check_id(space_id, path, what), H5Sclose);
    H5Handle dataset(h5_check_id(H5Dcreate2(file.get(), escape_key(key).c_str(), h5_file_type(host.dtype()),
                                            space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                                 path, what),
                     H5Dclose);
    if (host.numel() > 0)
      h5_check(H5Dwrite(dataset.get(), h5_memory_type(host.dtype()), H5S_ALL, H5S_ALL, H5P_DEFAULT, host.raw_data()),
               path, what);
    write_string_attribute(dataset.get(), "loom_dtype", dtype_name(host.dtype()), path, "dataset '" + key + "'");
  }
  write_string_attribute(file.get(), "loom_attributes", attributes.dump(), path, "the root group");
  h5_check(file.close(), path, "closing (flushing) the file");
  fsync_path(path);
}

namespace {

std::map<std::string, Tensor> read_tensors_h5_impl(const std::string& path, nlohmann::json* attributes) {
  H5Handle fapl(h5_check_id(H5Pcreate(H5P_FILE_ACCESS), path, "creating file access properties"), H5Pclose);
  // Closing the file closes everything in it, also after a failed read of a corrupt file.
  h5_check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG), path, "setting the close degree");
  H5Handle file(h5_check_id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), path,
                            "opening the file (not HDF5, truncated or corrupt?)"),
                H5Fclose);
  H5G_info_t info;
  h5_check(H5Gget_info(file.get(), &info), path, "listing the root group");
  std::map<std::string, Tensor> tensors;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    std::string what = "reading the name of object " + std::to_string(i);
    ssize_t length = H5Lget_name_by_idx(file.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    h5_check(length < 0 ? -1 : 0, path, what);
    std::string name(static_cast<size_t>(length) + 1, '\0');
    h5_check(H5Lget_name_by_idx(file.get(), ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT) < 0
                 ? -1 : 0,
             path, what);
    name.resize(static_cast<size_t>(length));
    std::string key = unescape_key(name);
    what = "reading dataset '" + key + "'";

    H5Handle object(h5_check_id(H5Oopen(file.get(), name.c_str(), H5P_DEFAULT), path, what), H5Oclose);
    LOOM_CHECK(H5Iget_type(object.get()) == H5I_DATASET)
        << "HDF5 file '" << path << "': object '" << key << "' is not a dataset (loom files hold datasets only)";
    hid_t dataset = object.get();
    H5Handle type(h5_check_id(H5Dget_type(dataset), path, what), H5Tclose);
    H5Handle space(h5_check_id(H5Dget_space(dataset), path, what), H5Sclose);
    H5S_class_t space_class = H5Sget_simple_extent_type(space.get());
    LOOM_CHECK(space_class == H5S_SCALAR || space_class == H5S_SIMPLE)
        << "HDF5 file '" << path << "': dataset '" << key << "' has a null or unknown dataspace";
    int ndims = H5Sget_simple_extent_ndims(space.get());
    h5_check(ndims, path, what);
    std::vector<hsize_t> dims(static_cast<size_t>(ndims));
    if (ndims > 0) h5_check(H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr), path, what);
    Shape shape(dims.begin(), dims.end());

    std::optional<std::string> dtype_text = read_string_attribute(dataset, "loom_dtype", path, "dataset '" + key + "'");
    DType dtype;
    if (dtype_text) {
      try {
        dtype = dtype_from_name(*dtype_text);
      } catch (const Error& e) {
        LOOM_FAIL() << "HDF5 file '" << path << "': dataset '" << key << "': " << e.what();
      }
      // The stored type must hold the dtype's bits (16-bit floats as uint16).
      H5T_class_t type_class = H5Tget_class(type.get());
      bool matches = H5Tget_size(type.get()) == dtype_size(dtype) &&
                     type_class == (is_floating(dtype) && dtype_size(dtype) > 2 ? H5T_FLOAT : H5T_INTEGER);
      LOOM_CHECK(matches) << "HDF5 file '" << path << "': dataset '" << key << "' says loom_dtype " << dtype
                          << " but is stored with " << H5Tget_size(type.get()) << "-byte elements of HDF5 class "
                          << static_cast<int>(type_class);
    } else {
      dtype = infer_dtype(type.get(), path, key);
    }
    Tensor tensor = Tensor::empty(shape, dtype);  // (dims of the dataset)
    if (tensor.numel() > 0)
      h5_check(H5Dread(dataset, h5_memory_type(dtype), H5S_ALL, H5S_ALL, H5P_DEFAULT, tensor.raw_data()), path,
               what + " " + shape_str(shape) + " " + dtype_name(dtype));
    tensors.emplace(key, tensor);
  }
  if (attributes != nullptr) {
    std::optional<std::string> text = read_string_attribute(file.get(), "loom_attributes", path, "the root group");
    *attributes = nlohmann::json::object();
    if (text) {
      try {
        *attributes = nlohmann::json::parse(*text);
      } catch (const nlohmann::json::exception& e) {
        LOOM_FAIL() << "HDF5 file '" << path << "': attribute 'loom_attributes' is not valid JSON: " << e.what();
      }
    }
  }
  return tensors;
}

}  // namespace

std::map<std::string, Tensor> read_tensors_h5(const std::string& path, nlohmann::json* attributes) {
  std::error_code ec;
  LOOM_CHECK(fs::is_regular_file(path, ec)) << "HDF5 file '" << path << "' does not exist (or is not a file)";
  silence_hdf5_errors();
  return read_tensors_h5_impl(path, attributes);
}

// ---- durability helpers ----

// ---- checkpoint directories ----

std::string checkpoint_step_name(int64_t step) {
  LOOM_CHECK(step >= 0) << "checkpoint step " << step << " is negative";
  std::string digits = std::to_string(step);
  if (digits.size() < 8) digits.insert(0, 8 - digits.size(), '0');
  return "step_" + digits;
}

std::optional<int64_t> parse_checkpoint_step_name(const std::string& name) {
  if (name.rfind("step_", 0) != 0) return std::nullopt;
  std::string digits = name.substr(5);
  if (digits.size() < 8 || digits.size() > 18) return std::nullopt;
  if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) return std::nullopt;
  return std::stoll(digits);
}

std::string checkpoint_rank_file(int rank) {
  LOOM_CHECK(rank >= 0) << "rank " << rank << " is negative";
  std::string digits = std::to_string(rank);
  if (digits.size() < 8) digits.insert(0, 8 - digits.size(), '0');
  return "rank_" + digits + ".h5";
}

fs::path checkpoint_dir(const fs::path& root, int64_t step) { return root / checkpoint_step_name(step); }
fs::path checkpoint_tmp_dir(const fs::path& root, int64_t step) { return root / (checkpoint_step_name(step) + ".tmp"); }

namespace {

bool is_tmp_checkpoint_name(const std::string& name) {
  return name.rfind("step_", 0) == 0 && name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0;
}

// The step a checkpoint directory's name promises ("step_N" or "step_N.tmp").
std::optional<int64_t> step_of_dir(const fs::path& dir) {
  std::string name = dir.filename().string();
  if (name.empty()) name = dir.parent_path().filename().string();  // "dir/" spelled with a slash
  if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) name.resize(name.size() - 4);
  return parse_checkpoint_step_name(name);
}

// Checks the required keys of an index and that its rank files exist in `dir`.
void validate_index(const nlohmann::json& index, const fs::path& dir, const std::string& file) {
  LOOM_CHECK(index.is_object()) << "checkpoint index '" << file << "' is not a JSON object";
  LOOM_CHECK(index.contains("step") && index["step"].is_number_integer())
      << "checkpoint index '" << file << "' has no integer \"step\"";
  const nlohmann::json& rank_files = index.contains("rank_files") ? index["rank_files"] : nlohmann::json();
  LOOM_CHECK(rank_files.is_array() && !rank_files.empty())
      << "checkpoint index '" << file << "' has no non-empty array \"rank_files\"";
  for (const auto& entry : rank_files) {
    LOOM_CHECK(entry.is_string()) << "checkpoint index '" << file << "': \"rank_files\" entry " << entry.dump()
                                  << " is not a string";
    std::string name = entry.get<std::string>();
    LOOM_CHECK(!name.empty() && name.find('/') == std::string::npos)
        << "checkpoint index '" << file << "': rank file '" << name << "' is not a plain file name";
    std::error_code ec;
    LOOM_CHECK(fs::is_regular_file(dir / name, ec))
        << "checkpoint index '" << file << "' lists rank file '" << name << "', which is missing";
  }
}

}  // namespace

fs::path begin_checkpoint(const fs::path& root, int64_t step) {
  fs::path tmp = checkpoint_tmp_dir(root, step);
  std::error_code ec;
  fs::create_directories(root, ec);
  LOOM_CHECK(!ec) << "cannot create checkpoint root '" << root.string() << "': " << ec.message();
  fs::remove_all(tmp, ec);  // left by a run killed while writing this step
  LOOM_CHECK(!ec) << "cannot remove the stale '" << tmp.string() << "': " << ec.message();
  fs::create_directory(tmp, ec);
  LOOM_CHECK(!ec) << "cannot create '" << tmp.string() << "': " << ec.message();
  return tmp;
}

void write_checkpoint_index(const fs::path& tmp_dir, const nlohmann::json& index) {
  fs::path file = tmp_dir / "index.json";
  validate_index(index, tmp_dir, file.string());
  std::optional<int64_t> step = step_of_dir(tmp_dir);
  LOOM_CHECK(!step || *step == index["step"].get<int64_t>())
      << "checkpoint index for '" << tmp_dir.string() << "' has step " << index["step"] << " but the directory is for step "
      << *step;
  write_file_atomic(file, index.dump(2) + "\n");
}

nlohmann::json read_checkpoint_index(const fs::path& dir) {
  fs::path file = dir / "index.json";
  std::ifstream in(file, std::ios::binary);
  LOOM_CHECK(in.good()) << "checkpoint index '" << file.string() << "' is missing or unreadable";
  std::stringstream buffer;
  buffer << in.rdbuf();
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(buffer.str());
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL() << "checkpoint index '" << file.string() << "' is not valid JSON (truncated?): " << e.what();
  }
  validate_index(index, dir, file.string());
  std::optional<int64_t> step = step_of_dir(dir);
  LOOM_CHECK(!step || *step == index["step"].get<int64_t>())
      << "checkpoint index '" << file.string() << "' has step " << index["step"] << " but its directory is for step "
      << *step;
  return index;
}

void commit_checkpoint(const fs::path& tmp_dir, const fs::path& final_dir) {
  nlohmann::json index = read_checkpoint_index(tmp_dir);
  std::optional<int64_t> final_step = step_of_dir(final_dir);
  LOOM_CHECK(final_step && *final_step == index["step"].get<int64_t>())
      << "committing '" << tmp_dir.string() << "' (step " << index["step"] << ") to '" << final_dir.string()
      << "', which is not named step_" << index["step"];
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(tmp_dir))
    if (entry.is_regular_file()) fsync_path(entry.path());
  fsync_path(tmp_dir);
  fs::path root = final_dir.parent_path().empty() ? fs::path(".") : final_dir.parent_path();
  fs::path replaced = final_dir;
  replaced += ".old.tmp";
  bool replacing = fs::exists(final_dir, ec);
  if (replacing) {  // the same step saved again (after a resume): move the old one aside first
    fs::remove_all(replaced, ec);
    fs::rename(final_dir, replaced, ec);
    LOOM_CHECK(!ec) << "moving the existing '" << final_dir.string() << "' aside failed: " << ec.message();
  }
  fs::rename(tmp_dir, final_dir, ec);
  LOOM_CHECK(!ec) << "renaming '" << tmp_dir.string() << "' to '" << final_dir.string() << "' failed: " << ec.message();
  fsync_path(root);
  if (replacing) fs::remove_all(replaced, ec);  // best effort: prune_checkpoints removes *.tmp later too
}

std::vector<CheckpointEntry> list_checkpoints(const fs::path& root, std::vector<std::string>* skipped) {
  std::vector<CheckpointEntry> found;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return found;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    std::string name = entry.path().filename().string();
    if (!entry.is_directory(ec)) continue;
    if (is_tmp_checkpoint_name(name)) {
      if (skipped) skipped->push_back(entry.path().string() + ": unfinished (a *.tmp directory)");
      continue;
    }
    std::optional<int64_t> step = parse_checkpoint_step_name(name);
    if (!step) continue;
    try {
      read_checkpoint_index(entry.path());
      found.push_back({*step, entry.path()});
    } catch (const Error& e) {
      if (skipped) skipped->push_back(entry.path().string() + ": " + e.what());
    }
  }
  LOOM_CHECK(!ec) << "listing checkpoint root '" << root.string() << "' failed: " << ec.message();
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.step < b.step; });
  return found;
}

std::optional<fs::path> find_latest_checkpoint(const fs::path& root, std::vector<std::string>* skipped) {
  std::vector<CheckpointEntry> found = list_checkpoints(root, skipped);
  if (found.empty()) return std::nullopt;
  return found.back().dir;
}

std::vector<fs::path> prune_checkpoints(const fs::path& root, int64_t keep_last) {
  LOOM_CHECK(keep_last >= 0) << "prune_checkpoints: keep_last " << keep_last << " is negative (0 keeps all)";
  std::vector<fs::path> removed;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return removed;
  std::vector<fs::path> victims;
  for (const auto& entry : fs::directory_iterator(root, ec))
    if (entry.is_directory(ec) && is_tmp_checkpoint_name(entry.path().filename().string()))
      victims.push_back(entry.path());
  std::vector<CheckpointEntry> complete = list_checkpoints(root);
  if (keep_last > 0 && static_cast<int64_t>(complete.size()) > keep_last)
    for (size_t i = 0; i < complete.size() - static_cast<size_t>(keep_last); ++i) victims.push_back(complete[i].dir);
  for (const fs::path& victim : victims) {
    fs::remove_all(victim, ec);
    LOOM_CHECK(!ec) << "removing old checkpoint '" << victim.string() << "' failed: " << ec.message();
    removed.push_back(victim);
  }
  return removed;
}

}  // namespace loom
