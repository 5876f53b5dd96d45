"""Store: the sparse delta a run produces.

`delta` (SparseDelta: build, apply, remove, add), `delta_format` (the folder on disk: safetensors
plus JSON, checked on load), `fingerprints` (hashes of the base tensors a delta depends on),
`files` (atomic writes), `model_card` (the folder's README.md), `hub` (deltas by hub id, upload),
`loading` (`unmask.load`: a base model with a delta applied), `peft_export` (a delta as an
adapter folder that stock peft loads).
"""
