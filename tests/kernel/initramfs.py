"""The guest's kernel and initramfs: the host's stock Debian kernel, a busybox initramfs.

The initramfs holds only busybox-static, the kernel modules needed to reach the host's root
over virtio-9p and to overlay it (their dependencies resolved by `modprobe --show-depends`) and
`guest/initramfs-init.sh` as /init. It is cached under the build directory, keyed by kernel
version and a digest of everything that goes into it, so editing the init script rebuilds it.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent / "guest"
INIT_SCRIPT = GUEST_DIR / "initramfs-init.sh"
# what the initramfs must load before it can mount the host root: the virtio PCI transport,
# 9p over virtio, and overlayfs for the writable tmpfs layer
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX = Path("/bin/busybox")


class InitramfsError(Exception):
    """The initramfs could not be built (a missing tool or module), with the reason."""


@dataclass(frozen=True)
class Kernel:
    version: str  # e.g. 6.1.0-56-amd64
    image: Path  # /boot/vmlinuz-VERSION
    modules: Path  # /lib/modules/VERSION


def _version_key(version: str) -> list[int | str]:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Kernel | None:
    """The newest kernel that has both an image in /boot and its modules installed."""
    found = []
    for image in boot.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if (modules / version / "modules.dep").is_file():
            found.append(Kernel(version, image, modules / version))
    return max(found, key=lambda k: _version_key(k.version), default=None)


def module_files(kernel: Kernel, names: tuple[str, ...] = BOOT_MODULES) -> list[Path]:
    """The .ko files to insmod, dependencies first, each once; built-in modules need none."""
    files: list[Path] = []
    for name in names:
        proc = subprocess.run(
            ["modprobe", "-S", kernel.version, "--show-depends", name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise InitramfsError(f"modprobe --show-depends {name}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            words = line.split()
            if words[:1] == ["insmod"] and Path(words[1]) not in files:
                files.append(Path(words[1]))
    return files


def _digest(kernel: Kernel, modules: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(kernel.version.encode())
    h.update(INIT_SCRIPT.read_bytes())
    for path in [BUSYBOX, *modules]:
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def initramfs(kernel: Kernel, build_dir: Path) -> Path:
    """The cached initramfs for `kernel`, built first if missing or out of date."""
    if not BUSYBOX.is_file():
        raise InitramfsError(f"{BUSYBOX} missing (scripts/setup.sh installs busybox-static)")
    modules = module_files(kernel)
    out = build_dir / kernel.version / f"initrd-{_digest(kernel, modules)}.cpio.gz"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "modules"):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        shutil.copy2(INIT_SCRIPT, root / "init")
        os.chmod(root / "init", 0o755)
        for ko in modules:
            shutil.copy2(ko, root / "modules" / ko.name)
        (root / "modules" / "order").write_text("".join(f"{ko.name}\n" for ko in modules))
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        proc = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input="\n".join([".", *names]).encode() + b"\n",
            capture_output=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise InitramfsError(f"cpio: {proc.stderr.decode(errors='replace').strip()}")
        partial = out.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(gzip.compress(proc.stdout, compresslevel=1))
        partial.replace(out)  # concurrent builders each produce the same file
    return out


def vmlinux(kernel: Kernel, build_dir: Path) -> Path:
    """The kernel uncompressed (cached), or its bzImage if it cannot be unpacked here.

    Under TCG, unpacking Debian's XZ-compressed bzImage takes the guest ~15 s; QEMU boots the
    uncompressed ELF directly through its PVH entry point (CONFIG_PVH=y in Debian's kernels).
    """
    st = kernel.image.stat()  # a package update may keep the version and change the image
    stamp = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = build_dir / kernel.version / f"vmlinux-{stamp}"
    if out.is_file():
        return out
    image = kernel.image.read_bytes()
    # boot protocol header: the compressed payload starts payload_offset bytes into the
    # protected-mode part, which follows the (setup_sects + 1) 512-byte setup sectors
    setup_sects = image[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = image[start : start + payload_length]
    if not payload.startswith(b"\xfd7zXZ"):
        return kernel.image  # not XZ: let QEMU's firmware boot the bzImage
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if not elf.startswith(b"\x7fELF"):
        return kernel.image
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.tmp")
    partial.write_bytes(elf)
    partial.replace(out)
    return out
