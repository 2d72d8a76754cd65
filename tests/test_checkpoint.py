"""Every checkpoint form CompressAI users have loads; bad files give CheckpointError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lic_deploy.archs.checkpoint import load_model, save_checkpoint
from lic_deploy.archs.registry import get_adapter, infer_arch
from lic_deploy.errors import CheckpointError


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return get_adapter("mbt2018-mean").build({"N": 32, "M": 48}).state_dict()


def _same_weights(loaded: object, state: dict[str, torch.Tensor]) -> bool:
    got = loaded.model.state_dict()
    return all(torch.equal(got[k], v) for k, v in state.items() if not k.endswith(("_cdf", "_offset", "_length")))


@pytest.mark.parametrize("form", ["raw", "compressai", "module", "compressai+module", "lic", "safetensors"])
def test_every_form_loads(tmp_path: Path, small_state: dict, form: str) -> None:
    path = tmp_path / ("m.safetensors" if form == "safetensors" else "m.pt")
    state = {f"module.{k}": v for k, v in small_state.items()} if "module" in form else small_state
    if form in ("raw", "module"):
        torch.save(state, path)
    elif form.startswith("compressai"):
        torch.save({"state_dict": state, "epoch": 7, "optimizer": {"state": {}, "param_groups": []}}, path)
    elif form == "lic":
        model = get_adapter("mbt2018-mean").build({"N": 32, "M": 48})
        model.load_state_dict(small_state)
        save_checkpoint(path, model, "mbt2018-mean", {"N": 32, "M": 48}, {"optimizer": "soap", "lmbda": 0.013})
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in small_state.items() if v.numel()}, str(path),
                  metadata={"arch": json.dumps("mbt2018-mean")})
    loaded = load_model(path)
    assert loaded.arch == "mbt2018-mean" and loaded.config == {"N": 32, "M": 48}
    assert _same_weights(loaded, small_state)
    if form == "lic":
        assert loaded.metadata["optimizer"] == "soap" and loaded.metadata["lmbda"] == 0.013
    assert len(loaded.sha256) == 64


def test_infers_scale_hyperprior() -> None:
    state = get_adapter("bmshj2018-hyperprior").build({"N": 32, "M": 40}).state_dict()
    assert infer_arch(state) == ("bmshj2018-hyperprior", {"N": 32, "M": 40})


def test_explicit_arch_must_match(tmp_path: Path, small_state: dict) -> None:
    torch.save(small_state, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="do not match architecture"):
        load_model(tmp_path / "m.pt", arch="bmshj2018-hyperprior")
    with pytest.raises(CheckpointError, match="unknown architecture 'nope'"):
        load_model(tmp_path / "m.pt", arch="nope")


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a PyTorch checkpoint"), (b"not a checkpoint at all", "not a PyTorch checkpoint"),
    (bytes(range(256)) * 10, "not a PyTorch checkpoint"), (b"PK\x03\x04" + bytes(60), "not a loadable PyTorch"),
    (b"\x80\x02junk", "not a loadable PyTorch")])
def test_corrupt_file(tmp_path: Path, content: bytes, message: str) -> None:
    """Neither a zip archive nor a pickle: said so; either of them but broken: torch's reason, one line."""
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(tmp_path / "bad.pt")


def test_truncated_checkpoint(tmp_path: Path, small_state: dict) -> None:
    torch.save(small_state, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "t.pt")


def test_missing_and_mismatched_keys(tmp_path: Path, small_state: dict) -> None:
    missing = {k: v for k, v in small_state.items() if not k.startswith("g_s.")}
    torch.save(missing, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="missing: g_s"):
        load_model(tmp_path / "a.pt")
    wrong = dict(small_state)
    wrong["g_s.0.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(wrong, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: g_s\.0\.weight"):
        load_model(tmp_path / "b.pt")


def test_non_model_objects(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_model(tmp_path / "list.pt")
    torch.save({"weights": 3}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_model(tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent.pt")


def test_autoregressive_is_named(tmp_path: Path) -> None:
    from compressai.models import JointAutoregressiveHierarchicalPriors

    torch.save(JointAutoregressiveHierarchicalPriors(N=32, M=48).state_dict(), tmp_path / "ar.pt")
    with pytest.raises(CheckpointError, match="autoregressive"):
        load_model(tmp_path / "ar.pt")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "evil.pt")


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "models").glob("*.safetensors"))


@pytest.mark.skipif(not SHIPPED, reason="models/ holds no shipped model yet (the model set is still training)")
def test_shipped_models_load_and_carry_their_training() -> None:
    total = sum(p.stat().st_size for p in SHIPPED)
    assert total <= 40 * 2**20, f"the model set is {total / 2**20:.1f} MB, over 40 MB"
    for path in SHIPPED:
        loaded = load_model(path)
        assert loaded.arch == "mbt2018-mean"
        training = loaded.metadata["training"]
        assert training["optimizer"] in ("adam", "soap") and training["lmbda"] > 0 and training["steps"] > 0
        assert path.with_suffix(".md").is_file() and path.with_suffix(".jsonl").is_file()
