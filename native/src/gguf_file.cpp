#include "gguf_file.h"

#include "error.h"

#include "ggml.h"
#include "gguf.h"

#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace appliance {

namespace {

std::string errmsg(const std::string & path, const std::string & what) {
    return "model file '" + path + "': " + what;
}

}  // namespace

GgufFile::GgufFile(const std::string & path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        throw ModelFormatError(errmsg(path, std::string("cannot open: ") + std::strerror(errno)));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw ModelFormatError(errmsg(path, "not a regular file"));
    }
    file_size_ = static_cast<size_t>(st.st_size);

    char magic[4] = {0, 0, 0, 0};
    if (file_size_ < 24 || ::pread(fd, magic, 4, 0) != 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        ::close(fd);
        throw ModelFormatError(errmsg(path, "not a GGUF file (missing 'GGUF' magic or too short)"));
    }

    gguf_init_params params = {/*.no_alloc =*/ true, /*.ctx =*/ &meta_};
    gguf_ = gguf_init_from_file(path.c_str(), params);
    if (gguf_ == nullptr) {
        ::close(fd);
        throw ModelFormatError(errmsg(path, "corrupt or truncated GGUF header (metadata or tensor table unreadable)"));
    }
    data_offset_ = gguf_get_data_offset(gguf_);

    // a constructor that throws runs no destructor: free the metadata read so far on every refusal
    // below (found by native/fuzz: each rejected file leaked its whole key/value and tensor table)
    auto refuse = [&](const std::string & what) {
        ::close(fd);
        gguf_free(gguf_);
        ggml_free(meta_);
        gguf_ = nullptr;
        meta_ = nullptr;
        throw ModelFormatError(errmsg(path, what));
    };

    // every tensor must lie inside the file: a truncated download fails here, not at first use
    const int64_t n = gguf_get_n_tensors(gguf_);
    for (int64_t i = 0; i < n; ++i) {
        const char *        name = gguf_get_tensor_name(gguf_, i);
        const ggml_tensor * t    = ggml_get_tensor(meta_, name);
        const size_t        rel  = gguf_get_tensor_offset(gguf_, i);
        const size_t        off  = data_offset_ + rel;  // checked below without wrapping around
        const size_t        size = ggml_nbytes(t);
        if (data_offset_ > file_size_ || rel > file_size_ - data_offset_ || size > file_size_ - off) {
            refuse(std::string("tensor '") + name + "' extends past the end of the file (" + std::to_string(file_size_) +
                   " bytes): the file is truncated");
        }
    }

    map_ = ::mmap(nullptr, file_size_, PROT_READ, MAP_SHARED, fd, 0);
    if (map_ == MAP_FAILED) {
        map_ = nullptr;
        refuse(std::string("mmap failed: ") + std::strerror(errno));
    }
    ::close(fd);
    ::posix_madvise(map_, file_size_, POSIX_MADV_WILLNEED);
}

GgufFile::~GgufFile() {
    if (map_ != nullptr) {
        ::munmap(map_, file_size_);
    }
    if (gguf_ != nullptr) {
        gguf_free(gguf_);
    }
    if (meta_ != nullptr) {
        ggml_free(meta_);
    }
}

int64_t GgufFile::key_id(const std::string & key) const { return gguf_find_key(gguf_, key.c_str()); }

bool GgufFile::has_key(const std::string & key) const { return key_id(key) >= 0; }

std::optional<std::string> GgufFile::get_str(const std::string & key) const {
    const int64_t id = key_id(key);
    if (id < 0) {
        return std::nullopt;
    }
    if (gguf_get_kv_type(gguf_, id) != GGUF_TYPE_STRING) {
        throw ModelFormatError(errmsg(path_, "metadata key '" + key + "' should be a string"));
    }
    return std::string(gguf_get_val_str(gguf_, id));
}

std::optional<uint32_t> GgufFile::get_u32(const std::string & key) const {
    const int64_t id = key_id(key);
    if (id < 0) {
        return std::nullopt;
    }
    int64_t v = 0;
    switch (gguf_get_kv_type(gguf_, id)) {
        case GGUF_TYPE_UINT8:  v = gguf_get_val_u8(gguf_, id); break;
        case GGUF_TYPE_INT8:   v = gguf_get_val_i8(gguf_, id); break;
        case GGUF_TYPE_UINT16: v = gguf_get_val_u16(gguf_, id); break;
        case GGUF_TYPE_INT16:  v = gguf_get_val_i16(gguf_, id); break;
        case GGUF_TYPE_UINT32: v = gguf_get_val_u32(gguf_, id); break;
        case GGUF_TYPE_INT32:  v = gguf_get_val_i32(gguf_, id); break;
        case GGUF_TYPE_UINT64: v = static_cast<int64_t>(std::min<uint64_t>(gguf_get_val_u64(gguf_, id), UINT32_MAX + 1ull)); break;
        case GGUF_TYPE_INT64:  v = gguf_get_val_i64(gguf_, id); break;
        default:
            throw ModelFormatError(errmsg(path_, "metadata key '" + key + "' should be an integer"));
    }
    if (v < 0 || v > static_cast<int64_t>(UINT32_MAX)) {
        throw ModelFormatError(errmsg(path_, "metadata key '" + key + "' is out of range: " + std::to_string(v)));
    }
    return static_cast<uint32_t>(v);
}

std::optional<float> GgufFile::get_f32(const std::string & key) const {
    const int64_t id = key_id(key);
    if (id < 0) {
        return std::nullopt;
    }
    switch (gguf_get_kv_type(gguf_, id)) {
        case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(gguf_, id);
        case GGUF_TYPE_FLOAT64: return static_cast<float>(gguf_get_val_f64(gguf_, id));
        default:
            throw ModelFormatError(errmsg(path_, "metadata key '" + key + "' should be a float"));
    }
}

std::optional<bool> GgufFile::get_bool(const std::string & key) const {
    const int64_t id = key_id(key);
    if (id < 0) {
        return std::nullopt;
    }
    if (gguf_get_kv_type(gguf_, id) != GGUF_TYPE_BOOL) {
        throw ModelFormatError(errmsg(path_, "metadata key '" + key + "' should be a bool"));
    }
    return gguf_get_val_bool(gguf_, id);
}

std::vector<int64_t> GgufFile::get_int_arr(const std::string & key) const {
    std::vector<int64_t> out;
    const int64_t id = key_id(key);
    if (id < 0 || gguf_get_kv_type(gguf_, id) != GGUF_TYPE_ARRAY) {
        return out;
    }
    const size_t    n    = gguf_get_arr_n(gguf_, id);
    const gguf_type type = gguf_get_arr_type(gguf_, id);
    // ggml aborts the process when asked for the data of a string array: refuse any other type first
    // (found by native/fuzz: a string array under an integer key)
    if (type != GGUF_TYPE_INT32 && type != GGUF_TYPE_UINT32 && type != GGUF_TYPE_BOOL && type != GGUF_TYPE_UINT8) {
        throw ModelFormatError(errmsg(path_, "metadata array '" + key + "' should hold integers"));
    }
    const void * data = gguf_get_arr_data(gguf_, id);
    switch (type) {
        case GGUF_TYPE_INT32:
            for (size_t i = 0; i < n; ++i) out.push_back(static_cast<const int32_t *>(data)[i]);
            break;
        case GGUF_TYPE_UINT32:
            for (size_t i = 0; i < n; ++i) out.push_back(static_cast<const uint32_t *>(data)[i]);
            break;
        case GGUF_TYPE_BOOL:
        case GGUF_TYPE_UINT8:
            for (size_t i = 0; i < n; ++i) out.push_back(static_cast<const uint8_t *>(data)[i]);
            break;
        default:
            throw ModelFormatError(errmsg(path_, "metadata array '" + key + "' should hold integers"));
    }
    return out;
}

ggml_tensor * GgufFile::tensor(const std::string & name) const { return ggml_get_tensor(meta_, name.c_str()); }

int64_t GgufFile::n_tensors() const { return gguf_get_n_tensors(gguf_); }

ggml_tensor * GgufFile::tensor_at(int64_t i) const { return ggml_get_tensor(meta_, gguf_get_tensor_name(gguf_, i)); }

const uint8_t * GgufFile::tensor_data(const ggml_tensor * t) const {
    const int64_t id = gguf_find_tensor(gguf_, ggml_get_name(t));
    GGML_ASSERT(id >= 0);
    return static_cast<const uint8_t *>(map_) + data_offset_ + gguf_get_tensor_offset(gguf_, id);
}

}  // namespace appliance
