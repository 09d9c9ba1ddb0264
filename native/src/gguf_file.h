// A GGUF file opened for reading: validated metadata, tensor descriptors and the memory-mapped data.
// Model files are untrusted input: every offset and size is checked against the file before use.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

struct gguf_context;
struct ggml_context;
struct ggml_tensor;

namespace appliance {

class GgufFile {
public:
    // Throws ModelFormatError naming the file and what is wrong with it.
    explicit GgufFile(const std::string & path);
    ~GgufFile();
    GgufFile(const GgufFile &) = delete;
    GgufFile & operator=(const GgufFile &) = delete;

    const std::string & path() const { return path_; }
    size_t file_size() const { return file_size_; }

    // metadata; std::nullopt when the key is absent, ModelFormatError when it has another type
    std::optional<std::string> get_str(const std::string & key) const;
    std::optional<uint32_t>    get_u32(const std::string & key) const;  // any integer type that fits
    std::optional<float>       get_f32(const std::string & key) const;  // f32 or f64
    std::optional<bool>        get_bool(const std::string & key) const;
    // an integer array (e.g. per-layer head counts); empty when absent
    std::vector<int64_t>       get_int_arr(const std::string & key) const;
    bool                       has_key(const std::string & key) const;

    // tensor descriptor from the file (no data allocated), nullptr if absent
    ggml_tensor * tensor(const std::string & name) const;
    int64_t       n_tensors() const;
    ggml_tensor * tensor_at(int64_t i) const;

    // pointer to the tensor's bytes inside the mapping
    const uint8_t * tensor_data(const ggml_tensor * t) const;
    // the whole mapping, for wrapping as a backend buffer
    uint8_t * map_base() const { return static_cast<uint8_t *>(map_); }
    size_t    map_size() const { return file_size_; }

private:
    int64_t key_id(const std::string & key) const;

    std::string     path_;
    gguf_context *  gguf_ = nullptr;
    ggml_context *  meta_ = nullptr;  // tensor descriptors, no data
    void *          map_  = nullptr;
    size_t          file_size_ = 0;
    size_t          data_offset_ = 0;
};

}  // namespace appliance
