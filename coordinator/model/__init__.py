"""The running model: master weights, versions and patches, pulls, and the blob store."""
