"""Store: the sparse delta a run produces.

`delta` (SparseDelta: build, apply, remove, add), `delta_format` (the folder on disk: safetensors
plus JSON, checked on load), `fingerprints` (hashes of the base tensors a delta depends on),
`files` (atomic writes).
"""
