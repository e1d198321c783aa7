"""The read side: search over the stored vectors (exact scan or Atlas), BM25 for hybrid search,
the local vector cache, and the catalog (export, delete)."""
