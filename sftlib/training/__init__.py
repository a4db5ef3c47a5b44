"""Training: which engine runs (backend.py), the model and its tokenizer (model.py, tokenizer.py), the
adapters (lora.py), the trainer (trainer.py) with its checkpoints (checkpoints.py), and the memory
plan on a GPU (memory.py, autotune.py, packed_attention.py)."""
