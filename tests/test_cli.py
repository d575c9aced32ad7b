"""The CLI end to end on small seed-layout folders, and verify against tampered files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import refframe
from helpers import make_w
from refframe.cli import main

FRAME = "1.6a_cluster_reference_frame.safetensors"


def seed_dir(tmp_path: Path, dtype: torch.dtype, n: int = 3000, d: int = 96) -> Path:
    model = tmp_path / "Model-X"
    model.mkdir()
    W = make_w(n, d, dtype, offset_sigmas=25.0)
    save_file({"W": W.contiguous()}, model / "W.safetensors")
    save_file({"cluster_token_ids": torch.arange(10, n, 13)}, model / "1.4h_cluster_tokens.safetensors")
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_build_then_verify_round_trip(tmp_path, capsys, dtype):
    model = seed_dir(tmp_path, dtype)
    assert main(["build", "--model-dir", str(model)]) == 0
    out = capsys.readouterr().out
    assert "First 100 PCs" not in out  # d = 96: only counts below d are reported
    for text in ("PC1:", "PC10:", "First 10 PCs", "Norm:", "Size:", "Stage times"):
        assert text in out
    frame_path = model / FRAME
    data = load_file(frame_path)
    assert sorted(data) == ["W_eigenvalues", "W_eigenvectors", "cluster_centroid"]
    assert all(t.dtype == torch.float32 for t in data.values())
    assert data["W_eigenvectors"].shape == (96, 96)
    meta = refframe.load_frame(frame_path).metadata
    assert meta["model_name"] == "Model-X" and meta["n_tokens"] == "3000" and meta["d"] == "96"
    assert meta["source_dtype"] == str(dtype).removeprefix("torch.")
    assert meta["w_hash"].startswith("xxh3_128:")
    assert main(["verify", str(frame_path), "--model-dir", str(model)]) == 0
    assert "Verification passed" in capsys.readouterr().out


def test_loaded_frame_saved_again(tmp_path, capsys):
    """A frame read back and saved again verifies, keeps its provenance and takes the names given."""
    model = seed_dir(tmp_path, torch.bfloat16, n=800, d=24)
    assert main(["build", "--model-dir", str(model)]) == 0
    capsys.readouterr()
    first = refframe.load_frame(model / FRAME)
    again = tmp_path / "again.safetensors"
    refframe.save_frame(first, again, model_name="Renamed")
    meta = refframe.load_frame(again).metadata
    assert meta["model_name"] == "Renamed"
    assert meta["w_hash"] == first.metadata["w_hash"] and meta["n_tokens"] == "800"
    assert meta["metadata_hash"] != first.metadata["metadata_hash"]
    assert main(["verify", str(again), "--model-dir", str(model)]) == 0
    assert "metadata checksum matches" in capsys.readouterr().out


def test_build_with_explicit_files_and_keys(tmp_path, capsys):
    W = make_w(500, 20, torch.float16)
    save_file({"lm_head": W}, tmp_path / "w.safetensors")
    save_file({"ids": torch.tensor([1, 2, 3], dtype=torch.int32)}, tmp_path / "c.safetensors")
    out = tmp_path / "frame.safetensors"
    args = ["--W", str(tmp_path / "w.safetensors"), "--cluster", str(tmp_path / "c.safetensors")]
    assert main(["build", *args, "--out", str(out), "--W-key", "lm_head", "--cluster-key", "ids"]) == 0
    assert main(["verify", str(out), *args, "--W-key", "lm_head", "--cluster-key", "ids"]) == 0
    frame = refframe.load_frame(out)
    assert torch.allclose(frame.centroid, W[[1, 2, 3]].float().mean(0), atol=1e-6)


def tamper(src: Path, dst: Path, fn) -> Path:
    data = load_file(src)
    fn(data)
    save_file(data, dst)
    return dst


def swap(t: dict[str, torch.Tensor], *, values: bool, vectors: bool) -> None:
    if values:
        t["W_eigenvalues"][[0, 1]] = t["W_eigenvalues"][[1, 0]].clone()
    if vectors:
        t["W_eigenvectors"][:, [0, 1]] = t["W_eigenvectors"][:, [1, 0]].clone()


TAMPERS = {
    "scaled eigenvalue": (
        lambda t: t["W_eigenvalues"].__setitem__(0, t["W_eigenvalues"][0] * 1.001),
        "eigen",
    ),
    "scaled 4th eigenvalue": (
        lambda t: t["W_eigenvalues"].__setitem__(3, t["W_eigenvalues"][3] * 1.0005),
        "eigen",
    ),
    "perturbed eigenvector": (lambda t: t["W_eigenvectors"][:, 2].add_(1e-3), "orthonormal"),
    "wrong centroid": (lambda t: t["cluster_centroid"].mul_(1.001), "differs from the mean"),
    "missing key": (lambda t: t.pop("W_eigenvalues"), "missing key 'W_eigenvalues'"),
    "extra key": (lambda t: t.__setitem__("extra", torch.zeros(1)), "unexpected key 'extra'"),
    "wrong dtype": (
        lambda t: t.__setitem__("W_eigenvalues", t["W_eigenvalues"].double()),
        "expected float32",
    ),
    "swapped eigenpairs": (lambda t: swap(t, values=True, vectors=True), "descending"),
    "swapped eigenvectors": (
        lambda t: swap(t, values=False, vectors=True),
        "does not satisfy C v = lambda v",
    ),
    "non-finite": (lambda t: t["W_eigenvectors"].__setitem__((0, 0), float("nan")), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_verify_rejects_tampered(tmp_path, capsys, case):
    model = seed_dir(tmp_path, torch.bfloat16, n=2000, d=48)
    assert main(["build", "--model-dir", str(model)]) == 0
    good = model / FRAME
    fn, message = TAMPERS[case]
    bad = tamper(good, tmp_path / "bad.safetensors", fn)
    capsys.readouterr()
    assert main(["verify", str(bad), "--model-dir", str(model)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("refframe: error:") and "\n" not in err
    assert message in err


def test_verify_without_source_checks_format_only(tmp_path, capsys):
    model = seed_dir(tmp_path, torch.bfloat16, n=1000, d=32)
    assert main(["build", "--model-dir", str(model)]) == 0
    shutil.copy(model / FRAME, tmp_path / "copy.safetensors")
    assert main(["verify", str(tmp_path / "copy.safetensors")]) == 0


def test_console_script_demo_small(tmp_path):
    exe = shutil.which("refframe") or f"{sys.executable} -m refframe"
    proc = subprocess.run(
        [*exe.split(), "demo", "--small", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Verification passed" in proc.stdout
    assert "PC1:" in proc.stdout


def test_tilde_paths_are_expanded_in_cli_and_api(tmp_path, monkeypatch, capsys):
    # A quoted ~ (or one from a config file) reaches refframe unexpanded; it must still mean $HOME.
    monkeypatch.setenv("HOME", str(tmp_path))
    ck = tmp_path / "ck"
    ck.mkdir()
    W = make_w(300, 16, torch.float32)
    save_file({"lm_head.weight": W, "model.norm.weight": torch.ones(16)}, ck / "model.safetensors")
    save_file({"cluster_token_ids": torch.arange(0, 300, 7)}, tmp_path / "ids.safetensors")
    got, where = refframe.load_checkpoint_w("~/ck")
    assert torch.equal(got, W) and where.key == "lm_head.weight"
    assert main(["build", "--checkpoint", "~/ck", "--cluster", "~/ids.safetensors", "--out", "~/f.safetensors", "--no-cache"]) == 0
    assert main(["verify", "~/f.safetensors", "--debug"]) == 0
    frame = refframe.load_frame("~/f.safetensors")
    assert refframe.save_frame(frame, "~/g.safetensors") == tmp_path / "g.safetensors"
    assert (tmp_path / "g.safetensors").exists()


def test_debug_is_accepted_after_the_command_too(tmp_path, capsys):
    missing = str(tmp_path / "missing.safetensors")
    assert main(["verify", missing]) == 1
    assert "no such file" in capsys.readouterr().err
    for argv in (["--debug", "verify", missing], ["verify", missing, "--debug"]):
        with pytest.raises(refframe.InputError, match="no such file"):
            main(argv)


def test_help_does_not_load_torch():
    # --help (and the parser) must answer before torch loads: it takes seconds to import.
    code = (
        "import sys; from refframe.cli import build_parser; build_parser().format_help(); "
        "import refframe; refframe.RefframeError; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_interrupt_while_the_command_loads_is_one_line(tmp_path, monkeypatch, capsys):
    # Ctrl-C while torch (or any module of a command) is still loading: same one-line report.
    class Loading:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "refframe.cli.build", Loading())
    assert main(["build", "--W", str(tmp_path / "W.safetensors")]) == 130
    err = capsys.readouterr().err
    assert err == "refframe: interrupted (SIGINT); the output file was left as it was\n"


@pytest.mark.parametrize(("code", "fast"), [(0, False), (1, False), (130, True), (143, True)])
def test_entry_ends_an_interrupted_run_without_the_interpreter_shutdown(monkeypatch, code, fast):
    import refframe.cli.command as cli_mod

    class Exited(Exception):
        pass

    def fake_exit(c):
        raise Exited(c)

    monkeypatch.setattr(cli_mod, "main", lambda: code)
    monkeypatch.setattr(cli_mod.os, "_exit", fake_exit)
    with pytest.raises(Exited if fast else SystemExit) as info:
        cli_mod.entry()
    assert info.value.args[0] == code if fast else info.value.code == code


def test_every_public_name_resolves_and_is_typed():
    import ast

    for name in refframe.__all__:
        assert getattr(refframe, name) is not None, name
    # the TYPE_CHECKING imports (for editors) name exactly the lazily loaded attributes
    tree = ast.parse(Path(refframe.__file__).read_text())
    typed = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for imp in node.body
        for alias in imp.names
    }
    assert typed == set(refframe._LAZY)
