"""TensorRT in one place: ``build`` turns an artifact's ONNX graphs into engines (``clipfast
build-engines``), ``backend`` runs them, ``cudart`` is the thin CUDA runtime binding both use."""
