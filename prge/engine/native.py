"""The native (C++) device trainer: build it, feed it, run it, turn its B into PEFT adapters.

`prge/engine/native/` is `prge.engine.runtime.device_train` written in C++ against the ExecuTorch
runtime that the `executorch` pip wheel ships (runtime + optimized kernels + XNNPACK, found with
`find_package(executorch)` in `<executorch package>/share/cmake`; JSON with nlohmann-json): main.cpp
(entry), loop.cpp (prge/run/loop.py's rules), readout.cpp (the label readout after the loop; SVD with Eigen), program.cpp (loading and the program's
self-description), data.cpp (data file and plan), options.cpp, safetensors.cpp, sha256.cpp (OpenSSL SHA-256 checks), files.cpp, and
weight_cache.cpp (XNNPACK's shared packed weights, also built as a library for the Python loop).
This module:

    build()              configures and builds it with cmake into ~/.cache/prge/native/<key>
                         (key: a hash of the sources and the executorch version; reused if present)
    write_plan(...)      the step plan: the example indices of every step, which `batch.step_indices`
                         draws with Python's seeded shuffles (the C++ side does not reimplement them)
    native_train(...)    writes the plan, runs the binary, writes the adapters and summary.json:
                         the same run folder as `device_train`

Plan file (safetensors; the wrapper writes it to a temporary folder): `indices` int32 (steps, b), row s-1 = the train-example indices of step s;
`seed` int64 (1,); with the label readout, `readout_indices` int32 (readout steps × 16,), its rows (`readout.rows_order`). The binary refuses a plan for another seed, b or data size, or one shorter than
--steps. The data file is `prge.engine.formats.write_dataset`'s; the program must have noise "counter".

The binary writes, besides metrics.jsonl and checkpoints/{last,best}/{state.safetensors,
trainer_state.json} (the same files and fields as device_train, so either loop resumes the other's
checkpoints), `b.safetensors` {b (total,)} in each checkpoint, `final_b.safetensors` {b, g} and
`native.json` (seconds, mean step seconds, peak RSS). `native_train` turns every b.safetensors into
the PEFT adapter folder beside it with `device.write_adapter`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import prge
from prge import io
from prge.data.batch import step_indices
from prge.engine.formats import (check_manifest_fields, manifest_path, check_data_shapes, check_manifest, load_manifest, lora_a_path, read_dataset, verify_program,
                                  write_adapter)
from prge.errors import PrgeError
from prge.run.lock import run_lock

SOURCE_DIR = Path(__file__).resolve().parent / "native"  # package data: a non-editable install builds too
BINARY = "prge-native-train"


def executorch_cmake_dir() -> Path:
    """`<executorch package>/share/cmake`, where the wheel's `executorch-config.cmake` lives."""
    try:
        import executorch
    except ImportError:
        raise PrgeError("the executorch package is not installed", "pip install executorch") from None
    for root in list(getattr(executorch, "__path__", [])):
        d = Path(root) / "share" / "cmake"
        if (d / "executorch-config.cmake").is_file():
            return d
    raise PrgeError("the installed executorch package has no share/cmake/executorch-config.cmake",
                    "install an executorch wheel that ships its C++ runtime (1.5 or later)")


def _cache_root() -> Path:
    return Path(os.environ.get("PRGE_CACHE", Path.home() / ".cache" / "prge")) / "native"


def build_command(build_dir: str | os.PathLike, jobs: int = 2) -> list[list[str]]:
    cm = executorch_cmake_dir()
    return [["cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", f"-Dexecutorch_DIR={cm}"],
            ["cmake", "--build", str(build_dir), f"-j{jobs}"]]


def build(build_dir: str | os.PathLike | None = None, jobs: int = 2, force: bool = False, log=None,
          target: str | None = None) -> Path:
    """Build the binary (if not built already for these sources and this executorch); its path.
    `target=WEIGHT_CACHE_LIB` builds only the weight-cache library (seconds) and returns its path."""
    log = log or (lambda m: None)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise PrgeError(f"{tool} not found: the native trainer is built with cmake and a C++17 compiler",
                            "install them (Debian: apt-get install cmake g++)")
    if build_dir is None:
        h = hashlib.sha256()
        for f in sorted(SOURCE_DIR.glob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        h.update(str(executorch_cmake_dir()).encode())
        try:
            from importlib.metadata import version

            h.update(version("executorch").encode())
        except Exception:
            pass
        build_dir = _cache_root() / h.hexdigest()[:16]
    build_dir = Path(build_dir)
    exe = build_dir / (f"lib{target}.so" if target else BINARY)
    if exe.is_file() and not force:
        return exe
    t0 = time.time()
    cmds = build_command(build_dir, jobs)
    if target:
        cmds[-1] += ["--target", target]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            raise PrgeError(f"building the native trainer failed ({' '.join(cmd[:2])} ...):\n{tail}",
                            "check the toolchain (g++ >= 9, cmake >= 3.19) and the executorch install")
    log(f"built {exe} in {time.time() - t0:.0f} s")
    return exe


# cross builds: arch -> (compiler, toolchain file, wheel platform tag, ELF e_machine)
CROSS = {"aarch64": ("aarch64-linux-gnu-g++", "aarch64-linux-gnu.cmake", "manylinux_2_28_aarch64", 0xB7)}
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64"}


def cross_build(arch: str = "aarch64", jobs: int = 2, force: bool = False, log=None) -> Path:
    """Build the trainer for another architecture (Debian's cross compiler) against that
    architecture's executorch wheel (same version as installed here, downloaded once with pip into
    the cache and unpacked: its lib/, include/ and share/cmake are all the build needs). The binary."""
    import zipfile
    from importlib.metadata import version

    log = log or (lambda m: None)
    if arch not in CROSS:
        raise PrgeError(f"no cross build for {arch!r}", f"choose one of {', '.join(CROSS)}")
    compiler, toolchain, platform_tag, _ = CROSS[arch]
    for tool in ("cmake", compiler):
        if shutil.which(tool) is None:
            raise PrgeError(f"{tool} not found: the {arch} trainer is cross-built with cmake and {compiler}",
                            f"install them (Debian: apt-get install cmake g++-{arch}-linux-gnu)")
    et_version = version("executorch")
    root = _cache_root() / f"{arch}-executorch-{et_version}"
    package = root / "executorch"
    if not (package / "share" / "cmake" / "executorch-config.cmake").is_file():
        wheels = root / "wheel"
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
               "--platform", platform_tag, "--python-version", "3.11", f"executorch=={et_version}", "-d", str(wheels)]
        log(f"downloading the {arch} executorch {et_version} wheel")
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("executorch-*.whl"))
        if r.returncode != 0 or not found:
            raise PrgeError(f"cannot download the {arch} executorch {et_version} wheel ({(r.stderr.strip().splitlines() or ['?'])[-1]})",
                            f"check the network, or unpack the wheel's executorch/ folder into {package}")
        with zipfile.ZipFile(found[0]) as z:
            z.extractall(root, [n for n in z.namelist() if n.startswith(("executorch/lib/", "executorch/include/", "executorch/share/"))])
    # nlohmann/ alone on the include path: the host's /usr/include must not leak into a cross build
    json_include = root / "json-include"
    if not (json_include / "nlohmann" / "json.hpp").exists():
        header = next((Path(d) / "nlohmann" for d in ("/usr/include", "/usr/local/include") if (Path(d) / "nlohmann" / "json.hpp").is_file()), None)
        if header is None:
            raise PrgeError("nlohmann/json.hpp not found", "install it (Debian: apt-get install nlohmann-json3-dev)")
        json_include.mkdir(parents=True, exist_ok=True)
        (json_include / "nlohmann").symlink_to(header)
    # Eigen (header-only): its own folder, which holds nothing else
    eigen = next((Path(d) for d in ("/usr/include/eigen3", "/usr/local/include/eigen3") if (Path(d) / "Eigen" / "SVD").is_file()), None)
    if eigen is None:
        raise PrgeError("Eigen's headers (eigen3/Eigen/SVD) not found", "install them (Debian: apt-get install libeigen3-dev)")
    ssl = _target_openssl(arch, root, log)
    h = hashlib.sha256(arch.encode() + et_version.encode() + repr(ssl).encode())
    for f in sorted(SOURCE_DIR.glob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    build_dir = _cache_root() / f"{arch}-{h.hexdigest()[:16]}"
    exe = build_dir / BINARY
    if exe.is_file() and not force:
        return exe
    t0 = time.time()
    for cmd in ([["cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                  f"-DCMAKE_TOOLCHAIN_FILE={SOURCE_DIR / toolchain}", f"-Dexecutorch_DIR={package / 'share' / 'cmake'}",
                  f"-DPRGE_JSON_INCLUDE={json_include}", f"-DPRGE_EIGEN_INCLUDE={eigen}",
                  # the target's libcrypto, or none: the host's must never be picked up
                  *([f"-DPRGE_OPENSSL_INCLUDE={ssl[0]}", f"-DPRGE_OPENSSL_CRYPTO={ssl[1]}"] if ssl
                    else ["-DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON"])],
                 ["cmake", "--build", str(build_dir), f"-j{jobs}", "--target", BINARY]]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            raise PrgeError(f"cross-building the {arch} trainer failed ({' '.join(cmd[:2])} ...):\n{tail}",
                            f"check {compiler} and the unpacked wheel in {package}")
    log(f"built {exe} for {arch} in {time.time() - t0:.0f} s" + ("" if ssl else " (without SHA-256 checks: sizes and shapes only)"))
    return exe


DEB_ARCH = {"aarch64": "arm64"}


def _target_openssl(arch: str, root: Path, log) -> tuple[str, str] | None:
    """(include folder holding only openssl/, static libcrypto.a) for the target, or None.

    The target's libcrypto comes from Debian's libssl-dev:<arch>: already installed through multiarch,
    or else downloaded once with `apt-get download` and extracted into the cache with `dpkg -x`, never
    installed (installing it also installs the target's libc6, after which qemu-user ran every aarch64
    binary here many times slower). `apt-get download` needs the architecture known to dpkg
    (`dpkg --add-architecture arm64 && apt-get update`, which installs nothing); without it the build
    goes on without SHA-256 checks and says how to get them. Static linking keeps the binary free of a
    runtime libcrypto on the board."""
    triplet, deb_arch = f"{arch}-linux-gnu", DEB_ARCH[arch]
    candidates = [Path("/"), root / f"libssl-dev-{deb_arch}"]
    if not any((c / "usr/lib" / triplet / "libcrypto.a").is_file() for c in candidates) and shutil.which("apt-get") and shutil.which("dpkg"):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            r = subprocess.run(["apt-get", "download", "-qq", f"libssl-dev:{deb_arch}"], cwd=tmp, capture_output=True, text=True)
            debs = sorted(Path(tmp).glob("libssl-dev_*.deb"))
            if r.returncode == 0 and debs:
                into = Path(tmp) / "x"
                if subprocess.run(["dpkg", "-x", str(debs[0]), str(into)], capture_output=True).returncode == 0:
                    shutil.rmtree(candidates[1], ignore_errors=True)
                    into.rename(candidates[1])
                    log(f"extracted {debs[0].name} into {candidates[1]}")
    for c in candidates:
        lib, own, shared = c / "usr/lib" / triplet / "libcrypto.a", c / "usr/include" / triplet / "openssl", c / "usr/include/openssl"
        if not (lib.is_file() and own.is_dir() and (shared / "evp.h").is_file()):
            continue
        inc = root / f"openssl-include-{'system' if c == Path('/') else 'extracted'}"
        folder = inc / "openssl"
        if not (folder / "configuration.h").exists():
            shutil.rmtree(inc, ignore_errors=True)
            folder.mkdir(parents=True)
            for d in (shared, own):  # the target's configuration.h last: it wins
                for f in d.iterdir():
                    target = folder / f.name
                    if target.is_symlink() or target.exists():
                        target.unlink()
                    target.symlink_to(f)
        return str(inc), str(lib)
    log(f"no {arch} libcrypto: building without SHA-256 checks (to get them: dpkg --add-architecture {deb_arch} && "
        f"apt-get update, then rebuild; prge extracts libssl-dev:{deb_arch} into {candidates[1]} without installing it)")
    return None


def binary_machine(exe: str | os.PathLike) -> str | None:
    """The architecture an ELF binary is built for ("x86_64", "aarch64"), or None if not an ELF file."""
    with open(exe, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        return None
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), f"ELF machine {int.from_bytes(head[18:20], 'little'):#x}")


def check_runs_here(exe: str | os.PathLike) -> None:
    """Refuse a binary built for another architecture with one line, before running it."""
    import platform

    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    built = binary_machine(exe)
    if built is not None and built != here:
        raise PrgeError(f"{exe} is built for {built}, but this machine is {here}",
                        "build the trainer here (python -m prge.engine.native build), or run it through an emulator "
                        f"(launcher=['qemu-{built}', '-L', '/usr/{built}-linux-gnu'])")


def hashing_available(exe: str | os.PathLike) -> bool:
    """Whether the binary checks SHA-256 hashes (built with OpenSSL's libcrypto; its --help says)."""
    import subprocess

    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    return "SHA-256: the program" in r.stdout


WEIGHT_CACHE_LIB = "prge_weight_cache"
_weight_cache_lib = None


def set_weight_cache(on: bool, log=None) -> bool:
    """Switch XNNPACK's shared packed-weight cache on or off for programs this process loads next
    (`weight_cache.h`: the methods of a program then share one packed copy of the weights).

    `executorch.runtime` has no API for backend options, so this loads a small library built from
    the native sources (cmake and a C++ compiler, cached like the trainer) that calls the runtime's
    public `set_option` in the wheel's shared libexecutorch.so, the one the Python bindings use.
    Returns whether the option was set; without a toolchain it logs why and returns False."""
    global _weight_cache_lib
    import ctypes

    if _weight_cache_lib is None:
        import executorch.runtime  # noqa: F401  (loads the wheel's runtime libraries first)

        try:
            _weight_cache_lib = ctypes.CDLL(str(build(target=WEIGHT_CACHE_LIB, log=log)))
        except PrgeError as e:
            (log or (lambda m: None))(f"prge: XNNPACK weight cache unavailable ({str(e).splitlines()[0]}); "
                                      "each method keeps its own packed weights")
            return False
    rc = _weight_cache_lib.prge_set_weight_cache(int(bool(on)))
    if rc != 0:
        raise PrgeError(f"the runtime refused the XNNPACK weight-cache option (error {rc})",
                        "check that the executorch wheel ships its XNNPACK backend")
    return True


def write_plan(path: str | os.PathLike, n_train: int, batch_size: int, seed: int, steps: int, readout_rows: int = 0,
               readout_steps: int = 0) -> Path:
    """The example indices of steps 1..steps (`batch.step_indices`), as the binary reads them, and with
    `readout_steps` the label readout's rows (`readout.rows_order` over the first `readout_rows` rows)."""
    from prge.zo import readout

    rows = [step_indices(n_train, batch_size, seed, s) for s in range(1, steps + 1)]
    idx = torch.tensor(rows, dtype=torch.int32).reshape(steps, batch_size)
    tensors = {"indices": idx, "seed": torch.tensor([seed], dtype=torch.int64)}
    if readout_steps:
        order = readout.rows_order(min(readout_rows, n_train), readout_steps * readout.BATCH, seed)
        tensors["readout_indices"] = order.to(torch.int32)
    io.save_tensors(path, tensors, metadata={"format": "pt", "prge": json.dumps({"format": "prge-native-plan", "n_train": n_train})})
    return Path(path)


def native_readout(manifest: dict, rank: int) -> bool:
    """Whether the binary fits the label readout itself: the program has `readout_step` for this rank
    (programs exported before it, or for another rank, get the Python host step `runtime.fit_readout`)."""
    return bool(rank) and "readout_step" in manifest.get("methods", {}) and manifest.get("readout", {}).get("rank") == rank


def _b_to_adapter(folder: Path, manifest: dict, lora_a: dict) -> None:
    bfile = folder / "b.safetensors"
    if bfile.is_file():
        b = io.load_tensors(bfile)["b"]
        write_adapter(folder / "adapter", manifest, lora_a, b)


def native_train(program_path: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 steps: int, lr: float, eps: float, seed: int = 0, eval_every: int = 50, resume: bool = False,
                 normalize: bool = False, lr_schedule: str = "constant", stop_after: int | None = None,
                 checkpoint_every: int = 25, binary: str | os.PathLike | None = None,
                 threads: int | None = None, weight_cache: bool = True, launcher: list[str] | None = None,
                 readout=None, log=None) -> dict:
    """`device.device_train` through the C++ binary; the same run folder, adapters and summary.

    The label readout (`readout`, a `runtime.ReadoutSettings`; default `prge train`'s) is fitted by the
    binary after its steps (readout.cpp: the program's `features` and `readout_step` methods, the basis
    with Eigen) and written into the best checkpoint's adapter here; a program without `readout_step`
    for that rank gets the Python host step `runtime.fit_readout` after the binary ends instead."""
    from prge.engine.runtime import ReadoutSettings, check_readout_settings

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    readout = readout or ReadoutSettings()
    check_readout_settings(readout)
    program_path, out_dir = Path(program_path), Path(out_dir)
    manifest = load_manifest(program_path)
    check_manifest_fields(manifest, manifest_path(program_path))
    readout_rank = readout.resolved(manifest, program_path)
    tensors, meta = read_dataset(data_path)
    check_manifest(manifest, meta)
    check_data_shapes(tensors, manifest, data_path)
    if manifest.get("ranks", 1) > 1:
        raise PrgeError(f"{program_path} is exported for {manifest['ranks']} ranks; the native trainer runs one process",
                        f"run it with torchrun --nproc-per-node {manifest['ranks']} -m prge device-train (the Python loop), "
                        "or export a one-process program (--ranks 1) for --native")
    if manifest.get("noise") != "counter":
        raise PrgeError(f"the native trainer runs noise 'counter' programs; this one has {manifest.get('noise')!r}",
                        "re-export with --noise counter, or train without --native")
    verify_program(program_path, manifest)
    if resume and not io.resolve_dir(out_dir / "checkpoints" / "last").is_dir() and out_dir.is_dir() and any(out_dir.iterdir()):
        log(f"prge: {out_dir} was stopped before its first checkpoint; starting again at step 0")
        resume = False
    if resume:
        last = io.resolve_dir(out_dir / "checkpoints" / "last")
        io.verify_dir(last)
        try:  # a kill can tear the last metrics row, which the binary's JSON reader refuses: drop it here
            io.truncate_metrics(out_dir / "metrics.jsonl", int(json.loads((last / "trainer_state.json").read_text())["step"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no readable state: the binary names the problem
    exe = Path(binary) if binary else build(log=log)
    if not launcher:  # an emulator (launcher, e.g. ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]) runs a foreign binary
        check_runs_here(exe)
    n_train = tensors["train_input_ids"].shape[0]
    # the plan goes to a temporary folder (it is cheap to rebuild and the same on resume), so a run the
    # binary refuses leaves nothing in out_dir
    tmp = tempfile.TemporaryDirectory(prefix="prge-plan-")
    in_binary = native_readout(manifest, readout_rank)
    if readout_rank and not in_binary:
        log(f"prge: {program_path} has no readout_step method for rank {readout_rank}; the label readout is fitted in Python "
            "after the binary (export the program again with this prge for the binary to fit it)")
    plan = write_plan(Path(tmp.name) / "plan.safetensors", n_train, manifest["batch_size"], seed, steps,
                      readout.rows if in_binary else 0, readout.steps if in_binary else 0)
    cmd = list(launcher or []) + [str(exe), "--program", str(program_path), "--data", str(data_path), "--plan", str(plan), "--out", str(out_dir),
           "--steps", str(steps), "--lr", repr(float(lr)), "--eps", repr(float(eps)), "--seed", str(seed),
           "--eval-every", str(eval_every), "--checkpoint-every", str(checkpoint_every), "--lr-schedule", lr_schedule]
    cmd += ["--weight-cache", "on" if weight_cache else "off"]
    cmd += ["--normalize"] if normalize else []
    cmd += ["--resume"] if resume else []
    if in_binary:
        cmd += ["--readout", str(readout_rank), "--readout-steps", str(readout.steps), "--readout-lr", repr(float(readout.lr)),
                "--readout-rows", str(readout.rows)]
    cmd += ["--stop-after", str(stop_after)] if stop_after else []
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with run_lock(out_dir, log=log):  # held while the binary runs and its outputs become adapters
        try:
            r = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
        finally:
            tmp.cleanup()
        if r.returncode != 0:
            msg = [line for line in r.stderr.splitlines() if "error:" in line]
            raise PrgeError(msg[-1].split("error:", 1)[1].strip() if msg else f"the native trainer failed (exit {r.returncode})",
                            "see the message; the run folder keeps its last good checkpoint")
        for line in r.stderr.splitlines():
            if not re.match(r"^I \d\d:\d\d:", line):  # the runtime's info logging
                log(line)
        lora_a = io.load_tensors(lora_a_path(program_path))
        ckpts = out_dir / "checkpoints"
        for name in ("best", "last"):
            _b_to_adapter(ckpts / name, manifest, lora_a)
        info = json.loads((out_dir / "native.json").read_text())
        if info.get("stopped"):
            return {"stopped_at": info["ran_to"], "run_dir": str(out_dir), **info}
        final = io.load_tensors(out_dir / "final_b.safetensors")
        write_adapter(out_dir / "adapter", manifest, lora_a, final["b"])
        summary = {"program": str(program_path), "model": manifest["model"], "steps": steps, "q": manifest["q"],
                   "batch_size": manifest["batch_size"], "noise": manifest["noise"], "minutes": info["seconds"] / 60,
                   "dev_before": info["dev_before"], "dev_after": info["dev_after"], "best_dev": info["best_dev"],
                   "best_step": info["best_step"], "adapter": str(out_dir / "adapter"),
                   "best_adapter": str(ckpts / "best" / "adapter"), "native": True, "step_seconds": info["step_seconds"],
                   "peak_rss_mb": info["peak_rss_mb"], "prge_version": prge.__version__}
        if in_binary:
            summary["readout"] = _readout_to_adapter(out_dir, ckpts / "best", manifest, lora_a, info["readout"])
            summary["minutes"] += summary["readout"]["minutes"]
        elif readout_rank:
            from prge.engine.runtime import Engine, fit_readout
            from prge.zo.schedule import lr_at

            engine = Engine(program_path, manifest, weight_cache=weight_cache, log=log)
            summary["readout"] = fit_readout(engine, tensors, lora_a, ckpts / "best", readout, readout_rank, seed=seed, eps=eps,
                                             lr_of=lambda step: lr_at(lr, lr_schedule, step, steps), log=log)
            summary["minutes"] += summary["readout"]["minutes"]
        io.atomic_write_json(out_dir / "summary.json", summary)
        return summary


def _readout_to_adapter(out_dir: Path, best: Path, manifest: dict, lora_a: dict, info: dict) -> dict:
    """The binary's readout (readout.safetensors, native.json's "readout") into the best checkpoint's
    adapter, as `runtime.fit_readout` writes it; returns the summary's "readout" entry."""
    from prge.zo import readout

    t = io.load_tensors(out_dir / "readout.safetensors")
    r, h, k = info["rank"], info["hidden"], info["labels"]
    ro = readout.Readout(t["a"].reshape(r, h), torch.tensor(manifest["label_ids"]), t["b"].reshape(k, r))
    write_adapter(io.resolve_dir(best) / "adapter", manifest, lora_a, t["lora_b"], readout=ro)
    fit = readout.Fit(ro, info["best_step"], info["dev_before"], info["dev_after"], info["rows"], info["seconds_features"],
                      info["seconds_steps"])
    return readout.summary_entry(fit, info["steps"], info["checkpoint_step"], info["dev_after_untrained"])


def final_b_flat(out_dir: str | os.PathLike) -> torch.Tensor:
    """The flat clean B a finished native run wrote."""
    return io.load_tensors(Path(out_dir) / "final_b.safetensors")["b"]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m prge.engine.native", description="build the native P-RGE trainer")
    p.add_argument("command", choices=["build", "cross-build", "cmake-dir", "build-command"],
                   help="build: for this machine; cross-build: for --arch with Debian's cross compiler")
    p.add_argument("--arch", default="aarch64", choices=sorted(CROSS), help="cross-build's target architecture")
    p.add_argument("--build-dir")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.command == "cmake-dir":
            print(executorch_cmake_dir())
        elif a.command == "build-command":
            print(" && ".join(" ".join(c) for c in build_command(a.build_dir or "build/native")))
        elif a.command == "cross-build":
            print(cross_build(a.arch, force=a.force, log=lambda m: print(m, file=sys.stderr)))
        else:
            print(build(a.build_dir, force=a.force, log=lambda m: print(m, file=sys.stderr)))
    except PrgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
