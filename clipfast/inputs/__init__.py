"""The input layer: everything between a user's images or texts and a tower's tensors.

- ``image_io``: the loading policy (any supported input to an RGB image, per-item failures).
- ``preprocess``: CPU resize / crop / normalise, pixel-exact to the source models' transforms.
- ``gpu_preprocess``: nvJPEG decode and the fused CUDA preprocessing kernel.
- ``pipeline``: the Engine's one image pipeline (``engine.images``): policy, decode path, pool,
  per-item failures, streaming; every front door prepares images through it.
- ``listing``: the one folder listing (order and skip rules) of ``encode`` and ``embed``.
- ``tokenizer``: torch-free tokenizers that reproduce the source models' token ids.
- ``text_batching``: texts grouped by length so batches pad only as far as they must.
"""
