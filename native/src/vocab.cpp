#include "vocab.h"

#include "error.h"

#include "llama.h"


namespace appliance {

Vocab::Vocab(const std::string & path) {
    llama_model_params p = llama_model_default_params();
    p.vocab_only = true;
    model_ = llama_model_load_from_file(path.c_str(), p);
    if (model_ == nullptr) {
        throw ModelFormatError("model file '" + path + "': libllama cannot read its vocabulary");
    }
    vocab_ = llama_model_get_vocab(model_);
}

Vocab::~Vocab() { llama_model_free(model_); }

void Vocab::check_token(int32_t token) const {
    APPL_REQUIRE(token >= 0 && token < n_tokens(), InvalidArgument,
                 "token id " + std::to_string(token) + " is outside the vocabulary of " + std::to_string(n_tokens()));
}

std::vector<int32_t> Vocab::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    APPL_REQUIRE(text.size() < static_cast<size_t>(INT32_MAX), InvalidArgument, "text too long to tokenize");
    std::vector<int32_t> out(text.size() + 2);
    int32_t n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                               static_cast<int32_t>(out.size()), add_special, parse_special);
    if (n < 0) {
        out.resize(-n);
        n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                           static_cast<int32_t>(out.size()), add_special, parse_special);
    }
    APPL_REQUIRE(n >= 0, RuntimeFailure, "tokenization failed");
    out.resize(n);
    return out;
}

std::string Vocab::token_to_piece(int32_t token, bool special) const {
    check_token(token);
    std::string buf(32, '\0');
    int32_t n = llama_token_to_piece(vocab_, token, buf.data(), static_cast<int32_t>(buf.size()), 0, special);
    if (n < 0) {
        buf.resize(-n);
        n = llama_token_to_piece(vocab_, token, buf.data(), static_cast<int32_t>(buf.size()), 0, special);
    }
    buf.resize(n > 0 ? n : 0);
    return buf;
}

std::string Vocab::detokenize(const std::vector<int32_t> & tokens, bool remove_special, bool unparse_special) const {
    for (int32_t t : tokens) check_token(t);
    std::string buf(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), buf.data(),
                                 static_cast<int32_t>(buf.size()), remove_special, unparse_special);
    if (n < 0) {
        buf.resize(-n);
        n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), buf.data(),
                             static_cast<int32_t>(buf.size()), remove_special, unparse_special);
    }
    buf.resize(n > 0 ? n : 0);
    return buf;
}

int32_t Vocab::n_tokens() const { return llama_vocab_n_tokens(vocab_); }
int32_t Vocab::bos() const { return llama_vocab_bos(vocab_); }
int32_t Vocab::eos() const { return llama_vocab_eos(vocab_); }
int32_t Vocab::eot() const { return llama_vocab_eot(vocab_); }
bool    Vocab::add_bos() const { return llama_vocab_get_add_bos(vocab_); }

bool Vocab::is_eog(int32_t token) const {
    check_token(token);
    return llama_vocab_is_eog(vocab_, token);
}

std::string Vocab::chat_template() const {
    const char * t = llama_model_chat_template(model_, nullptr);
    return t ? std::string(t) : std::string();
}

std::string Vocab::apply_chat_template(const std::string & tmpl, const std::vector<std::pair<std::string, std::string>> & messages,
                                       bool add_assistant) const {
    std::vector<llama_chat_message> chat;
    size_t total = 0;
    for (const auto & [role, content] : messages) {
        chat.push_back({role.c_str(), content.c_str()});
        total += role.size() + content.size();
    }
    std::string buf(total * 2 + 256, '\0');
    int32_t n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                          static_cast<int32_t>(buf.size()));
    if (n > static_cast<int32_t>(buf.size())) {
        buf.resize(n);
        n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                      static_cast<int32_t>(buf.size()));
    }
    APPL_REQUIRE(n >= 0, InvalidArgument, "chat template is not one llama.cpp can apply");
    buf.resize(n);
    return buf;
}

}  // namespace appliance
