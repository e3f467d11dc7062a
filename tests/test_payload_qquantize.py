"""qquantize refuses a file of native payloads with a clear message, and writes nothing."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("compressed_tensors")

from payload_fixtures import ct_checkpoint  # noqa: E402

from qf.convert.pipeline import convert  # noqa: E402
from qf.tools.qquantize import main  # noqa: E402


def test_qquantize_refuses_payload_file(tiny_checkpoint, tmp_path):
    ct_checkpoint(tiny_checkpoint(tied=False), tmp_path / "q", "fp8_channel")
    src, out = tmp_path / "m.qf", tmp_path / "out.qf"
    convert(tmp_path / "q", src, "F16")
    r = CliRunner().invoke(main, [str(src), str(out), "--type", "Q4_K_M"])
    assert r.exit_code == 2
    assert "native payload weights" in r.output and "blk.0." in r.output and "fp8;scale=channel" in r.output
    assert not out.exists() and list(tmp_path.glob("*.partial")) == []
