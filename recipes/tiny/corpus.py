"""Pretraining text: Debian's `fortunes` (English) and `fortunes-zh` (Chinese) packages, fetched by version and
checked by SHA-256, split into quotes, cleaned and divided deterministically into train and held-out parts.

The packages come from the Debian archive with `apt-get download` (any Debian/Ubuntu machine with the bookworm
sources), or from a directory that already holds the three .deb files (`--debs`). See recipes/tiny/DATA.md.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DebianPackage:
    """One pinned .deb: name, exact version, the file name apt writes and its SHA-256."""

    name: str
    version: str
    filename: str
    sha256: str


PACKAGES = (
    DebianPackage("fortunes", "1:1.99.1-7.3", "fortunes_1%3a1.99.1-7.3_all.deb",
                  "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
    DebianPackage("fortunes-min", "1:1.99.1-7.3", "fortunes-min_1%3a1.99.1-7.3_all.deb",
                  "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07"),
    DebianPackage("fortunes-zh", "2.98", "fortunes-zh_2.98_all.deb",
                  "211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"),
)
CHINESE_FILES = ("chinese", "tang300", "song100")
# Pictures made of characters and the multilingual "translate me" file teach nothing a tiny model can use.
SKIPPED_FILES = ("ascii-art", "translate-me")
FORTUNE_DIR = Path("usr/share/games/fortunes")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_packages(dest: Path, debs_dir: Path | None = None) -> list[Path]:
    """The three pinned .deb files in `dest`: copied from `debs_dir`, else downloaded with `apt-get download`."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for pkg in PACKAGES:
        path = dest / pkg.filename
        if not path.is_file() and debs_dir is not None:
            source = Path(debs_dir) / pkg.filename
            if not source.is_file():
                raise FileNotFoundError(f"{source}: not found; --debs must hold {', '.join(p.filename for p in PACKAGES)}")
            shutil.copy2(source, path)
        if not path.is_file():
            if shutil.which("apt-get") is None:
                raise FileNotFoundError(
                    f"{pkg.filename} is needed and apt-get is not available here; download it from "
                    f"https://deb.debian.org/debian/pool/main/ and pass its directory with --debs"
                )
            subprocess.run(["apt-get", "download", f"{pkg.name}={pkg.version}"], cwd=dest, check=True,
                           stdout=subprocess.DEVNULL)
        digest = sha256_of(path)
        if digest != pkg.sha256:
            raise ValueError(f"{path}: SHA-256 {digest} differs from the pinned {pkg.sha256}; refusing other data")
        paths.append(path)
    return paths


def extract_fortune_files(debs: list[Path], dest: Path) -> Path:
    """Unpack the packages (`dpkg-deb -x`) and return the directory of fortune files."""
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest / FORTUNE_DIR


def clean(text: str) -> str:
    """Strip terminal colour codes, trailing spaces and runs of blank lines."""
    text = _ANSI.sub("", text).replace("\r", "")
    text = _TRAILING_SPACE.sub("\n", text)
    return _BLANK_LINES.sub("\n\n", text).strip()


def split_fortunes(text: str) -> list[str]:
    """A fortune file is quotes separated by lines holding a single '%'."""
    quotes = [clean(q) for q in re.split(r"^%$", text, flags=re.MULTILINE)]
    return [q for q in quotes if q]


def read_fortunes(fortune_dir: Path) -> tuple[list[str], list[str]]:
    """(English quotes, Chinese quotes), deduplicated, in a fixed order."""
    english: dict[str, None] = {}
    chinese: dict[str, None] = {}
    for path in sorted(fortune_dir.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name in SKIPPED_FILES or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        target = chinese if path.name in CHINESE_FILES else english
        for quote in split_fortunes(text):
            target.setdefault(quote)
    return list(english), list(chinese)


def is_held_out(text: str, percent: int) -> bool:
    """Stable split: a quote is held out iff its SHA-256 falls in the first `percent` of 100 buckets."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100 < percent


@dataclass
class Corpus:
    """Cleaned quotes, split into train and held-out."""

    train_en: list[str]
    train_zh: list[str]
    heldout_en: list[str]
    heldout_zh: list[str]


def build_corpus(work_dir: Path, debs_dir: Path | None = None, heldout_percent: int = 5) -> Corpus:
    """Fetch, verify, unpack and split the fortune packages under `work_dir`."""
    debs = fetch_packages(work_dir / "debs", debs_dir)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        english, chinese = read_fortunes(extract_fortune_files(debs, Path(tmp)))
    return Corpus(
        train_en=[q for q in english if not is_held_out(q, heldout_percent)],
        train_zh=[q for q in chinese if not is_held_out(q, heldout_percent)],
        heldout_en=[q for q in english if is_held_out(q, heldout_percent)],
        heldout_zh=[q for q in chinese if is_held_out(q, heldout_percent)],
    )
