"""The volunteer side: probe the GPU, train one task, upload the adapter."""
