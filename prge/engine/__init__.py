"""The inference-engine side: `export` (the step as an ExecuTorch program), `formats` (its manifest,
data and adapter files), `runtime` (the Python device loop), `native` (build and run the C++ runner
in `native/`)."""
