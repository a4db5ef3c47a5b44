"""GGUF files for llama.cpp, Ollama and LM Studio, made with llama.cpp's own tools and checked in llama.cpp.

setup.py builds the toolchain once from PyPI (`python -m sftlib gguf-setup`); convert.py runs the
converter and the quantizer with the training template's settings; export.py writes the files and the
Modelfile; verify.py runs each file and compares it with the model it came from.
"""
