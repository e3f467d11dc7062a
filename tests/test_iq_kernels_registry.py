"""The CPU kernel registry: decoder modules register themselves in one place, twice is an error, and the
source stamp covers every module the drivers inline."""

from __future__ import annotations

import pytest

from qf.format.ggml_types import GGMLType
from qf.runtime.kernels import cpu, cpu_registry
from qf.runtime.kernels.cpu_decoder import Decoder


def test_every_registered_type_is_supported_and_int_types_have_f32_decoders() -> None:
    assert set(cpu.supported_types()) == set(cpu_registry.DECODERS)
    assert set(cpu.IDECODERS) <= set(cpu_registry.DECODERS)
    assert cpu.IDECODERS is cpu_registry.INT_DECODERS
    assert {GGMLType.F16, GGMLType.Q4_0, GGMLType.Q6_K, GGMLType.IQ4_XS} <= set(cpu_registry.DECODERS)


def test_a_type_registered_twice_is_an_error() -> None:
    dec = cpu_registry.DECODERS[GGMLType.Q4_0]
    with pytest.raises(ValueError, match="Q4_0 registered twice"):
        cpu_registry.register({GGMLType.Q4_0: Decoder(dec.head, dec.unit, 1)})
    assert cpu_registry.DECODERS[GGMLType.Q4_0] is dec


def test_the_stamp_follows_the_imports_of_the_registered_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    here = cpu_registry.Path(cpu_registry.__file__).parent
    seen: list[str] = []
    real = cpu_registry._kernel_imports

    def spy(path):
        seen.append(path.stem)
        return real(path)

    monkeypatch.setattr(cpu_registry, "_kernel_imports", spy)
    stamp = cpu_registry.source_stamp(extra=("cpu_drivers", "cpu_amx_bf16"))  # the tile kernels take kinds too
    assert stamp == cpu._STAMP
    inlined = {"cpu_simd", "cpu_decoder", "cpu_blas", "cpu_isimd", "cpu_idecode", "cpu_float", "cpu_legacy",
               "cpu_kquants", "cpu_iq", "cpu_amx", "cpu_amx_bf16"}
    assert inlined <= set(seen)
    assert all((here / f"{m}.py").exists() for m in seen)
    assert "cpu_int8" not in seen  # the integer drivers are watched by numba themselves
