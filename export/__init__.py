"""clipfast export side (installed as ``clipfast.export``): needs torch and the model sources.

Imported lazily by the CLI; the runtime never imports it unless the torch backend is chosen.
"""
