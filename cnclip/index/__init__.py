"""The index layer: the SQLite catalog, the folder scan, FAISS vectors (in RAM and on disk), Ray
embedding, and `Index`, the index-folder API that ties them together."""
