"""Pack a saved model folder as bf16 safetensors shards of <= 14 MB plus one small tar, for a
transfer that limits file sizes and counts:
    python benchmarks/recurrent/export_model.py MODEL_DIR OUT NAME
writes OUT/NAME-meta.tar (config, shard index, tokenizer) and OUT/NAME--model-*.safetensors;
    python benchmarks/recurrent/export_model.py --unpack OUT NAME DEST
puts them back together as the folder DEST/NAME (loadable with from_pretrained, and as
`longreach train --init-from`).
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path


def pack(src: Path, out: Path, name: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    import longreach  # noqa: F401  (registers longreach's models with the Auto classes)

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    AutoModelForCausalLM.from_pretrained(src).to(torch.bfloat16).save_pretrained(
        tmp, max_shard_size="14MB")
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, tmp / f.name)
    with tarfile.open(out / f"{name}-meta.tar", "w") as t:
        for f in sorted(tmp.iterdir()):
            if f.suffix != ".safetensors":
                t.add(f, arcname=f"{name}/{f.name}")
    for f in tmp.glob("*.safetensors"):
        shutil.move(f, out / f"{name}--{f.name}")
    shutil.rmtree(tmp)
    return sorted(p.name for p in out.glob(f"{name}[-.]*"))


def unpack(out: Path, name: str, dest: Path) -> Path:
    with tarfile.open(out / f"{name}-meta.tar") as t:
        t.extractall(dest, filter="data")
    for f in out.glob(f"{name}--*.safetensors"):
        shutil.copy(f, dest / name / f.name.split("--", 1)[1])
    return dest / name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unpack", action="store_true")
    p.add_argument("paths", nargs=3)
    args = p.parse_args()
    if args.unpack:
        print(unpack(Path(args.paths[0]), args.paths[1], Path(args.paths[2])))
    else:
        print(pack(Path(args.paths[0]), Path(args.paths[1]), args.paths[2]))


if __name__ == "__main__":
    main()
