"""The Hugging Face bridge: BERT directories in PyTorch format (safetensors / .bin) <-> our parameter tree.

    from piccolo_jax.hf import load_hf_model, write_hf_dir
    cfg, params, report = load_hf_model("path/to/hf_dir")        # numpy float32, ignored tensors counted
    write_hf_dir("out_hf", cfg, params, side_files_from="path/to/tokenizer")

`name_table` is the declarative HF <-> ours name map; `io` reads and writes the directories; `prompts`
reads and writes sentence-transformers' query / document prompts.
"""

from piccolo_jax.hf.io import (  # noqa: F401
    ST_FILES,
    ConversionError,
    hf_to_params,
    load_hf_config,
    load_hf_model,
    params_to_hf,
    read_hf_tensors,
    write_hf_dir,
)
