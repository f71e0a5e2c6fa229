"""finn_flow imports without Vivado, and a tiny Brevitas model survives QONNX -> FINN-ONNX."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.finn


def test_import_finn_flow_is_cheap() -> None:
    """`import finn_flow` works and does not pull finn-plus or start anything."""
    code = "import sys, finn_flow; assert 'finn' not in sys.modules, 'finn imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_start_finn_keeps_files_in_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings and build dir point inside the given folder; missing Vivado is recorded."""
    from finn_flow import VIVADO_PLACEHOLDER, start_finn

    monkeypatch.delenv("XILINX_VIVADO", raising=False)
    for key in ("FINN_SETTINGS", "FINN_BUILD_DIR"):
        monkeypatch.delenv(key, raising=False)
    env = start_finn(tmp_path / "out")
    assert Path(env.build_dir) == (tmp_path / "out" / "finn_build").resolve()
    assert Path(env.build_dir).is_dir()
    assert os.environ["FINN_BUILD_DIR"] == env.build_dir
    assert os.environ["FINN_SETTINGS"].startswith(str(tmp_path.resolve()))
    assert env.vivado_present is False
    assert os.environ["XILINX_VIVADO"] == VIVADO_PLACEHOLDER

    import finn.util.settings
    import finn.xsi

    assert Path(finn.util.settings.get_settings().finn_build_dir) == Path(env.build_dir)
    assert finn.xsi.SimEngine is None
    assert env.finn_version.startswith("1.")


def test_start_finn_unwritable_folder(tmp_path: Path) -> None:
    """An output folder that cannot be created fails with its path in the message."""
    from finn_flow import start_finn

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="file"):
        start_finn(blocker / "sub")


def test_tiny_brevitas_model_to_finn_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Brevitas MLP -> QONNX -> ConvertQONNXtoFINN; FINN's execution equals Brevitas."""
    import torch
    from brevitas.export import export_qonnx
    from brevitas.nn import QuantIdentity, QuantLinear, QuantReLU

    from finn_flow import start_finn

    monkeypatch.chdir(tmp_path)
    start_finn(tmp_path / "finn")

    from finn.core.onnx_exec import execute_onnx
    from finn.transformation.qonnx.convert_qonnx_to_finn import ConvertQONNXtoFINN
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        QuantIdentity(bit_width=8, return_quant_tensor=True),
        QuantLinear(12, 16, bias=True, weight_bit_width=4),
        QuantReLU(bit_width=4, return_quant_tensor=True),
        QuantLinear(16, 5, bias=True, weight_bit_width=4),
    ).eval()
    x = torch.randn(3, 12)
    # calibrate the activation scales a little, then freeze
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 12))
    model.eval()
    with torch.no_grad():
        expected = model(x).detach().numpy()

    onnx_path = tmp_path / "tiny_qonnx.onnx"
    export_qonnx(model, args=x, export_path=str(onnx_path))
    wrapper = cleanup_model(ModelWrapper(str(onnx_path)))
    wrapper = wrapper.transform(ConvertQONNXtoFINN())
    op_types = {n.op_type for n in wrapper.graph.node}
    assert "Quant" not in op_types, f"Quant nodes left after conversion: {op_types}"
    assert "MultiThreshold" in op_types, f"expected MultiThreshold in {op_types}"

    iname = wrapper.graph.input[0].name
    oname = wrapper.graph.output[0].name
    got = execute_onnx(wrapper, {iname: x.numpy()})[oname]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert not list(Path.home().glob(".finn")), "FINN wrote into ~/.finn"
