"""graphopt.train: small decoder models, their tokenizer and data, the trainer and fine-tuning.

It knows nothing of the compiler. Its checkpoints (safetensors weights + JSON config +
tokenizer) are what `graphopt optimize` takes by default.
"""
