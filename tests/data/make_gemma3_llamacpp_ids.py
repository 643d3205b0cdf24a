"""Makes ``gemma3_llamacpp_ids.json.gz``: llama.cpp's own tokenization of the verification sentences.

Run once, outside CI (llama-cpp-python compiles llama.cpp, which takes minutes), in two steps:

    python tests/data/make_gemma3_llamacpp_ids.py texts /tmp/texts.json               # env with ofa_kernels
    <venv with llama-cpp-python>/bin/python tests/data/make_gemma3_llamacpp_ids.py ids /tmp/texts.json \\
        ~/.cache/ofa_kernels/gguf/gemma-3-270m-q4_k_m.gguf

The second step needs only the standard library and ``llama_cpp``: llama.cpp reads the GGUF and
tokenises with its own code (vocab only, no BOS, control-token spellings as text).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "gemma3_llamacpp_ids.json.gz"


def texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def main(argv: list[str]) -> None:
    if argv[0] == "texts":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from test_gguf_tokenizer import verification_texts

        Path(argv[1]).write_text(json.dumps(verification_texts()))
        return
    import llama_cpp

    texts = json.loads(Path(argv[1]).read_text())
    vocab = llama_cpp.Llama(model_path=argv[2], vocab_only=True, verbose=False)
    ids = [vocab.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    doc = {"what": f"{Path(argv[2]).name} tokenised by llama-cpp-python {llama_cpp.__version__}: "
                   "Llama(vocab_only=True).tokenize(text, add_bos=False, special=False)",
           "texts_sha256": texts_sha256(texts), "ids": ids}
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write(json.dumps(doc, separators=(",", ":")).encode())


if __name__ == "__main__":
    main(sys.argv[1:])
