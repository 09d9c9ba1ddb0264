"""The service: the request path (pipeline.py, in one function), the stages only it uses (normalize, context,
summarizer, admission, auth, hot prefixes), its metrics, systemd notification and the usage report."""
