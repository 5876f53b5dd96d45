"""Choose: which weights compete and how they are ranked.

`methods` (the strategies and the METHODS registry), `scores` (D3 and the other rankings),
`token_moments` (id3-snr's per-token statistics), `selection` (exact global top-k across tensors),
`schedules` (how many weights are unmasked by step t), `budget` (B from a count or fraction),
`candidates` (which parameters compete and which train whole).
"""
