// The tokenizer/detokenizer boundary (Vocab over libllama): arbitrary bytes (invalid UTF-8 included)
// tokenized with every add_special/parse_special combination and detokenized again; token ids from
// the input (out-of-range ones must raise InvalidArgument) turned into pieces and text; chat templates
// applied to messages cut from the input. The vocabulary is APPLIANCE_FUZZ_DIR/base.gguf's.
#include "fuzz_common.h"

#include "vocab.h"

#include <cstring>
#include <memory>

namespace {

std::unique_ptr<appliance::Vocab> g_vocab;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    fuzz::quiet_logs();
    g_vocab = std::make_unique<appliance::Vocab>(fuzz::fuzz_file("base.gguf"));
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    if (size == 0) return 0;
    const uint8_t     mode = data[0];
    const std::string text(reinterpret_cast<const char *>(data + 1), size - 1);
    const appliance::Vocab & v = *g_vocab;
    switch (mode % 4) {
        case 0:
        case 1: {
            const bool add_special = mode & 4, parse_special = mode & 8;
            std::vector<int32_t> toks;
            fuzz::expect_clean_errors([&] { toks = v.tokenize(text, add_special, parse_special); });
            for (int32_t t : toks) {
                if (t < 0 || t >= v.n_tokens()) {
                    std::fprintf(stderr, "tokenize returned id %d outside the vocabulary\n", t);
                    std::abort();
                }
            }
            fuzz::expect_clean_errors([&] { (void)v.detokenize(toks, mode & 16, mode & 32); });
            break;
        }
        case 2: {  // token ids straight from the input, some out of range
            std::vector<int32_t> toks((size - 1) / 2);
            for (size_t i = 0; i < toks.size(); ++i) {
                int16_t t;
                std::memcpy(&t, data + 1 + 2 * i, 2);
                toks[i] = t % (v.n_tokens() + 8);
            }
            fuzz::expect_clean_errors([&] { (void)v.detokenize(toks, mode & 16, mode & 32); });
            for (int32_t t : toks) {
                fuzz::expect_clean_errors([&] { (void)v.token_to_piece(t, mode & 64); });
                fuzz::expect_clean_errors([&] { (void)v.is_eog(t); });
            }
            break;
        }
        default: {  // a chat: messages separated by NUL, role/content by '\x01'; the template by name or the text
            std::vector<std::pair<std::string, std::string>> msgs;
            size_t start = 0;
            while (start <= text.size() && msgs.size() < 16) {
                size_t end = text.find('\0', start);
                if (end == std::string::npos) end = text.size();
                const std::string part = text.substr(start, end - start);
                const size_t      sep  = part.find('\x01');
                msgs.emplace_back(sep == std::string::npos ? "user" : part.substr(0, sep),
                                  sep == std::string::npos ? part : part.substr(sep + 1));
                start = end + 1;
            }
            static const char * names[] = {"chatml", "gemma", "llama2", "llama3", "mistral-v7", "phi3", "zephyr", "bogus"};
            const std::string tmpl = (mode & 4) ? v.chat_template() : names[(mode >> 3) % 8];
            fuzz::expect_clean_errors([&] { (void)v.apply_chat_template(tmpl, msgs, mode & 64); });
        }
    }
    return 0;
}
