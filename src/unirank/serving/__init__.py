"""How the ranker is exported and answered: ONNX export (export.py), Triton model repositories
(model_repository.py, model.py.tmpl), the bundled tritonserver (server.py), the typed gRPC client
(client.py) and the numpy request rules shared by client and server (request_arrays.py)."""
