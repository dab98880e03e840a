"""MovieLens on demand: a missing Data/ml-1m or Data/ml-10m ratings.dat is downloaded,
checked and unpacked so that an interrupted download never leaves a ratings file."""
from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ratings.rating_files import MODE_LAYOUTS, RAW_FORMATS_HELP, DataError, describe_layout

MOVIELENS_URLS = {
    "ml-1m": "http://files.grouplens.org/datasets/movielens/ml-1m.zip",
    "ml-10m": "http://files.grouplens.org/datasets/movielens/ml-10m.zip",
}
DATA_ROOT = Path("Data")          # relative to the working directory, as in the reference
DOWNLOAD_TIMEOUT_S = 60.0


def download_movielens(dataset: str, folder: Path, url: str | None = None,
                       timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download ``dataset`` (ml-1m or ml-10m) and unpack its files into ``folder``.

    The archive goes to a temporary folder beside ``folder``, is checked (zip CRCs, a
    ratings.dat member) and unpacked there; its files are then moved into ``folder`` with
    ratings.dat last, so a failed or interrupted download never leaves a ratings.dat behind.
    """
    url = url or MOVIELENS_URLS[dataset]
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dataset}-download-", dir=folder.parent))
    try:
        archive = work / f"{dataset}.zip"
        _fetch(url, archive, timeout, dataset, folder)
        unpacked = _unpack_checked(archive, work / "unpacked", url)
        _move_files(unpacked, folder, last="ratings.dat")
    except DataError as error:
        raise DataError(f"{error}. To get the data by hand, download {MOVIELENS_URLS[dataset]} "
                        f"elsewhere and unzip it so that {folder / 'ratings.dat'} exists (README, "
                        "section Datasets), or give a mirror with --download_url=URL") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fetch(url: str, target: Path, timeout: float, dataset: str, folder: Path) -> None:
    """Stream ``url`` into ``target`` with a progress bar; DataError on any failure."""
    print(f"{folder / 'ratings.dat'} is missing: downloading {dataset} from {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=expected or None, unit="B", unit_scale=True, desc=dataset) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as error:
        raise DataError(f"downloading {url} failed: HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException) as error:   # URLError, timeouts, cut connections
        reason = getattr(error, "reason", error)
        raise DataError(f"cannot download {url} (no network? {reason})") from None
    received = target.stat().st_size
    if expected and received != expected:
        raise DataError(f"the download of {url} stopped after {received:,} of {expected:,} bytes; "
                        "run again")


def _unpack_checked(archive: Path, target: Path, url: str) -> Path:
    """Check and unpack the zip; return the unpacked folder that holds ratings.dat."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            broken = zipped.testzip()
            if broken is not None:
                raise DataError(f"the archive from {url} is corrupt ({broken} fails its CRC "
                                "check); run again or use another --download_url")
            ratings = [n for n in zipped.namelist() if PurePosixPath(n).name == "ratings.dat"]
            if not ratings:
                raise DataError(f"the archive from {url} has no ratings.dat; is it a MovieLens zip?")
            zipped.extractall(target)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DataError(f"the archive from {url} is not a valid zip ({error}); it may be "
                        "truncated: run again or use another --download_url") from None
    return (target / ratings[0]).parent


def _move_files(source: Path, folder: Path, last: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((p for p in source.iterdir() if p.is_file()), key=lambda p: p.name == last)
    for file in files:
        os.replace(file, folder / file.name)


def ensure_data_file(data_path: str, mode: str, download_url: str | None) -> Path:
    """The rating file to read; MovieLens is downloaded into Data/<mode>/ when missing there."""
    path = Path(data_path)
    if path.is_dir():
        raise DataError(f"--data_path={data_path} is a folder; point it at the rating file")
    if path.is_file():
        return path
    default_folder = DATA_ROOT / mode
    if mode in MOVIELENS_URLS and default_folder.resolve() in path.resolve().parents:
        download_movielens(mode, default_folder, download_url)
        if path.is_file():
            return path
        raise DataError(f"the {mode} archive has no {path.relative_to(default_folder)}; "
                        f"use --data_path={default_folder / 'ratings.dat'}")
    raise DataError(f"--data_path={data_path} does not exist. " + _missing_file_hint(mode))


def _missing_file_hint(mode: str) -> str:
    if mode in MOVIELENS_URLS:
        return (f"Point it at a MovieLens ratings.dat, or use --data_path=./Data/{mode}/ratings.dat, "
                "which is downloaded automatically (README, section Datasets)")
    return (f"Put {describe_layout(MODE_LAYOUTS[mode])} there (see Data/README.md and the README, "
            f"section Datasets), or point --data_path at one of: {RAW_FORMATS_HELP}")

