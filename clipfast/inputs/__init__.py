"""The input layer: everything between a user's images or texts and a tower's tensors.

- ``image_io``: the loading policy (any supported input to an RGB image, per-item failures).
- ``preprocess``: CPU resize / crop / normalise, pixel-exact to the source models' transforms.
- ``gpu_preprocess``: nvJPEG decode and the fused CUDA preprocessing kernel.
- ``tokenizer``: torch-free tokenizers that reproduce the source models' token ids.
- ``text_batching``: texts grouped by length so batches pad only as far as they must.
"""
