"""The artifact layer: what an export writes and what every runtime path trusts.

- ``spec``: the manifest's typed schema (``ArtifactSpec``), the one place its fields are declared
  and validated; ``sections``: the typed graph, gates, quantization and tensorrt records, and the
  reading/writing machinery that makes a rewritten manifest byte-identical.
- ``manifest``: reading an artifact from disk: checksums, containment, the loaded ``Manifest``.
- ``onnx_proto``: the ONNX wire-format reader that lists a graph's external data files.
- ``selfcheck`` / ``fidelity`` / ``samples``: the golden self-check an artifact runs on the host
  that loads it, the metrics it uses and the generated inputs it measures with.
- ``cache``: where per-artifact caches (TensorRT engines, provider caches) live.
"""
