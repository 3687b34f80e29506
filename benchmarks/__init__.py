"""Side-by-side benchmarks of tokenmill against llama.cpp's llama-server and vLLM's CPU build (`make bench`)."""
