"""The model to fine-tune: `load` (a built-in name, a local folder or a hub id), `builtin` (wheels -> GGUF -> folder), `hub` (reachability)."""
