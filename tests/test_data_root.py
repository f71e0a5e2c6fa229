"""One data-root resolver for the tools and the FPGA flow (mmseg_m3vit.engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmengine.config import Config

from mmseg_m3vit.engine import check_data_roots, resolve_data_root
from mmseg_m3vit.engine.preflight import REPO_ROOT


def test_relative_root_prefers_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()  # exists here and in the repository
    assert resolve_data_root("configs") == tmp_path / "configs"
    # only in the repository: the configs' convention (paths relative to the checkout)
    assert resolve_data_root("finn_flow/folding") == REPO_ROOT / "finn_flow" / "folding"
    # nowhere: absolute, under the working directory, for the error message
    assert resolve_data_root("no/such/root") == tmp_path / "no" / "such" / "root"
    assert resolve_data_root(str(tmp_path)) == tmp_path


def test_check_data_roots_writes_resolved_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = Config(
        dict(
            val_dataloader=dict(dataset=dict(data_root="finn_flow/folding")),
            test_dataloader=dict(dataset=dict(data_root="missing_root")),
        )
    )
    check_data_roots(cfg, ("val_dataloader",))
    assert cfg.val_dataloader.dataset.data_root == str(REPO_ROOT / "finn_flow" / "folding")
    with pytest.raises(FileNotFoundError, match=r"test_dataloader\.dataset\.data_root = "):
        check_data_roots(cfg, ("test_dataloader",))
