"""graphopt.backends: lowerings and runtimes -- ONNX Runtime (`backends/onnxruntime`) and TVM
(`backends/tvm`). The eager PyTorch baseline lives with the frontends and train/; the reference
interpreter is `graphopt.interpreter`. A backend imports only the graphopt core and its own
runtime library."""
