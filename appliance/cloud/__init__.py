"""Cloud LLM backends: OpenAI-compatible Chat Completions and the Anthropic Messages API over one
async HTTP client with timeouts, retries (backoff, jitter, Retry-After) and a circuit breaker."""
