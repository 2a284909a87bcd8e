"""Export a model to where people run it: llama.cpp's GGUF and Ollama (``lmtune export``)."""
