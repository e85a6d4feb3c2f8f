"""The encoder: one vision tower for every Qwen family, its configuration, weights and kernels.

    config.py       EncoderConfig / PreprocessConfig: typed, frozen; a family is configuration
    presets.py      the named models of ``configs/*.toml``
    checkpoint.py   where weights come from (local folders, safetensors, sharded indexes, the Hub cache)
    model.py        the tower, read top to bottom like the paper (+ geometry.py: per-grid tables;
                    attention.py: varlen attention and 2D rotary)
    kernels.py      the fastest kernel per device and weight shape (+ kernel_choice.py: timed once per machine;
                    rotary_triton.py: the CUDA rotary kernel)
    features.py     which outputs a run keeps (patch, merged, deepstack, block:N) and their token orders
    inference.py    device, dtype and loading: an ``Encoder`` ready to run

Nothing here imports the pipeline, the storage format or the CLI.
"""
