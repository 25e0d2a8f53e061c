"""The model layer: configs, the two towers, checkpoints, tokenizer, image transform, ONNX and runtime choice.

Nothing here knows about indexes or training. Submodules are imported where they are used, so
that the torch-free ones (`onnx_runtime`, `tokenizer`, `runtime`) load without torch.
"""
