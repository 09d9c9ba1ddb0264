// Tokenizer, detokenizer and chat templates, from libllama (a vocab-only load of the same GGUF).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct llama_model;
struct llama_vocab;

namespace appliance {

class Vocab {
public:
    // Throws ModelFormatError when libllama cannot read the file's vocabulary.
    explicit Vocab(const std::string & path);
    ~Vocab();
    Vocab(const Vocab &) = delete;
    Vocab & operator=(const Vocab &) = delete;

    // text must be valid UTF-8 (checked at the binding boundary)
    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    // raw bytes of one token (may be a partial UTF-8 sequence)
    std::string token_to_piece(int32_t token, bool special) const;
    std::string detokenize(const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) const;

    int32_t n_tokens() const;
    int32_t bos() const;  // -1 when none
    int32_t eos() const;
    int32_t eot() const;
    bool    is_eog(int32_t token) const;
    bool    add_bos() const;
    // libllama's vocabulary (grammar.h builds its grammar samplers on it); lives as long as this
    const llama_vocab * raw() const { return vocab_; }

    // the template stored in the file, or "" when it has none
    std::string chat_template() const;
    // renders messages (role, content) with `tmpl` (a Jinja-like template or a name llama.cpp
    // knows, e.g. "gemma"); throws InvalidArgument for a template llama.cpp cannot apply
    std::string apply_chat_template(const std::string & tmpl, const std::vector<std::pair<std::string, std::string>> & messages,
                                    bool add_assistant) const;

private:
    void check_token(int32_t token) const;

    llama_model *       model_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
};

}  // namespace appliance
