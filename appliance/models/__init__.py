"""Model files: the manifest, offline provisioning, what `--model` names, the builders of models made
from packages, and the choice of ggml's CPU variant for this machine."""
