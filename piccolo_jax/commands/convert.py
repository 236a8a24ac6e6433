"""Convert BERT weights between Hugging Face PyTorch format and piccolo-jax model directories.

    piccolo-jax convert hf2jax HF_DIR OUT_DIR              # HF (safetensors or .bin) -> Orbax + config
    piccolo-jax convert hf2jax ORG/NAME[@REV] OUT_DIR      # a Hugging Face hub id: from the local cache
                                                           #   (downloaded first when online)
    piccolo-jax convert jax2hf MODEL_DIR HF_DIR            # ours (e.g. runs/finetune/export/model) ->
                                                           #   config.json + model.safetensors + tokenizer
                                                           #   + sentence-transformers files

From a clone without installing, `python conversion/convert.py ...` takes the same arguments.

Output is written to a temporary directory and renamed only when complete; a failure leaves nothing.
The sentence-transformers files (max_seq_length, prompts in config_sentence_transformers.json) go both ways.
"""

from __future__ import annotations

import sys
from pathlib import Path

from piccolo_jax.commands.errors import Parser


def hf2jax(hf_dir: str, out_dir: str, overwrite: bool = False) -> None:
    from piccolo_jax.io.hub import resolve_model_path

    source = hf_dir
    hf_dir = str(resolve_model_path(hf_dir))  # a hub id -> its snapshot; a missing one: one line before JAX
    from piccolo_jax.hf import ST_FILES, load_hf_model
    from piccolo_jax.model.bert import count_params
    from piccolo_jax.model.directory import copy_side_files, save_model_dir

    check_tokenizer_files(hf_dir)  # a truncated tokenizer.json is refused, not copied
    cfg, params, report = load_hf_model(hf_dir)
    keep_st_files = lambda tmp: copy_side_files(Path(hf_dir), tmp, ST_FILES)  # noqa: E731
    save_model_dir(out_dir, cfg, params, side_files_from=hf_dir, overwrite=overwrite, extra=keep_st_files)
    print(f"hf2jax: {source} -> {out_dir}: {count_params(params):,} parameters, "
          f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}, pooling={cfg.pooling}, "
          f"normalize={cfg.normalize}, pooler={cfg.add_pooler}")
    if report["ignored_buffers"] or report["ignored_head_tensors"]:
        print(f"hf2jax: not part of the encoder and not converted: {report['ignored_buffers']} buffer(s) "
              f"(position_ids), {report['ignored_head_tensors']} pre-training head tensor(s) (cls.*)")


def jax2hf(model_dir: str, hf_dir: str, overwrite: bool = False, max_seq_length: int | None = None) -> None:
    from piccolo_jax.hf import write_hf_dir
    from piccolo_jax.model.bert import count_params
    from piccolo_jax.model.directory import load_model_dir

    check_tokenizer_files(model_dir)
    cfg, params = load_model_dir(model_dir)
    write_hf_dir(hf_dir, cfg, params, side_files_from=model_dir, overwrite=overwrite,
                 max_seq_length=max_seq_length)
    print(f"jax2hf: {model_dir} -> {hf_dir}: {count_params(params):,} parameters; "
          f"loadable with transformers.BertModel and sentence_transformers.SentenceTransformer")


def check_tokenizer_files(path: str | Path) -> None:
    """Refuse (ValueError naming the file) a directory whose tokenizer files the project's Tokenizer cannot
    load: a truncated or corrupt tokenizer.json, vocab.txt or tokenizer config. A directory without a
    tokenizer passes (conversion does not need one)."""
    from piccolo_jax.io.storage import as_path, local_copy
    from piccolo_jax.model.directory import TOKENIZER_FILES
    from piccolo_jax.text.tokenizer import Tokenizer

    path = as_path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        return
    Tokenizer.from_dir(local_copy(path, TOKENIZER_FILES))


def main(argv: list[str] | None = None, prog: str | None = None) -> int | None:
    parser = Parser(prog=prog or "piccolo-jax convert", description=__doc__)  # one-line usage errors, exit 2
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hf2jax", help="Hugging Face directory -> piccolo-jax model directory")
    p.add_argument("hf_dir", help="directory with config.json and model.safetensors or pytorch_model.bin, or a "
                   "Hugging Face hub id ORG/NAME[@REVISION] (the local cache first; HF_HUB_OFFLINE=1: the cache only)")
    p.add_argument("out_dir", help="new piccolo-jax model directory")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p = sub.add_parser("jax2hf", help="piccolo-jax model directory -> Hugging Face directory")
    p.add_argument("model_dir", help="piccolo-jax model directory (config.json + params/)")
    p.add_argument("hf_dir", help="new Hugging Face directory")
    p.add_argument("--overwrite", action="store_true", help="replace hf_dir if it exists")
    p.add_argument("--max-seq-length", type=int, default=None,
                   help="sentence-transformers max_seq_length when the source has no sentence_bert_config.json")
    args = parser.parse_args(argv)  # usage errors: exit 2 before JAX is imported
    try:
        if args.command == "hf2jax":
            hf2jax(args.hf_dir, args.out_dir, args.overwrite)
        else:
            jax2hf(args.model_dir, args.hf_dir, args.overwrite, args.max_seq_length)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # hf.ConversionError is a ValueError
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
