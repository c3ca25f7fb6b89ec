"""Regularization images by retrieval: rank a local captioned image corpus by CLIP similarity to a class
prompt and copy the best ones, with their captions, into the layout the trainer's --reg-dir reads.

The corpus's image embeddings are cached in `<corpus>/.customdiff_index.safetensors`, keyed by each file's
relative name, modification time and size, and updated incrementally; the CLIP is identified by a content
fingerprint, so another CLIP rebuilds the index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from .data import IMAGE_EXTS, load_image
from .delta import atomic_save
from .errors import UserError
from .features import ClipFeatures
from .outputs import check_out, staged
from .validate import check_readable, read_text, warn

log = logging.getLogger(__name__)

INDEX_FILE = ".customdiff_index.safetensors"
INDEX_FORMAT = "customdiff.retrieval_index"
MARKER = ".retrieval.json"  # hidden: the trainer's folder reader skips dot files
SAVE_EVERY = 4096  # new embeddings between index saves, so an interrupted build keeps its work


def scan_corpus(corpus: Path) -> list[tuple[str, int, int]]:
    """(relative name, mtime_ns, size) of every image with a same-stem .txt caption, recursively, sorted."""
    if not corpus.is_dir():
        raise UserError(f"--corpus {corpus}: no such folder")
    found, uncaptioned, missing = [], 0, []
    for root, dirs, files in os.walk(corpus, onerror=_warn_unlisted_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = set(files)
        for f in sorted(files):
            p = Path(root, f)
            if f.startswith(".") or p.suffix.lower() not in IMAGE_EXTS or "\n" in f:
                continue
            if p.stem + ".txt" not in names:
                uncaptioned += 1
                continue
            try:
                st = p.stat()
            except OSError:  # a broken link, or a file removed while the walk ran
                missing.append(p)
                continue
            found.append((p.relative_to(corpus).as_posix(), st.st_mtime_ns, st.st_size))
    if uncaptioned:
        warn(f"{corpus}: skipped {uncaptioned} images without a same-stem .txt caption")
    if missing:
        warn(f"{corpus}: skipped {len(missing)} images whose files are gone (broken links?), e.g. {missing[0]}")
    return sorted(found)


def _warn_unlisted_folder(e: OSError) -> None:
    """os.walk's error hook: a folder that cannot be listed is left out with a warning, not an error."""
    warn(f"--corpus: {e.filename}: {e.strerror}; its images are left out")


def _load_index(path: Path, fingerprint: str) -> dict[tuple[str, int, int], Tensor]:
    """The cached embeddings keyed by (name, mtime_ns, size), or {} when absent, stale or of another CLIP."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != INDEX_FORMAT or meta.get("clip") != fingerprint:
            log.info("%s: made with another CLIP or format; rebuilding", path)
            return {}
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        warn(f"{path}: unreadable index ({e}); rebuilding")
        return {}
    names = t["names"].numpy().tobytes().decode("utf-8", "surrogateescape").split("\n") if t["names"].numel() else []
    keys = zip(names, t["mtime_ns"].tolist(), t["size"].tolist(), strict=True)
    return {k: row for k, row in zip(keys, t["features"], strict=True)}


def _save_index(path: Path, cache: dict[tuple[str, int, int], Tensor], fingerprint: str, dim: int) -> None:
    keys = sorted(cache)
    tensors = {
        "features": torch.stack([cache[k] for k in keys]) if keys else torch.empty(0, dim),  # (N, D)
        "names": torch.frombuffer(bytearray("\n".join(k[0] for k in keys).encode("utf-8", "surrogateescape")),
                                  dtype=torch.uint8) if keys else torch.empty(0, dtype=torch.uint8),
        "mtime_ns": torch.tensor([k[1] for k in keys], dtype=torch.int64),
        "size": torch.tensor([k[2] for k in keys], dtype=torch.int64),
    }
    if path.exists() and not os.access(path, os.W_OK):  # a rename would replace it all the same
        warn(f"cannot write the index {path} (the file is read-only); embeddings will be recomputed next time")
        return
    try:
        atomic_save(tensors, {"format": INDEX_FORMAT, "format_version": "1", "clip": fingerprint}, path)
    except OSError as e:  # a read-only corpus still works, only without the cache
        warn(f"cannot write the index {path} ({e.strerror}); embeddings will be recomputed next time")


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def build_index(corpus: str | Path, clip: ClipFeatures, index_path: str | Path | None = None,
                progress: bool = False, batch_size: int = 64,
                files: list[tuple[str, int, int]] | None = None) -> tuple[list[str], Tensor]:
    """Relative names and L2-normalised CLIP embeddings (N, D) of the corpus's captioned images (`files`: its
    scan_corpus, when the caller has it), embedding only files that are new or changed since the cached index
    (which is then updated)."""
    corpus = Path(corpus)
    path = Path(index_path) if index_path else corpus / INDEX_FILE
    files = scan_corpus(corpus) if files is None else files
    fp = clip.fingerprint()
    cached = _load_index(path, fp)
    cache = {k: cached[k] for k in files if k in cached}  # drops deleted and changed files
    todo = [k for k in files if k not in cache]
    log.info("%s: %d captioned images, %d cached, %d to embed", corpus, len(files), len(cache), len(todo))
    broken: set[tuple[str, int, int]] = set()
    since_save = 0
    with tqdm(total=len(todo), desc="index", disable=not progress or not todo) as bar:
        for keys in _batches(todo, batch_size):
            images, ok = [], []
            for k in keys:
                try:
                    images.append(load_image(corpus / k[0]))
                    ok.append(k)
                except UserError as e:
                    warn(f"skipping {e}")
                    broken.add(k)
            for k, row in zip(ok, clip.image_features(images), strict=True):
                cache[k] = row
            since_save += len(keys)
            bar.update(len(keys))
            if since_save >= SAVE_EVERY:
                _save_index(path, cache, fp, clip.dim)
                since_save = 0
    if todo or len(cache) != len(cached):
        _save_index(path, cache, fp, clip.dim)
    keys = [k for k in files if k not in broken]
    feats = torch.stack([cache[k] for k in keys]) if keys else torch.empty(0, clip.dim)
    return [k[0] for k in keys], feats


def top_k(feats: Tensor, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Scores and indices of the k rows of `feats` (N, D) with the largest inner product with `query` (D,);
    uses faiss when it is installed, torch otherwise."""
    try:
        import faiss  # optional: faster on large corpora
    except ImportError:
        scores = feats.float() @ query.float()  # (N,)
        return torch.topk(scores, k)
    index = faiss.IndexFlatIP(feats.shape[1])
    index.add(feats.float().contiguous().numpy())
    s, i = index.search(query.float().reshape(1, -1).contiguous().numpy(), k)
    return torch.from_numpy(s[0]), torch.from_numpy(i[0]).long()


def _check_out(out: Path, corpus: Path, index: Path | None) -> None:
    if out.resolve().is_relative_to(corpus.resolve()):
        raise UserError(f"--out {out}: inside the corpus {corpus}; its copies would be indexed again")
    check_out(out, "retrieve", MARKER)
    if index is None:  # the default index, corpus/.customdiff_index.safetensors, is ours to rebuild
        return
    if index.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--index {index}: inside --out {out}, which is replaced when the retrieval is published")
    if index.suffix != ".safetensors":
        raise UserError(f"--index {index}: the index file must end in .safetensors")
    if index.is_dir():
        raise UserError(f"--index {index}: is a folder; give a file name such as {index / INDEX_FILE.lstrip('.')}")
    if index.exists():
        check_readable(index)
        try:
            with safe_open(str(index), framework="pt") as f:
                kind = (f.metadata() or {}).get("format")
        except (SafetensorError, OSError):
            kind = None
        if kind != INDEX_FORMAT:
            raise UserError(f"--index {index}: exists and is not a retrieval index (format {kind!r}); it would be "
                            "overwritten: choose another file")


def check_retrieval(corpus: str | Path, class_prompt: str, n: int, out: str | Path,
                    index_path: str | Path | None = None) -> list[tuple[str, int, int]]:
    """Everything `retrieve` can check before CLIP loads (prompt, output, index file, enough captioned
    images); the corpus scan."""
    corpus, out = Path(corpus), Path(out)
    if n < 1:
        raise UserError("-n must be at least 1")
    if not class_prompt.strip():
        raise UserError("--class-prompt is empty; give a prompt such as 'photo of a cat'")
    _check_out(out, corpus, Path(index_path) if index_path else None)
    files = scan_corpus(corpus)
    if len(files) < n:
        raise UserError(f"--corpus {corpus}: only {len(files)} captioned images, fewer than -n {n}")
    return files


def retrieve(corpus: str | Path, class_prompt: str, n: int, out: str | Path, clip: ClipFeatures,
             index_path: str | Path | None = None, progress: bool = False,
             files: list[tuple[str, int, int]] | None = None) -> list[dict]:
    """Copy the n corpus images most similar to `class_prompt` into `out` as 000000.png + 000000.txt
    (caption), atomically; returns [{"file", "source", "caption", "score"}] best first. `files`: what
    check_retrieval returned, when the caller ran it."""
    corpus, out = Path(corpus), Path(out)
    if files is None:
        files = check_retrieval(corpus, class_prompt, n, out, index_path)
    names, feats = build_index(corpus, clip, index_path, progress, files=files)
    if len(names) < n:
        raise UserError(f"--corpus {corpus}: only {len(names)} captioned images, fewer than -n {n}")
    query = clip.text_features([class_prompt])[0]  # (D,)
    scores, idx = top_k(feats, query, n)
    items = []
    with staged(out, replace=True) as staging:
        for rank, (s, i) in enumerate(zip(scores.tolist(), idx.tolist(), strict=True)):
            src = corpus / names[i]
            dest = staging / f"{rank:06d}.png"
            if src.suffix.lower() == ".png":
                shutil.copyfile(src, dest)
            else:
                load_image(src).save(dest, format="PNG")
            caption = read_text(src.with_suffix(".txt"), "caption").strip()
            dest.with_suffix(".txt").write_text(caption + "\n")
            items.append({"file": dest.name, "source": names[i], "caption": caption, "score": s})
        (staging / MARKER).write_text(json.dumps({"corpus": str(corpus.resolve()), "class_prompt": class_prompt,
                                                  "clip": clip.path, "items": items}, indent=1) + "\n")
    log.info("copied %d images (scores %.4f to %.4f) to %s", n, items[0]["score"], items[-1]["score"], out)
    return items
