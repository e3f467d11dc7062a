"""The grids of ggml's IQ2 / IQ3 types (ggml-common.h, ggml-quants.c), as data built on first use.

Importing this module builds nothing (numpy only, no numba); each accessor is cached and returns a read-only array.

Dequantization tables (ggml-common.h), one row per grid point, element i of a point in column i:

- ``iq2xxs_grid()`` u8 [256, 8], ``iq2xs_grid()`` u8 [512, 8], ``iq2s_grid()`` u8 [1024, 8]: values 8, 25, 43.
  ``.view(np.uint64)`` gives ggml's uint64 words ([n, 1], little-endian).
- ``iq3xxs_grid()`` u8 [256, 4]: values 4, 12, 20, 28, 36, 44, 52, 62; ``iq3s_grid()`` u8 [512, 4]: values 1, 3,
  .., 15. ``.view(np.uint32)`` gives ggml's uint32 words.
- ``ksigns_iq2xs()`` u8 [128]: a 7-bit sign index -> 8 sign bits (bit 7 = parity of the 7, so every mask has an
  even number of minus signs); ``kmask_iq2xs()`` u8 [8]: 1 << i.

Grid rows by type: IQ2_XXS (iq2xxs, 8-bit index), IQ2_XS (iq2xs, 9-bit), IQ2_S (iq2s, 10-bit), IQ3_XXS (iq3xxs,
8-bit), IQ3_S (iq3s, 9-bit); every index a block can store is inside its table.

Quantizer tables (ggml-quants.c's kgrid_* arrays): ``kgrid(name)`` u16 [n], point k's element i at level
``(kgrid[k] >> bits*i) & mask`` (2 bits x 8 for the IQ2 grids, 3 bits x 4 for IQ3); ``quant_points(name)`` int8
[n, dims] = 2 * level + 1, the integer points ggml's searches use. Names: iq2xxs, iq2xs, iq2s, iq3xxs, iq3s.
The grid of each name is its levels mapped through ``LEVELS[name]`` (checked against gguf-py in the tests).
The neighbour tables ggml builds from these at init live in qf.quant.iq_neighbours.
"""

from __future__ import annotations

import base64
from functools import cache

import numpy as np

# kgrid_2bit_256 / _512 / _1024 (iq2xs_init_impl) and kgrid_256 / _512 (iq3xs_init_impl) of ggml-quants.c:
# uint16 little-endian, ascending.
_KGRID_2BIT_256 = (
    "AAACAAUACAAKABEAFAAgACIAKAAqAEEARABQAFgAYQBkAIAAggCKAKIAAQEEARABFQFAAYQBmAEAAgICIgKCAgEEBAQQBCEEJARABEIESARgBIEE"
    "hASQBKQEAAUCBQgFIAVGBWkFgAWRBQkGEAZABoQGpAYACAUICAgUCCgIQQhECFAIUgiICAQJQAkCChQKARAEEBAQIRBAEGAQhBCQEJUQABEIESAR"
    "UBFaEYARJBJFEgAUCBQgFCUUSRSAFBgVYhUAFhYWARgEGBAYQBiBGAAZBRmgGVEaACACIAogRCBhIIAggiApIUghACICIgEkBCQQJEAkViQAJUEl"
    "ZCWQJggoICiUKEQqAUAEQBBAGEAhQCRAQEBIQFZAYECBQIRAkEAAQSBBYUGAQYVBAUIQQkhCVkJoQgBECEQgRIBEmUQSRSRFAEYBSARIEEhASEVI"
    "AElYSWFJgklFSpBKAFAIUBFQGVAgUIBQiFAEUUJRpFGRUpBUklQKVQFWVFYAWBFYGVhkWEBZCFoEYBBgQGBoYABhVWEYYmBiAGQFZBBlEmWEZUJo"
    "AIACgAqAQYCCgASBGIFAgRGCAYQEhBCEFYRAhGCEAIVGhZSFCYZAhmCGAogEiRGKBJAQkCSQQJChkBaRgJFFkgCUIpRElFGVgZggmQKgUKCFoAmh"
    "AKIYpFCoBKk="
)
_KGRID_2BIT_512 = (
    "AAACAAUACAAKABEAFAAWABkAIAAiACUAKABBAEQARgBJAFAAUgBVAFgAYQBkAIAAggCFAIgAkQCUAJkAoAABAQQBBgEJARABEgEVARgBGgEhASQB"
    "QAFCAUUBSAFRAVQBYAFoAYEBhAGQAQACAgIFAggCEQIUAiACQQJEAlACVQKAAooCAQQEBAYECQQQBBIEFQQYBCEEJARABEIERQRIBFEEVARWBGAE"
    "gQSEBJAEAAUCBQUFCAURBRQFIAVBBUQFUAVhBYAFAQYEBhAGJgZABkIGhAYACAIIBQgICAoIEQgUCCAIJQhBCEQIUAhYCIAIoAiqCAEJBAkQCUAJ"
    "gQmJCQAKIAooCpYKoAoBEAQQBhAJEBAQEhAVEBgQIRAkEEAQQhBFEEgQURBUEGAQahCBEIQQkBAAEQIRBREIERERFBEgEUERRBFQEYARlBGWEQES"
    "BBIGEhASQBJgEgAUAhQFFAgUERQUFCAUQRREFEkUUBRkFIAUARUEFRAVQBUAFhQWSRYBGAQYEBgSGEAYVBiGGAAZBRlmGVEaqRoAIAIgBSAIIAog"
    "ESAUICAgQSBEIFAggCCgIAEhBCEQIUAhSCFlIQAiIiKAIqgiASQEJBAkKSRAJAAlQSVSJZklASYaJqYmACgIKAooIChVKIgooihoKZApCCogKoIq"
    "iCqKKgFABEAGQAlAEEASQBVAGEAhQCRAQEBCQEVASEBKQFFAVEBgQGVAgUCEQJBAAEECQQVBCEERQRRBIEFBQURBUEGAQYVBokEBQgRCEEISQilC"
    "QEIARAJEBUQIRBFEFEQZRCBEQURERFBEgESURAFFBEUQRSRFQEWaRQBGCkZERlBGAUgESBBIQEhFSFRIYkgASRFJRElQSWlJBEoAUAJQBVAIUBFQ"
    "FFAgUChQQVBEUFBQgFABUQRREFEVUUBRQlEAUkRSqlIBVARUEFQhVEBUYFSBVKFUAFUIVYBViFUhVmhWoVYAWBRYQVhQWJlYGllAWUJZhVoBYARg"
    "EGBAYFRgYmCGYKlgAGEkYkpikmIAZBZkEGVAZUVlpGUBaGpoJWkGalRqYmoAgAKABYAIgBGAFIAggCqAQYBEgFCAgICCgKiAqoABgQSBBoEQgUCB"
    "UYFZgQCCIIKAgoKCoIKoggGEBIQQhBKEFYRAhGCEiYQAhUSFpYUYhmqGAIgIiCWIWoiAiIKIqIgGiSKKgIqIipaKqIoBkASQEJBAkFaQhJAAkSKR"
    "ZJFWkomSAJQFlESUUJRYlCmVkJWSlUGWUZimmEmZFZpgmgCgAqAIoAqgIKAqoKCgUaFZoaahAKICogiiKqKAoqCiQKSVpGWmmKYKqCCoIqgoqKCo"
    "qKgEqYSphqkoqiqqkaqqqg=="
)
_KGRID_2BIT_1024 = (
    "AAACAAUACAAKABEAFAAWABkAIAAiACUAKABBAEQARgBJAFAAUgBVAFgAYQBkAGYAaQCAAIIAhQCIAJEAlACgAKUAqgABAQQBBgEJARABEgEVARgB"
    "IQEkAUABQgFFAUgBUQFUAVYBWQFgAWUBaAGBAYQBkAGSAZUBoQGkAQACAgIFAggCEQIUAiACKgJBAkQCRgJJAlACVQKAAoUCigKUAqICAQQEBAYE"
    "CQQQBBIEFQQYBCEEJAQmBCkEQARCBEUESARKBFEEVARWBFkEYARiBGUEgQSEBIYEiQSQBJUEmAShBKQEAAUCBQUFCAUKBREFFAUWBRkFIAUlBSgF"
    "QQVEBUYFSQVQBVIFVQVYBWEFZAWABYIFhQWIBZEFlAWgBQEGBAYGBgkGEAYVBkAGRQZIBlEGVAZgBoEGhAaQBgAIAggFCAgIEQgUCBYIGQggCCUI"
    "KghBCEQIRghJCFAIUghVCFgIYQhkCIAIhQiUCKoIAQkECRAJEgkVCRgJIQlACUUJSAlRCVQJYAmBCZAJAAoRChQKIgooCioKUAqZCgEQBBAGEAkQ"
    "EBASEBUQGBAhECQQJhBAEEIQRRBIEFEQVBBWEFkQYBBiEGUQaBCBEIQQhhCQEJUQmBChEKQQABECEQURCBEKERERFBEWERkRIBEiESURKBFBEUQR"
    "RhFJEVARUhFVEVgRYRFkEYARghGFEYgRkRGUEQESBBIJEhASFRIhEiQSQBJFElESVBKBEoQSkBIAFAIUBRQIFBEUFBQWFBkUIBQlFCgUQRREFEYU"
    "SRRQFFIUVRRYFGEUZBSAFIIUhRSIFJEUlBSgFAEVBBUGFQkVEBUSFRUVGBUhFSQVQBVCFUUVSBVRFVQVYBWBFYQVkBUAFgUWCBYRFhQWIBZBFkQW"
    "UBaAFqoWARgEGAYYCRgQGBUYGBghGEAYQhhFGEgYURhUGGAYgRiEGAAZAhkFGQgZERkUGSAZQRlEGVAZaRmiGQQaEBpAGlYaACACIAUgCCARIBQg"
    "FiAZICAgJSAqIEEgRCBQIFIgVSBkIIAgiiCUIKogASEEIRAhEiEVISEhQCFCIUUhUSFUIWAhgSGEIZAhACIKIiIiKCIqIkQiUCKIIooiqCIBJAQk"
    "BiQJJBAkFSQYJCEkJCRAJEIkRSRIJFEkVCRgJIEkhCSQJAAlBSUIJRElFCUgJUElRCVQJWYlgCUBJgQmECZAJlkmACgFKBEoFChBKEQoUCiKKKoo"
    "ASkEKRAplSkKKiIqZCqIKooqAUAEQAZACUAQQBJAFUAYQBpAIUAkQCZAQEBCQEVASEBKQFFAVEBWQFlAYEBiQGVAgUCEQJBAlUCYQKFApEAAQQJB"
    "BUEIQRFBFEEWQRlBIEEiQSVBQUFEQUZBSUFQQVJBVUFYQWFBZEGAQYJBhUGIQZFBlEGgQQFCBEIQQhJCFUIYQiRCQEJFQkhCUUJUQmBCgUKEQgBE"
    "AkQFRAhECkQRRBREFkQZRCBEIkQlRChEQUREREZESURQRFJEVURYRGFEZESARIJEhUSIRJFElESgRAFFBEUGRQlFEEUSRRVFGEUhRSRFQEVCRUVF"
    "SEVRRVRFYEVqRYFFhEWQRQBGAkYFRghGEUYURiBGQUZERlBGgEalRgFIBEgJSBBIEkgVSBhIIUgkSEBIQkhFSEhIUUhUSGBIhEiQSABJAkkFSQhJ"
    "EUkUSSBJQUlESVBJgEmWSQFKBEoQSkBKAFACUAVQCFARUBRQFlAZUCBQIlAlUChQQVBEUEZQSVBQUFJQVVBYUGFQZFCAUIJQhVCIUJFQlFABUQRR"
    "BlEJURBRElEVURhRIVEkUUBRQlFFUUhRUVFUUWBRgVGEUZBRAFIFUghSEVIUUiBSQVJEUlBSaVKAUgFUBFQGVAlUEFQSVBVUGFQhVCRUQFRCVEVU"
    "SFRRVFRUYFSBVIRUkFQAVQJVBVUIVRFVFFUgVUFVRFVQVYBVAVYEVhBWJlZAVgBYAlgFWAhYEVgUWCBYQVhEWFBYWliAWAFZBFkQWUBZAFoZWoVa"
    "qFoBYARgBmAQYBJgFWAYYCFgJGBAYEVgSGBRYFRgYGCEYJBgAGECYQVhCGERYRRhIGFBYURhUGGAYZlhBGIQYkBiVmKhYgBkBWQIZBFkFGQgZEFk"
    "RGRQZIBkAWUEZRBlQGVKZWhlkmUAZpRmAWgEaBBoZWiYaABpKmlCaqFqAIACgAWACIARgBSAGYAggCWAQYBEgFCAUoBVgFiAYYCAgIWAkYCUgAGB"
    "BIEJgRCBEoEVgRiBIYEkgUCBQoFFgUiBUYFUgYGBhIGQgamBAIIFggqCEYIUgkGCRIJQggGEBIQGhAmEEIQShBWEGIQhhECEQoRFhEiEUYRUhGCE"
    "gYSEhJCEAIUChQWFCIURhRSFIIVBhUSFUIWAhYqFAYYEhhCGKYZAhgCIBYgRiBSIQYhEiFCIoogBiQSJQIlliSKKWIpaioKKoooBkASQCZAQkBKQ"
    "FZAYkCSQQJBCkEWQSJBRkFSQYJCBkISQkJAAkQWREZEUkUGRRJFQkVqRAZIEkhCSQJKmkgCUApQFlAiUEZQUlCCUQZRElFCUgJSWlAGVBJUQlUCV"
    "mJWhlQCWRpZklgGYBJgQmCaYQJipmACZSZlSmZCaAKAFoAqgFKAioCqgQaBEoFCgoqCqoEChZaECogqiIqIooiqigqKIooqiqKIBpASkEKRApImk"
    "pKQApRmlUaYKqCiooqhUqYapCKoKqiCqIqooqoiqqqo="
)
_KGRID_256 = (
    "AAACAAQACQALAA8AEAASABkAIgA7AD0AQQBDAEgASgBRAFUAWABaAGEAbAB4AIAAggCEAIkAkACSAJkAmwCfAKkArwC9AMEAxwDIAMoA1QD4AAsB"
    "HwEkAS8BOwE9AUEBRwFaAWoBnQG0AcgBzAHOAeMB8QEBAgMCCAIKAhECEwIYAhoCHAInAigCQAJCAkkCUAJSAoECgwKIAooCkQKYAroCwALCAtAC"
    "2QLmAvYCAQMFAygDUANUA2YDeQOFA9ID4AMABAIECQQLBBAEEgQWBBkEIgRBBEMERQRIBEoEUQRYBHMEdwR4BIAEggSJBI8EkASSBJ8EoAStBMEE"
    "yATMBPgE/AQdBSsFQwVXBWEFfAXBBcMFzgXlBQEGCAYKBhEGEwYoBjUGOgZABkIGUAZZBmQGZgaBBoMGiAaVBqoGugbJBtsGGAcnBzoHQAdGB1IH"
    "bQeMB54HswfbB/AHBAgPCB0IHwgrCC8IfAiQCJ8IoAiwCLYIxwjlCAQJKQk0CVUJYwl4CcUJyAnKCdgJCgohCjgKQApGClYKbQqMCpoKugrCCusK"
    "CAsTCxcLOgtCC1kLqAvUC+ILFAwkDCYMNAxRDHEMjwy0DNgM3gwkDUUNag2bDcMN0Q0DDgUOBw4IDhoOKg5WDmAOig6lDqoOwA7NDtsO8A4RDyEP"
    "QA9CD1QPmA8="
)
_KGRID_512 = (
    "AAABAAIABQAHAAgACQAKAAwADgAQABEAFQAbACAAIgAlACcAKQArADAAMgA5ADwAPwBAAEEAQgBEAEgASQBNAFAAUwBXAFkAXQBkAHEAdQB6AIAA"
    "gQCFAIcAiACLAI4AkQCVAJgAnACiAKUApwCpAKsAuAC7AMMAyQDNANAA0gDZANsA3gDkAOgA6gD3APkA/QAAAQsBDwERARQBGgEgASMBKQE4AUIB"
    "RAFQAVIBVgFbAWEBZQFnAXYBewGGAYkBiwGZAaoBuQHAAcIBxAHQAdIB1gHbAegB7AEAAgECAgIEAggCCQILAg0CDwIQAhICGQIcAh4CLAIuAjEC"
    "OgJAAkECQwJGAkgCTAJRAlgCWwJhAmgCagJ4An4CgAKKAo0CjwKQApQCmgKgAqMCrQKwAroCwQLEAscCyALLAtEC1wLYAtwC4QLyAvgCAwMFAwoD"
    "DAMZAxsDIgMmAygDLANBA0gDSwNRA1gDWgNpA5ADlAOXA6QDpgPBA8MDyAPKA9ED3QPhA/ID+AMABAEEAwQFBAcECAQKBAwEDgQRBBMEFwQYBBoE"
    "IQQjBCUEKAQqBDcEOAQ7BD0EQARCBEgESwRPBFIEVQRZBFwEYgRpBIEEhASHBJEEkwSYBJ8EoQSrBK8EuQS8BMAEwgTFBMkE0gTUBNkE2wTiBOgE"
    "9gQBBQcFEAUTBRoFHQUhBToFPQVEBUkFUgVfBWAFawV4BYAFggWHBZEFrQWxBcUFyQXWBdgF4wXoBQIGCQYLBg0GDwYSBhkGGwYdBiIGJAYnBikG"
    "MwY5BkEGQwZFBkwGUQZTBmAGcAZ6Bn4GgAaKBpAGmgacBqgGwQbIBswG0QbTBtcG2AbhBuMG5wbtBvsGAwcJBw4HEgcZByoHMAc0B0EHSAdKB1UH"
    "WgdkB24HeweOB6EHwQfDB9AH0gfdBwAIBAgKCBAIFAgXCBoIIQgoCDgIQghHCEkISwhSCFgIXQhjCGkIbQiBCIMIiAiNCJEImwigCK8Isgi4CMQI"
    "yQjLCNAI0gjZCN0IAAkCCRQJHwkgCTkJRQlHCVEJcgmLCZwJsAnICc0J2AnjCekJAgoICgwKEgogCiQKJwoqCjYKPApBCkMKRQpKClEKWgp6CoAK"
    "iQqTCpgKngqrCsIKxwrICtcK5ArpCvUK+woBCwQLEAsaCyYLSgtWC2kLawuiC8ILxAvSCwkMCwwNDBkMGwwwDEAMUAxXDHQMigycDKIMrQyyDLgM"
    "wAzMDNEM4AwVDSMNMg1ADUMNXA1wDYUNoA3JDcsNAA4EDgcOEA4SDh4OIA4sDjIOQg5JDlQOYw5lDoEOhA6IDo4OkQ6YDqkOwg7aDt0O6w4BDwUP"
    "Cw8QDygPUg9iD4IPmQ/ADw=="
)


_KGRID = {"iq2xxs": _KGRID_2BIT_256, "iq2xs": _KGRID_2BIT_512, "iq2s": _KGRID_2BIT_1024,
          "iq3xxs": _KGRID_256, "iq3s": _KGRID_512}
BITS = {"iq2xxs": 2, "iq2xs": 2, "iq2s": 2, "iq3xxs": 3, "iq3s": 3}  # bits per element in a kgrid entry
DIMS = {"iq2xxs": 8, "iq2xs": 8, "iq2s": 8, "iq3xxs": 4, "iq3s": 4}  # elements per grid point
_IQ2_LEVELS = (0x08, 0x19, 0x2B)
LEVELS = {"iq2xxs": _IQ2_LEVELS, "iq2xs": _IQ2_LEVELS, "iq2s": _IQ2_LEVELS,
          "iq3xxs": (0x04, 0x0C, 0x14, 0x1C, 0x24, 0x2C, 0x34, 0x3E), "iq3s": tuple(range(1, 16, 2))}


def _frozen(a: np.ndarray) -> np.ndarray:
    """a, marked read-only."""
    a.setflags(write=False)
    return a


@cache
def kgrid(name: str) -> np.ndarray:
    """ggml-quants.c's kgrid of `name` as u16 [n] (packed levels of each grid point)."""
    return _frozen(np.frombuffer(base64.b64decode("".join(_KGRID[name])), "<u2").astype(np.uint16))


@cache
def grid_levels(name: str) -> np.ndarray:
    """Level index of every element of every grid point: u8 [n, dims]."""
    k = kgrid(name).astype(np.uint32)[:, None]
    bits = BITS[name]
    shifts = (bits * np.arange(DIMS[name], dtype=np.uint32))[None, :]
    return _frozen(((k >> shifts) & ((1 << bits) - 1)).astype(np.uint8))


@cache
def quant_points(name: str) -> np.ndarray:
    """The integer points ggml's searches use, 2 * level + 1: int8 [n, dims]."""
    return _frozen((2 * grid_levels(name).astype(np.int8) + 1).astype(np.int8))


@cache
def _grid(name: str) -> np.ndarray:
    """ggml-common.h's table of `name`: u8 [n, dims]."""
    return _frozen(np.array(LEVELS[name], np.uint8)[grid_levels(name)])


def iq2xxs_grid() -> np.ndarray:
    """IQ2_XXS grid: u8 [256, 8] (values 8, 25, 43)."""
    return _grid("iq2xxs")


def iq2xs_grid() -> np.ndarray:
    """IQ2_XS grid: u8 [512, 8] (values 8, 25, 43)."""
    return _grid("iq2xs")


def iq2s_grid() -> np.ndarray:
    """IQ2_S grid: u8 [1024, 8] (values 8, 25, 43)."""
    return _grid("iq2s")


def iq3xxs_grid() -> np.ndarray:
    """IQ3_XXS grid: u8 [256, 4] (values 4, 12, .., 52, 62)."""
    return _grid("iq3xxs")


def iq3s_grid() -> np.ndarray:
    """IQ3_S grid: u8 [512, 4] (values 1, 3, .., 15)."""
    return _grid("iq3s")


@cache
def ksigns_iq2xs() -> np.ndarray:
    """u8 [128]: sign index s -> s | parity(s) << 7 (8 sign bits with an even count of ones)."""
    s = np.arange(128, dtype=np.uint8)
    parity = np.unpackbits(s[:, None], axis=1).sum(axis=1).astype(np.uint8) & 1
    return _frozen(s | (parity << 7))


@cache
def kmask_iq2xs() -> np.ndarray:
    """u8 [8]: 1 << i."""
    return _frozen((1 << np.arange(8)).astype(np.uint8))
