"""larpo-pipeline: iterative listwise alignment rounds (retrieve with vLLM, rerank, train)."""
