// A stand-in for libFuzzer where clang is not installed (gcc builds the same harnesses with ASan+UBSan):
//
//     fuzz_x [-runs=N] [-max_total_time=S] [-seed=S] [-timeout=S] [-artifact_prefix=DIR/] CORPUS_DIR_OR_FILE...
//
// Without -runs it replays every input once (what `make test` does with the regression corpora).
// With -runs it mutates inputs from the corpus -- the harness's LLVMFuzzerCustomMutator when it has
// one, else byte mutations (LLVMFuzzerMutate, below) -- stacking 1-4 mutations, and keeps a sample of
// the mutants as further starting points. There is no coverage feedback: libFuzzer (clang) is the
// better fuzzer; this keeps `make fuzz` meaningful on a gcc-only machine. A crash, sanitizer report or
// hang (-timeout, default 10 s) writes the input to ARTIFACT_PREFIX crash-<hash> / timeout-<hash>.
#include <sanitizer/common_interface_defs.h>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <random>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

extern "C" int    LLVMFuzzerTestOneInput(const uint8_t * data, size_t size);
extern "C" int    LLVMFuzzerInitialize(int * argc, char *** argv) __attribute__((weak));
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t * data, size_t size, size_t max_size, unsigned int seed)
    __attribute__((weak));

namespace {

std::mt19937_64      g_rng(1);
std::vector<uint8_t> g_current;
std::string          g_prefix = "./";

uint64_t fnv(const std::vector<uint8_t> & v) {
    uint64_t h = 1469598103934665603ull;
    for (uint8_t c : v) h = (h ^ c) * 1099511628211ull;
    return h;
}

void save_current(const char * kind) {
    char name[64];
    std::snprintf(name, sizeof(name), "%s-%016llx", kind, static_cast<unsigned long long>(fnv(g_current)));
    const std::string path = g_prefix + name;
    if (FILE * f = std::fopen(path.c_str(), "wb")) {
        std::fwrite(g_current.data(), 1, g_current.size(), f);
        std::fclose(f);
        std::fprintf(stderr, "==driver== input written to %s\n", path.c_str());
    }
}

void on_death() { save_current("crash"); }

void on_signal(int sig) {
    save_current(sig == SIGALRM ? "timeout" : "crash");
    std::signal(SIGABRT, SIG_DFL);
    std::abort();
}

void load(const std::string & path, std::vector<std::vector<uint8_t>> & out) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(2);
    }
    if (S_ISDIR(st.st_mode)) {
        DIR * d = ::opendir(path.c_str());
        while (dirent * e = ::readdir(d)) {
            if (e->d_name[0] != '.') load(path + "/" + e->d_name, out);
        }
        ::closedir(d);
        return;
    }
    std::vector<uint8_t> buf(static_cast<size_t>(st.st_size));
    FILE * f = std::fopen(path.c_str(), "rb");
    if (f == nullptr || std::fread(buf.data(), 1, buf.size(), f) != buf.size()) {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    out.push_back(std::move(buf));
}

size_t pick(size_t n) { return n == 0 ? 0 : std::uniform_int_distribution<size_t>(0, n - 1)(g_rng); }

}  // namespace

// libFuzzer's byte-level mutator, as harness custom mutators call it (a small subset of its moves)
extern "C" size_t LLVMFuzzerMutate(uint8_t * data, size_t size, size_t max_size) {
    static const uint64_t vals[] = {0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fffffff, 0xffffffff, ~0ull};
    switch (pick(6)) {
        case 0:  // flip a bit
            if (size) data[pick(size)] ^= static_cast<uint8_t>(1u << pick(8));
            break;
        case 1:  // a random byte
            if (size) data[pick(size)] = static_cast<uint8_t>(pick(256));
            break;
        case 2: {  // an interesting integer
            const size_t w = size_t{1} << pick(4);
            if (size >= w) {
                const uint64_t v = vals[pick(sizeof(vals) / sizeof(vals[0]))];
                std::memcpy(data + pick(size - w + 1), &v, w);
            }
            break;
        }
        case 3: {  // erase a range
            if (size > 1) {
                const size_t at = pick(size), n = 1 + pick(std::min<size_t>(size - at, 16));
                std::memmove(data + at, data + at + n, size - at - n);
                size -= n;
            }
            break;
        }
        case 4: {  // insert bytes
            const size_t n = 1 + pick(8);
            if (size + n <= max_size) {
                const size_t at = pick(size + 1);
                std::memmove(data + at + n, data + at, size - at);
                for (size_t i = 0; i < n; ++i) data[at + i] = static_cast<uint8_t>(pick(256));
                size += n;
            }
            break;
        }
        default: {  // copy a range within the input
            if (size > 2) {
                const size_t from = pick(size), to = pick(size), n = 1 + pick(std::min(size - from, size - to));
                std::memmove(data + to, data + from, n);
            }
        }
    }
    return size;
}

int main(int argc, char ** argv) {
    long long runs = -1, max_time = 0;
    unsigned  timeout = 10;
    uint64_t  seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    std::vector<std::vector<uint8_t>> corpus;
    std::vector<std::string> paths;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a.rfind("-runs=", 0) == 0) runs = std::atoll(a.c_str() + 6);
        else if (a.rfind("-max_total_time=", 0) == 0) max_time = std::atoll(a.c_str() + 16);
        else if (a.rfind("-seed=", 0) == 0) seed = std::strtoull(a.c_str() + 6, nullptr, 10);
        else if (a.rfind("-timeout=", 0) == 0) timeout = static_cast<unsigned>(std::atoi(a.c_str() + 9));
        else if (a.rfind("-artifact_prefix=", 0) == 0) g_prefix = a.substr(17);
        else if (a[0] == '-') std::fprintf(stderr, "driver: ignoring libFuzzer flag %s\n", a.c_str());
        else paths.push_back(a);
    }
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    for (const auto & p : paths) load(p, corpus);
    __sanitizer_set_death_callback(on_death);
    std::signal(SIGALRM, on_signal);
    std::signal(SIGSEGV, on_signal);
    g_rng.seed(seed);

    auto run_one = [&](const std::vector<uint8_t> & in) {
        g_current = in;
        ::alarm(timeout);
        LLVMFuzzerTestOneInput(in.data(), in.size());
        ::alarm(0);
    };
    for (const auto & in : corpus) run_one(in);
    std::fprintf(stderr, "==driver== replayed %zu inputs\n", corpus.size());
    if (runs < 0 && max_time == 0) return 0;
    if (corpus.empty()) corpus.push_back({});

    size_t max_len = 0;
    for (const auto & in : corpus) max_len = std::max(max_len, in.size());
    max_len = std::max<size_t>(max_len + max_len / 4, 4096);
    const auto t0   = std::chrono::steady_clock::now();
    auto       last = t0;
    long long  n    = 0;
    std::vector<uint8_t> buf;
    for (; runs < 0 || n < runs; ++n) {
        const std::vector<uint8_t> & base = corpus[pick(corpus.size())];
        buf.assign(max_len, 0);
        std::memcpy(buf.data(), base.data(), base.size());
        size_t size = base.size();
        const int stack = 1 + static_cast<int>(pick(4));
        for (int k = 0; k < stack; ++k) {
            size_t m = 0;
            if (LLVMFuzzerCustomMutator) m = LLVMFuzzerCustomMutator(buf.data(), size, max_len, static_cast<unsigned>(g_rng()));
            else m = LLVMFuzzerMutate(buf.data(), size, max_len);
            size = m;
        }
        buf.resize(size);
        run_one(buf);
        if (corpus.size() < 4096 && pick(64) == 0) corpus.push_back(buf);  // a mutant to mutate further
        const auto now = std::chrono::steady_clock::now();
        if (now - last > std::chrono::seconds(10)) {
            last = now;
            const double s = std::chrono::duration<double>(now - t0).count();
            std::fprintf(stderr, "#%lld\texec/s: %.0f\tcorpus: %zu\n", n + 1, (n + 1) / s, corpus.size());
            if (max_time > 0 && s >= static_cast<double>(max_time)) {
                ++n;
                break;
            }
        }
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "Done %lld runs in %.0f second(s) (%.0f exec/s)\n", n, s, n / std::max(s, 1e-9));
    return 0;
}
