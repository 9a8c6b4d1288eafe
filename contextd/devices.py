"""The devices a guest may make and open: one list, for cgroup v1 and for cgroup v2.

Cgroup v1 has a devices controller that takes the list as text
(``devices.allow``). Cgroup v2 has none: a BPF program of type
CGROUP_DEVICE attached to the guest's cgroup decides each mknod and open
(what runc and systemd's DeviceAllow= load). The program is a few
instructions, assembled here from the same list: it answers 1 (allowed) for a
character device of the list, 0 for anything else, block devices included.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from native import syscalls


@dataclass(frozen=True)
class Device:
    """A character device a guest may use; minor None: every minor of major."""

    name: str
    major: int
    minor: int | None


ALLOWED = (
    Device("null", 1, 3),
    Device("zero", 1, 5),
    Device("full", 1, 7),
    Device("random", 1, 8),
    Device("urandom", 1, 9),
    Device("tty", 5, 0),
    Device("console", 5, 1),
    Device("ptmx", 5, 2),
    Device("the ptys of its devpts", 136, None),
)


def v1_rules() -> list[str]:
    """The list as cgroup v1 devices.allow lines (read, write, mknod)."""
    return [f"c {d.major}:{'*' if d.minor is None else d.minor} rwm" for d in ALLOWED]


# -- cgroup v2: the BPF program ---------------------------------------------

_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_DEVCG_DEV_CHAR = 2

# Instruction classes and operations (linux/bpf.h, linux/bpf_common.h).
_LDX_MEM_W = 0x61  # dst = *(u32 *)(src + off)
_ALU_AND_K = 0x54  # dst &= imm (32 bits)
_JNE_K = 0x55  # if dst != imm goto pc + 1 + off
_MOV64_K = 0xB7  # dst = imm
_EXIT = 0x95


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program() -> bytes:
    """The device program's instructions.

    Its context is struct bpf_cgroup_dev_ctx: u32 access_type (access << 16 |
    type), u32 major, u32 minor. Registers: r2 type, r4 major, r5 minor.
    """
    head = [
        _insn(_LDX_MEM_W, dst=2, src=1, off=0),
        _insn(_ALU_AND_K, dst=2, imm=0xFFFF),
        _insn(_LDX_MEM_W, dst=4, src=1, off=4),
        _insn(_LDX_MEM_W, dst=5, src=1, off=8),
    ]
    body: list[bytes] = []
    for device in ALLOWED:
        tests = [(2, _BPF_DEVCG_DEV_CHAR), (4, device.major)]
        if device.minor is not None:
            tests.append((5, device.minor))
        # Each failed test jumps past the rest of this rule (its tests, r0 = 1, exit).
        for index, (register, value) in enumerate(tests):
            skip = len(tests) - index - 1 + 2
            body.append(_insn(_JNE_K, dst=register, off=skip, imm=value))
        body += [_insn(_MOV64_K, dst=0, imm=1), _insn(_EXIT)]
    tail = [_insn(_MOV64_K, dst=0, imm=0), _insn(_EXIT)]
    return b"".join(head + body + tail)


def attach_v2(cgroup_dir: str) -> None:
    """Load the device program and attach it to a cgroup v2 directory (it stays attached
    as long as the cgroup exists; descendants cannot attach programs of their own)."""
    code = program()
    instructions = syscalls.ffi.new("char[]", code)
    license_ = syscalls.ffi.new("char[]", b"GPL")
    attr = struct.pack(
        "<IIQQIIQII16sII",
        _BPF_PROG_TYPE_CGROUP_DEVICE,
        len(code) // 8,
        int(syscalls.ffi.cast("uintptr_t", instructions)),
        int(syscalls.ffi.cast("uintptr_t", license_)),
        0,  # log_level
        0,  # log_size
        0,  # log_buf
        0,  # kern_version
        0,  # prog_flags
        b"contextd_devs",  # at most 15 bytes and a NUL
        0,  # prog_ifindex
        _BPF_CGROUP_DEVICE,  # expected_attach_type
    )
    prog = syscalls.bpf(_BPF_PROG_LOAD, attr)
    try:
        directory = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syscalls.bpf(
                _BPF_PROG_ATTACH, struct.pack("<IIII", directory, prog, _BPF_CGROUP_DEVICE, 0)
            )
        finally:
            os.close(directory)
    finally:
        os.close(prog)
