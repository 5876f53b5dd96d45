"""Optimize: the selected weights' O(B) state and the masked step.

`optimizer` (SelectiveOptimizer, which composes the rest), `selector`, `ranking`, `slots`,
`index_space`, `repeat`, `gradient_tap` (low-memory mode), `backward_switch` and
`sparse_backward` (the cheaper backward once the mask is known), `gradients`, `calibration` (FISH),
`sharding` (FSDP2), `checkpoint` (the state_dict), `inner_optimizer`, `slot_adamw`.
"""
