"""graphopt.frontends: models users have -> graphopt IR (PyTorch modules, Hugging Face
folders, graphopt training checkpoints, state-dict files). torch/transformers are imported
inside the functions that need them."""
