"""What the CPU can do: read once from /proc/cpuinfo by the layers that choose kernels
(quantization's reduce_range) and those that stamp results with the machine."""

import platform

_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")


def cpu_info() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = [flag for flag in _FLAGS_OF_INTEREST if flag in value.split()]
                    break
    except OSError:
        pass
    return model, flags


def cpu_has_vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (VNNI). Without them ONNX
    Runtime's uint8 x int8 kernels add pairs of products in 16 bits, which overflow
    for 8-bit weights; 7-bit weights never do."""
    return any(flag in cpu_info()[1] for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
