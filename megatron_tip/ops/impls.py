"""The chunk-kernel implementations the ops offer (``scoring.ops_impl``), torch-free so the config reads them."""

IMPLS = ("auto", "eager", "compiled")
