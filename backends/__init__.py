"""graphopt.backends: lowerings and runners (onnxruntime, tvm, torch eager baseline,
reference). A backend imports only the graphopt core and its own runtime library."""
